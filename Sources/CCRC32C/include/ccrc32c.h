#ifndef CCRC32C_H
#define CCRC32C_H
#include <stddef.h>
#include <stdint.h>

/// Extends a CRC32C (Castagnoli) over `length` bytes at `data`. Start with crc = 0.
/// Uses AVX-512 VPCLMULQDQ folding (inputs of 256 bytes and more) or the SSE4.2 crc32 instruction
/// (three interleaved chains) when the CPU has them, a table otherwise. Pure compute, thread-safe.
uint32_t remus_crc32c_extend(uint32_t crc, const void *data, size_t length);

/// The same function computed with the table only, whatever the CPU: the oracle the tests compare
/// the hardware path against.
uint32_t remus_crc32c_extend_portable(uint32_t crc, const void *data, size_t length);

/// 1 when the hardware path is in use, 0 for the table fallback (no SSE4.2, or an emulated crc32
/// instruction the table beat by over 2x when timed once at the first use).
int remus_crc32c_hardware(void);

/// The timing rule of that choice: 1 when the table (`table_ns` for some bytes) ran over twice as
/// fast as the instruction (`hardware_ns` for the same bytes).
int remus_crc32c_prefers_table(uint64_t hardware_ns, uint64_t table_ns);

#endif
