// CRC32C, the checksum of every stream record. A pure compute kernel kept in C because Swift has
// no access to the crc32 and carry-less multiply instructions; no I/O, no state beyond tables and
// constants built once.
//
// Three paths, chosen once per process by CPU features:
// - AVX-512 VPCLMULQDQ (inputs of 256 bytes and more): the message is folded 256 bytes at a time
//   into four 512-bit accumulators with carry-less multiplies by x^k mod P, the standard "folding"
//   CRC method; the folded 128 bits and the tail finish with the crc32 instruction. Memory-bound.
// - SSE4.2 crc32: the instruction has a latency of 3 cycles and a throughput of 1 per cycle, so
//   long inputs are cut into three equal blocks whose CRCs run as three independent chains, then
//   joined: extending a CRC register over L zero bytes is a linear map of the register,
//   precomputed as four byte tables ("shift" tables), so crc(A|B|C) = shift(shift(crcA) ^ crcB) ^ crcC.
// - A slicing-by-8 table everywhere else (and as the tests' oracle).
// The CPU's word is checked once by timing: an emulator may advertise SSE4.2 and run crc32 as a
// bit-by-bit loop (QEMU's TCG does: 5x slower than the table there), so the table is taken when
// it ran over 2x faster than the instruction on the same bytes (see calibrate()).
#include "ccrc32c.h"

#include <pthread.h>
#include <time.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

// Block lengths (bytes) of the three-way loops; each has its own shift table.
#define LONG_BLOCK 8192
#define SHORT_BLOCK 256

static uint32_t table[8][256];
static uint32_t shift_long[4][256];
static uint32_t shift_short[4][256];
static int use_hardware;
static int use_vpclmul;
static pthread_once_t once = PTHREAD_ONCE_INIT;

// Folding constants: for a fold over D bits, {x^(D+32) mod P, x^(D-32) mod P}, bit-reflected and
// shifted left by one (the layout the reflected carry-less multiply needs).
static uint64_t fold2048[2], fold512[2], fold384[2], fold256[2], fold128[2];

static uint32_t x_power_mod_p(unsigned exponent) {
    uint64_t r = 1;
    while (exponent--) {
        r <<= 1;
        if (r >> 32) r ^= 0x11EDC6F41ull;  // x^32 + the Castagnoli polynomial 0x1EDC6F41
    }
    return (uint32_t)r;
}

static uint64_t reflected_shifted(uint32_t c) {
    uint32_t r = 0;
    for (int i = 0; i < 32; i++)
        if (c & (1u << i)) r |= 1u << (31 - i);
    return (uint64_t)r << 1;
}

static void build_fold(uint64_t k[2], unsigned bits) {
    k[0] = reflected_shifted(x_power_mod_p(bits + 32));
    k[1] = reflected_shifted(x_power_mod_p(bits - 32));
}

// The register (no pre/post inversion) after `length` zero bytes, starting from `crc`.
static uint32_t extend_zeros(uint32_t crc, size_t length) {
    while (length--) crc = (crc >> 8) ^ table[0][crc & 0xFF];
    return crc;
}

// Tables for the linear map "extend over `length` zero bytes", one per register byte.
static void build_shift(uint32_t shift[4][256], size_t length) {
    uint32_t basis[32];
    for (int bit = 0; bit < 32; bit++) basis[bit] = extend_zeros(1u << bit, length);
    for (int k = 0; k < 4; k++)
        for (uint32_t b = 0; b < 256; b++) {
            uint32_t v = 0;
            for (int j = 0; j < 8; j++)
                if (b & (1u << j)) v ^= basis[8 * k + j];
            shift[k][b] = v;
        }
}

static inline uint32_t apply_shift(const uint32_t shift[4][256], uint32_t crc) {
    return shift[0][crc & 0xFF] ^ shift[1][(crc >> 8) & 0xFF] ^ shift[2][(crc >> 16) & 0xFF] ^
           shift[3][crc >> 24];
}

#if defined(__x86_64__)
static void calibrate(void);
#endif

static void init_tables(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++) table[t][i] = (table[t - 1][i] >> 8) ^ table[0][table[t - 1][i] & 0xFF];
    build_shift(shift_long, LONG_BLOCK);
    build_shift(shift_short, SHORT_BLOCK);
    build_fold(fold2048, 2048);
    build_fold(fold512, 512);
    build_fold(fold384, 384);
    build_fold(fold256, 256);
    build_fold(fold128, 128);
