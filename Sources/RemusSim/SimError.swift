// Errors of the simulated guest backend. Each says what happened and what was kept safe.

import Glibc
import RemusCore
import RemusSystem

/// Why a simulated-guest operation failed.
public enum SimError: Error, Equatable, Sendable, CustomStringConvertible {
    /// A DOMAIN_CONFIG body (or a `SimConfig`) that this build cannot use.
    case invalidConfig(String)
    /// A VCPU_STATE or DEVICE_STATE body that does not decode.
    case invalidState(String)
    /// A system call failed.
    case system(SystemError)
    /// The operation needs the guest suspended (all vCPUs parked) and it is running.
    case notSuspended(operation: String)
    /// The caller's bitmap does not cover the guest's PFN space.
    case bitmapSize(expected: UInt64, found: UInt64)
    /// The staging arena cannot hold the pages to capture; nothing was appended.
    case arenaFull(needed: Int, free: Int)
    /// A checkpoint refers to a page frame the guest does not have; nothing was applied.
    case pageOutOfRange(pfn: PFN, pageCount: UInt64)
    /// A checkpoint contradicts itself or the replica; nothing was applied.
    case inconsistentCheckpoint(String)
    /// The replica is in the wrong phase for the call.
    case replicaState(String)
    /// `closeEpoch` was called with an epoch not above the last one closed.
    case epochOutOfOrder(epoch: Epoch, lastClosed: Epoch)

    public var description: String {
        switch self {
        case .invalidConfig(let why):
            return "simulated guest config rejected: \(why)"
        case .invalidState(let why):
            return "simulated guest state rejected: \(why)"
        case .system(let error):
            return "\(error)"
        case .notSuspended(let operation):
            return "\(operation) needs the guest suspended, but its vCPUs are running; call suspend() first"
        case .bitmapSize(let expected, let found):
            return "dirty bitmap covers \(found) pages, the guest has \(expected)"
        case .arenaFull(let needed, let free):
            return "staging arena has room for \(free) more pages, capture needs \(needed); nothing captured — "
                + "split the bitmap or raise the checkpoint size limit"
        case .pageOutOfRange(let pfn, let pageCount):
            return "checkpoint names PFN \(pfn) but the guest has \(pageCount) pages; checkpoint not applied, "
                + "the previous one stays committed"
        case .inconsistentCheckpoint(let why):
            return "checkpoint not applied, the previous one stays committed: \(why)"
        case .replicaState(let why):
            return "replica: \(why)"
        case .epochOutOfOrder(let epoch, let lastClosed):
            return "closeEpoch(\(epoch)) after epoch \(lastClosed) was already closed; epochs must increase"
        }
    }
}
