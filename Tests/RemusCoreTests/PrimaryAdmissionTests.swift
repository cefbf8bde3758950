import RemusCore
import Testing

private let ms: UInt64 = 1_000_000
private let settings = ProtectionSettings(intervalNs: 100 * ms, heartbeatNs: 50 * ms, timeoutNs: 300 * ms)
private let guestA = GuestUUID(high: 0xA, low: 1)
private let primary = StreamSender(identity: "primary", guestUUID: guestA, guestName: "g1")
private let intruderSameGuest = StreamSender(identity: "intruder", guestUUID: guestA, guestName: "g1")
private let primaryOtherGuest = StreamSender(identity: "primary", guestUUID: GuestUUID(high: 0xB, low: 2), guestName: "g1")
private let policy = PrimaryAdmission(guestMemoryBudget: 1 << 30)

private func decide(_ sender: StreamSender, holder: StreamSender?, _ state: BackupCommitter.State,
                    fenceInFlight: Bool = false, bytes: UInt64 = 16 << 20, policy: PrimaryAdmission = policy) -> PrimaryAdmission.Decision {
    policy.decide(sender, declaredGuestBytes: bytes, holder: holder, state: state, fenceInFlight: fenceInFlight)
}

/// A committer receiving from its primary, checkpoint 1 committed.
private func holdingCheckpointOne() -> BackupCommitter {
    var c = BackupCommitter(settings: settings, fencePolicy: .fence)
    _ = c.onPrimaryConnected(now: 0)
    _ = c.onCheckpointBegan(CheckpointBegin(epoch: 1, kind: .checkpoint), now: 0)
    _ = c.onCheckpointComplete(CheckpointEnd(epoch: 1, recordCount: 0, digest: 0, payloadBytes: 0), now: 0)
    _ = c.onCommitted(1, now: 0)
    return c
}

private func refused(_ d: PrimaryAdmission.Decision) -> String? {
    if case .refuse(let why) = d { return why }
    return nil
}

@Suite("Primary admission (I10)")
struct PrimaryAdmissionTests {
    @Test("An idle backup takes the first primary of a guest it serves")
    func anIdleBackupAdmits() {
        #expect(decide(primary, holder: nil, .listening) == .admit(replacingConnection: false))
        #expect(decide(intruderSameGuest, holder: nil, .stopped("earlier")) == .admit(replacingConnection: false))
    }

    @Test("A new identity or a new guest UUID never replaces a committed image, whatever the state")
    func anotherSenderNeverReplacesAHeldImage() {
        let states: [BackupCommitter.State] = [
            .receiving(committed: 5, connected: true), .receiving(committed: 5, connected: false),
            .fencing(committed: 5, attempt: 1, fence: .failed(retryAt: 0)),
            .fencing(committed: 5, attempt: 2, fence: .running(deadline: 9)),
            .awaitingOperator(committed: 5), .activating(committed: 5), .active(from: 5),
        ]
        for state in states {
            for other in [intruderSameGuest, primaryOtherGuest] {
                let why = refused(decide(other, holder: primary, state))
                #expect(why != nil, "\(other) admitted in \(state)")
                #expect(why?.contains("nothing changed here") == true)
                if case .active = state { continue }
                if case .activating = state { continue }
                #expect(why?.contains("remusd failover --discard") == true, "the refusal names the operator's command: \(why ?? "")")
            }
        }
    }

