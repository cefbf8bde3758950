/// How RemusNetbuf names and marks what it adds to the kernel, so that a later run (or
/// `remusd netbuf cleanup` after a crash) can find it without any state on disk.
public enum NetbufNaming {
    /// Prefix of every ifb device RemusNetbuf creates.
    public static let ifbPrefix = "rb-"

    /// tc priority ("pref") of our redirect filter on the guest interface's ingress qdisc. A
    /// distinctive value: a u32 filter at this priority is ours.
    public static let filterPriority: UInt16 = 4242

    /// The ifb alias starts with this word; the rest records the guest interface and whether the
    /// ingress qdisc was created by us (`ingress=owned`) or was there before (`ingress=shared`).
    public static let aliasTag = "remusd-netbuf"

    /// The ifb device name for the guest interface with index `guestIfindex`: `"rb-<ifindex>"`.
    ///
    /// Deterministic, unique per interface within a network namespace (the kernel does not reuse
    /// an index while the interface exists), and at most 13 bytes for any 31-bit index, below
    /// the kernel's 15-byte limit.
    public static func ifbName(forGuestIfindex guestIfindex: Int32) -> String {
        precondition(guestIfindex > 0, "interface indices are positive, got \(guestIfindex)")
        return ifbPrefix + String(guestIfindex)
    }

    /// The guest interface index encoded in one of our ifb names; nil for any other name.
    public static func guestIfindex(fromIFBName name: String) -> Int32? {
        guard name.hasPrefix(ifbPrefix) else { return nil }
        let digits = name.dropFirst(ifbPrefix.count)
        guard !digits.isEmpty, digits.allSatisfy({ $0.isASCII && $0.isNumber }), digits.first != "0",
              let value = Int32(digits), value > 0 else { return nil }
        return value
    }

    /// What the ifb's alias says about the interface it buffers.
    public struct AliasRecord: Equatable, Sendable {
        /// The guest interface name when the buffer was set up.
        public var guestName: String
        /// Whether our setup created the guest's ingress qdisc (then teardown deletes it).
        public var ownsIngressQdisc: Bool

        public init(guestName: String, ownsIngressQdisc: Bool) {
            self.guestName = guestName
            self.ownsIngressQdisc = ownsIngressQdisc
        }

        /// `"remusd-netbuf guest=<name> ingress=owned|shared"`.
        public var text: String {
            "\(NetbufNaming.aliasTag) guest=\(guestName) ingress=\(ownsIngressQdisc ? "owned" : "shared")"
        }

        /// Parses `text`; nil if the alias was not written by us.
        public init?(parsing alias: String?) {
            guard let alias else { return nil }
            let words = alias.split(separator: " ")
            guard words.first == Substring(NetbufNaming.aliasTag) else { return nil }
            var guest: String?
            var owns: Bool?
            for word in words.dropFirst() {
                if word.hasPrefix("guest=") { guest = String(word.dropFirst("guest=".count)) }
                if word == "ingress=owned" { owns = true }
                if word == "ingress=shared" { owns = false }
            }
            guard let guest, let owns else { return nil }
            self.init(guestName: guest, ownsIngressQdisc: owns)
        }
    }
}