#if defined(__x86_64__)
    __builtin_cpu_init();
    use_hardware = __builtin_cpu_supports("sse4.2");
    use_vpclmul = use_hardware && __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("avx512f") &&
                  __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("vpclmulqdq");
    if (use_hardware) calibrate();
#endif
}

static uint32_t extend_table(uint32_t crc, const unsigned char *p, size_t n) {
    while (n >= 8) {
        uint64_t v;
        __builtin_memcpy(&v, p, 8);
        v ^= crc;
        crc = table[7][v & 0xFF] ^ table[6][(v >> 8) & 0xFF] ^ table[5][(v >> 16) & 0xFF] ^
              table[4][(v >> 24) & 0xFF] ^ table[3][(v >> 32) & 0xFF] ^ table[2][(v >> 40) & 0xFF] ^
              table[1][(v >> 48) & 0xFF] ^ table[0][v >> 56];
        p += 8;
        n -= 8;
    }
    while (n--) crc = (crc >> 8) ^ table[0][(crc ^ *p++) & 0xFF];
    return crc;
}

#if defined(__x86_64__)
static inline uint64_t load64(const unsigned char *p) {
    uint64_t v;
    __builtin_memcpy(&v, p, 8);
    return v;
}

// Three chains over blocks of `block` bytes while at least 3 * block bytes remain.
__attribute__((target("sse4.2"), always_inline))
static inline uint32_t extend_three_way(uint32_t crc, const unsigned char **pp, size_t *np, size_t block,
                                        const uint32_t shift[4][256]) {
    const unsigned char *p = *pp;
    size_t n = *np;
    while (n >= 3 * block) {
        uint64_t c0 = crc, c1 = 0, c2 = 0;
        const unsigned char *end = p + block;
        do {
            c0 = __builtin_ia32_crc32di(c0, load64(p));
            c1 = __builtin_ia32_crc32di(c1, load64(p + block));
            c2 = __builtin_ia32_crc32di(c2, load64(p + 2 * block));
            p += 8;
        } while (p < end);
        crc = apply_shift(shift, (uint32_t)c0) ^ (uint32_t)c1;
        crc = apply_shift(shift, crc) ^ (uint32_t)c2;
        p += 2 * block;
        n -= 3 * block;
    }
    *pp = p;
    *np = n;
    return crc;
}

#define FOLD_TARGET __attribute__((target("avx512f,avx512vl,vpclmulqdq,pclmul,sse4.2")))

// One fold of four 128-bit lanes over `k`'s distance, XORed with `data`.
FOLD_TARGET static inline __m512i fold_512(__m512i z, __m512i k, __m512i data) {
    return _mm512_ternarylogic_epi64(_mm512_clmulepi64_epi128(z, k, 0x00), _mm512_clmulepi64_epi128(z, k, 0x11), data,
                                     0x96);
}

FOLD_TARGET static inline __m128i fold_128(__m128i x, const uint64_t k[2]) {
    __m128i kk = _mm_set_epi64x((long long)k[1], (long long)k[0]);
    return _mm_xor_si128(_mm_clmulepi64_si128(x, kk, 0x00), _mm_clmulepi64_si128(x, kk, 0x11));
}

