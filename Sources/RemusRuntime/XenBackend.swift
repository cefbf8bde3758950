import RemusCore
import RemusNetbuf
import RemusXen

/// Builds the Xen backend's primary and replica for the daemons.
enum XenBackend {
    /// A Xen domain opened for protection, with its output buffer: plug qdiscs on every vif of
    /// the domain (guest egress is dom0 ingress on the vif), unless output is not held
    /// (`--unsafe --no-netbuf`).
    struct Primary {
        let guest: XenPrimaryGuest
        let output: any OutputBuffer
        let plug: PlugOutputBuffer?
    }

    /// Checks this is a Xen 4.17 dom0, opens the domain and buffers its vifs. Nothing is changed
    /// on the domain when this throws.
    static func openPrimary(domain: String, holdOutput: Bool, limitBytes: Int) throws -> Primary {
        let log = XenLog(echoLevel: .error)
        do {
            _ = try XenHost.detect(log: log)
        } catch {
            throw ProtocolError("\(error) Nothing was changed on domain '\(domain)'. See Docs/xen.md, or use --backend sim for the simulated guest.")
        }
        let guest = try XenPrimaryGuest(domain: domain, log: log)
        guard holdOutput else { return Primary(guest: guest, output: UnbufferedOutput(), plug: nil) }
        let vifs = xenVifInterfaces(domid: guest.domid)
        guard !vifs.isEmpty else {
            throw ProtocolError("domain '\(domain)' (id \(guest.domid)) has no vif in dom0 (/sys/class/net/vif\(guest.domid).*): there is no network output to hold. Give it a vif, or pass --unsafe --no-netbuf if it truly has no network; nothing was changed")
        }
        do {
            let plug = try PlugOutputBuffer(interfaces: vifs, limitBytes: limitBytes)
            return Primary(guest: guest, output: plug, plug: plug)
        } catch {
            throw ProtocolError("\(error); nothing was changed on domain '\(domain)' (its vifs \(vifs.joined(separator: ", ")) are not buffered)")
        }
    }

    /// An empty replica; the primary's stream header and configuration build the domain.
    static func makeReplica() throws -> XenReplica {
        do {
            return try XenReplica(log: XenLog(echoLevel: .error))
        } catch {
            throw ProtocolError("this backup cannot receive a Xen guest: \(error). It must run as root in dom0 of Xen 4.17 with xenstored running (see Docs/xen.md)")
        }
    }
}

/// Output that is never held (`--unsafe --no-netbuf` on a Xen domain): the vifs pass packets
/// as they come.
final class UnbufferedOutput: OutputBuffer {
    func closeEpoch(_ epoch: Epoch) throws {}
    func release(through epoch: Epoch) throws {}
    func releaseAll() throws {}
    func hold() throws {}
    func statistics() throws -> OutputStatistics { OutputStatistics() }
}
