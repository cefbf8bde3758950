// ThreadSanitizer harness: runs the replica race of Tests/RemusSimTests/ReplicaRace.swift.
import Glibc

let failures = try raceReplicaReadsAgainstDiscard(rounds: 20)
print(failures.isEmpty ? "replica race: 20 rounds passed" : "replica race FAILED:\n" + failures.joined(separator: "\n"))
exit(failures.isEmpty ? 0 : 1)
