// CRC32C, the checksum of every stream record. A pure compute kernel kept in C because Swift has
// no access to the crc32 instruction; no I/O, no state beyond tables built once.
//
// Hardware path: the crc32 instruction has a latency of 3 cycles and a throughput of 1 per cycle,
// so one dependent chain runs at a third of the possible speed. Long inputs are therefore cut into
// three equal blocks whose CRCs run as three independent chains, then joined: extending a CRC
// register over L zero bytes is a linear map of the register, precomputed as four byte tables
// ("shift" tables), so crc(A|B|C) = shift(shift(crcA) ^ crcB) ^ crcC.
#include "ccrc32c.h"

#include <pthread.h>

// Block lengths (bytes) of the three-way loops; each has its own shift table.
#define LONG_BLOCK 8192
#define SHORT_BLOCK 256

static uint32_t table[8][256];
static uint32_t shift_long[4][256];
static uint32_t shift_short[4][256];
static int use_hardware;
static pthread_once_t once = PTHREAD_ONCE_INIT;

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
#if defined(__x86_64__)
    __builtin_cpu_init();
    use_hardware = __builtin_cpu_supports("sse4.2");
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

__attribute__((target("sse4.2")))
static uint32_t extend_hardware(uint32_t crc, const unsigned char *p, size_t n) {
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
#endif

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