// The register after `n` ≥ 256 bytes, starting from `crc` (no inversion).
FOLD_TARGET static uint32_t extend_vpclmul(uint32_t crc, const unsigned char *p, size_t n) {
    __m512i z0 = _mm512_loadu_si512((const void *)p);
    __m512i z1 = _mm512_loadu_si512((const void *)(p + 64));
    __m512i z2 = _mm512_loadu_si512((const void *)(p + 128));
    __m512i z3 = _mm512_loadu_si512((const void *)(p + 192));
    // The register enters as the first 32 bits of the message.
    z0 = _mm512_xor_si512(z0, _mm512_castsi128_si512(_mm_cvtsi32_si128((int)crc)));
    p += 256;
    n -= 256;
    const __m512i k2048 = _mm512_broadcast_i32x4(_mm_set_epi64x((long long)fold2048[1], (long long)fold2048[0]));
    while (n >= 256) {
        z0 = fold_512(z0, k2048, _mm512_loadu_si512((const void *)p));
        z1 = fold_512(z1, k2048, _mm512_loadu_si512((const void *)(p + 64)));
        z2 = fold_512(z2, k2048, _mm512_loadu_si512((const void *)(p + 128)));
        z3 = fold_512(z3, k2048, _mm512_loadu_si512((const void *)(p + 192)));
        p += 256;
        n -= 256;
    }
    const __m512i k512 = _mm512_broadcast_i32x4(_mm_set_epi64x((long long)fold512[1], (long long)fold512[0]));
    z1 = fold_512(z0, k512, z1);
    z2 = fold_512(z1, k512, z2);
    z3 = fold_512(z2, k512, z3);
    __m128i x = _mm512_extracti32x4_epi32(z3, 3);
    x = _mm_xor_si128(x, fold_128(_mm512_extracti32x4_epi32(z3, 0), fold384));
    x = _mm_xor_si128(x, fold_128(_mm512_extracti32x4_epi32(z3, 1), fold256));
    x = _mm_xor_si128(x, fold_128(_mm512_extracti32x4_epi32(z3, 2), fold128));
    while (n >= 16) {
        x = _mm_xor_si128(fold_128(x, fold128), _mm_loadu_si128((const __m128i *)p));
        p += 16;
        n -= 16;
    }
    // The folded 128 bits are congruent to everything so far: finish them and the tail with crc32.
    uint64_t c = __builtin_ia32_crc32di(0, (uint64_t)_mm_cvtsi128_si64(x));
    c = __builtin_ia32_crc32di(c, (uint64_t)_mm_extract_epi64(x, 1));
    if (n >= 8) {
        c = __builtin_ia32_crc32di(c, load64(p));
        p += 8;
        n -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (n--) c32 = __builtin_ia32_crc32qi(c32, *p++);
    return c32;
}

__attribute__((target("sse4.2")))
static uint32_t extend_hardware(uint32_t crc, const unsigned char *p, size_t n) {
    if (use_vpclmul && n >= 256) return extend_vpclmul(crc, p, n);
    crc = extend_three_way(crc, &p, &n, LONG_BLOCK, shift_long);
    crc = extend_three_way(crc, &p, &n, SHORT_BLOCK, shift_short);
    uint64_t c = crc;
    while (n >= 8) {
        c = __builtin_ia32_crc32di(c, load64(p));
        p += 8;
        n -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (n--) c32 = __builtin_ia32_crc32qi(c32, *p++);
    return c32;
}

static uint64_t monotonic_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

// Times both paths over the same 64 KiB (the fastest of three runs each, so a preemption does
// not decide) and keeps the instruction unless the table beat it by more than 2x. Real CPUs run
// the instruction at about twice the table's speed; only an emulated one loses by 2x. Costs
// ~0.2 ms once per process on a real CPU.
static void calibrate(void) {
    static unsigned char sample[65536];
    for (size_t i = 0; i < sizeof sample; i++) sample[i] = (unsigned char)(i * 131 + 7);
    uint64_t best_hardware = UINT64_MAX, best_table = UINT64_MAX;
    volatile uint32_t sink = 0;
    for (int run = 0; run < 3; run++) {
        uint64_t t0 = monotonic_ns();
        sink ^= extend_hardware(0, sample, sizeof sample);
        uint64_t t1 = monotonic_ns();
        sink ^= extend_table(0, sample, sizeof sample);
        uint64_t t2 = monotonic_ns();
        if (t1 - t0 < best_hardware) best_hardware = t1 - t0;
        if (t2 - t1 < best_table) best_table = t2 - t1;
    }
    (void)sink;
    if (remus_crc32c_prefers_table(best_hardware, best_table)) use_hardware = use_vpclmul = 0;
}
#endif

int remus_crc32c_prefers_table(uint64_t hardware_ns, uint64_t table_ns) {
    return table_ns > 0 && hardware_ns / 2 > table_ns;
}

uint32_t remus_crc32c_extend(uint32_t crc, const void *data, size_t length) {
    pthread_once(&once, init_tables);
    crc = ~crc;
#if defined(__x86_64__)
    if (use_hardware) return ~extend_hardware(crc, data, length);
#endif
    return ~extend_table(crc, data, length);
}

uint32_t remus_crc32c_extend_portable(uint32_t crc, const void *data, size_t length) {
    pthread_once(&once, init_tables);
    return ~extend_table(~crc, data, length);
}

int remus_crc32c_hardware(void) {
    pthread_once(&once, init_tables);
    return use_hardware;
}
