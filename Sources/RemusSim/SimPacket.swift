// The virtual NIC's packets and their wire form.

import RemusCore

/// A packet the simulated guest's NIC emits: vCPU `vcpu` emits one every `packetEveryStores`
/// stores. Its content is a pure function of the workload, so a verifier can tell whether it
/// came from committed state.
///
/// Wire form (32 bytes, little-endian), for sending to an observer over UDP:
///
/// | offset | size | field |
/// | --- | --- | --- |
/// | 0 | 4 | vcpu |
/// | 4 | 4 | marker 0x31504D53 ("SMP1") |
/// | 8 | 8 | seq |
/// | 16 | 8 | opCount |
/// | 24 | 8 | digest |
public struct SimPacket: Equatable, Hashable, Sendable, CustomStringConvertible {
    /// The emitting vCPU.
    public var vcpu: UInt32
    /// Per-vCPU sequence number, dense from 0.
    public var seq: UInt64
    /// The vCPU's op count right after the store that emitted the packet.
    public var opCount: UInt64
    /// `SimRegisters.digest(vcpu:)` of the vCPU at emission (with `nicSeq == seq`).
    public var digest: UInt64

    /// Bytes of the wire form.
    public static let wireSize = 32
    /// The marker at offset 4 of the wire form ("SMP1").
    public static let wireMarker: UInt32 = 0x3150_4D53

    public init(vcpu: UInt32, seq: UInt64, opCount: UInt64, digest: UInt64) {
        self.vcpu = vcpu
        self.seq = seq
        self.opCount = opCount
        self.digest = digest
    }

    /// The 32-byte wire form.
    public func encode() -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: Self.wireSize)
        bytes.withUnsafeMutableBytes { encode(into: $0) }
        return bytes
    }

    /// Writes the wire form into the first 32 bytes of `buffer` (no allocation).
    public func encode(into buffer: UnsafeMutableRawBufferPointer) {
        precondition(buffer.count >= Self.wireSize, "packet buffer of \(buffer.count) bytes, need \(Self.wireSize)")
        // SAFETY: the buffer holds at least 32 bytes (checked above); storeBytes on a raw buffer
        // needs no alignment.
        buffer.storeBytes(of: vcpu.littleEndian, toByteOffset: 0, as: UInt32.self)
        buffer.storeBytes(of: Self.wireMarker.littleEndian, toByteOffset: 4, as: UInt32.self)
        buffer.storeBytes(of: seq.littleEndian, toByteOffset: 8, as: UInt64.self)
        buffer.storeBytes(of: opCount.littleEndian, toByteOffset: 16, as: UInt64.self)
        buffer.storeBytes(of: digest.littleEndian, toByteOffset: 24, as: UInt64.self)
    }

    /// Decodes a wire form: exactly 32 bytes with the marker, else nil.
    public init?(wire bytes: UnsafeRawBufferPointer) {
        // SAFETY: exactly 32 bytes (checked first); unaligned loads, so any buffer works.
        guard bytes.count == Self.wireSize,
              UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: 4, as: UInt32.self)) == Self.wireMarker
        else { return nil }
        vcpu = UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: 0, as: UInt32.self))
        seq = UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
        opCount = UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: 16, as: UInt64.self))
        digest = UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: 24, as: UInt64.self))
    }

    /// Decodes a wire form: exactly 32 bytes with the marker, else nil.
    public init?(wire bytes: [UInt8]) {
        guard let packet = bytes.withUnsafeBytes({ SimPacket(wire: $0) }) else { return nil }
        self = packet
    }

    public var description: String {
        "packet(vcpu \(vcpu), seq \(seq), ops \(opCount), digest 0x\(String(digest, radix: 16)))"
    }
}