    @Test("The same primary of the same guest reconnects: over its open connection, or back before the fence runs")
    func theSamePrimaryMayReconnect() {
        #expect(decide(primary, holder: primary, .receiving(committed: 5, connected: true)) == .admit(replacingConnection: true))
        #expect(decide(primary, holder: primary, .receiving(committed: 5, connected: false)) == .admit(replacingConnection: false))
        #expect(decide(primary, holder: primary, .fencing(committed: 5, attempt: 1, fence: .failed(retryAt: 0))) == .admit(replacingConnection: false))
        #expect(refused(decide(primary, holder: primary, .fencing(committed: 5, attempt: 1, fence: .running(deadline: 9)), fenceInFlight: true)) != nil,
                "a fence that is switching it off right now is not called off")
        #expect(refused(decide(primary, holder: primary, .awaitingOperator(committed: 5))) != nil, "PRIMARY LOST is the operator's")
        // The guest's name may change (a rename); identity and UUID are what count.
        var renamed = primary
        renamed.guestName = "g1-renamed"
        #expect(decide(renamed, holder: primary, .receiving(committed: 5, connected: false)) == .admit(replacingConnection: false))
    }

    @Test("A backup that committed nothing binds nothing once its sender is gone, and nothing while it streams")
    func aSquatterLeavesNothingBehind() {
        // The squatter still streams (synchronising): the real primary waits for the deadlines to drop it.
        #expect(refused(decide(primary, holder: intruderSameGuest, .receiving(committed: 0, connected: true))) != nil)
        // Its stream was rejected and nothing was committed: the real primary takes its place.
        #expect(decide(primary, holder: intruderSameGuest, .receiving(committed: 0, connected: false)) == .admit(replacingConnection: false))
    }

    @Test("Guests not served and guests over the memory budget are refused before anything else")
    func servedGuestsAndTheBudget() {
        let served = PrimaryAdmission(servedGuests: [.uuid(guestA)], guestMemoryBudget: 1 << 30)
        #expect(decide(primary, holder: nil, .listening, policy: served) == .admit(replacingConnection: false))
        let why = refused(decide(primaryOtherGuest, holder: nil, .listening, policy: served))
        #expect(why?.contains("--accept-guest") == true, "\(why ?? "")")
        let byName = PrimaryAdmission(servedGuests: [.name("web")], guestMemoryBudget: 1 << 30)
        #expect(refused(decide(primary, holder: nil, .listening, policy: byName)) != nil)
        let big = refused(decide(primary, holder: nil, .listening, bytes: 16 << 40))
        #expect(big?.contains("16777216 MiB") == true && big?.contains("--memory-budget") == true, "\(big ?? "")")
        #expect(big?.contains("nothing was allocated") == true)
    }

    @Test("Guest selectors parse UUIDs and names")
    func selectorsParse() {
        #expect(GuestSelector(parsing: "00000000-0000-000a-0000-000000000001") == .uuid(guestA))
        #expect(GuestSelector(parsing: "00000000-0000-000A-0000-000000000001") == .uuid(guestA))
        #expect(GuestSelector(parsing: "web-1") == .name("web-1"))
        #expect(GuestSelector(parsing: "0000000g-0000-0000-0000-000000000001") == .name("0000000g-0000-0000-0000-000000000001"))
        #expect(GuestSelector(parsing: "") == nil)
        #expect(GuestUUID(parsing: guestA.description) == guestA)
    }

    @Test("The operator's discard drops a held image, except once the guest runs here")
    func operatorDiscard() {
        var c = holdingCheckpointOne()
        _ = c.onConnectionLost(reason: "gone", now: 1)
        #expect(c.state == .fencing(committed: 1, attempt: 1, fence: .running(deadline: 1 + settings.fenceTimeoutNs)))
        let d = c.onOperatorDiscard(now: 2)
        #expect(d.contains(.discardReplica) && d.contains(.closeConnection))
        #expect(c.state == .stopped("discarded by the operator"))
        #expect(c.onFenced(success: true, detail: "late", now: 3).isEmpty, "a fence finishing after the discard activates nothing")
        #expect(c.acceptsPrimary)
    }

    @Test("A replaced connection keeps the committed checkpoint until the new stream starts")
    func replacedConnection() {
        var c = holdingCheckpointOne()
        let d = c.onConnectionReplaced(now: 1)
        #expect(d.contains(.closeConnection) && !d.contains(.fencePrimary))
        #expect(c.state == .receiving(committed: 1, connected: false))
        #expect(c.acceptsPrimary)
    }
}
