/* The testbed guest's disk benchmark (issue #12, item 7): what a guest feels of its disk being
 * replicated, measured inside the guest against its own clock (which runs on through checkpoint
 * pauses, so they count).
 *
 *   diskbench DEVICE OFFSET_MIB
 *
 * From OFFSET_MIB on, with O_DIRECT (no guest page cache between the program and blkfront):
 *   - fsync latency: 200 times a 4 KiB write followed by fdatasync (the flush blkfront sends down
 *     to dom0), each timed: one line with the 10th, 50th and 90th percentiles and the maximum;
 *   - throughput: 5 rounds of 16 MiB written in 1 MiB writes and then fdatasync'd: one line per
 *     round with its MB/s.
 * Lines start with "DISKBENCH"; the last is "DISKBENCH done" or "DISKBENCH failed: ...".
 * Built static by run.sh into the guest's initramfs (the guest has busybox and nothing else). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

enum { syncWrites = 200, seqRounds = 5, seqMiB = 16, mib = 1 << 20 };

static double nowSeconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static int failed(const char *what) {
    printf("DISKBENCH failed: %s: %s\n", what, strerror(errno));
    return 1;
}

static int byValue(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: diskbench DEVICE OFFSET_MIB\n");
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    off_t base = (off_t)atoll(argv[2]) * mib;
    int fd = open(argv[1], O_WRONLY | O_DIRECT);
    if (fd < 0) return failed("open");
    unsigned char *buffer;
    if (posix_memalign((void **)&buffer, 4096, mib) != 0) return failed("posix_memalign");
    memset(buffer, 0xA5, mib);

    double latency[syncWrites];
    for (int i = 0; i < syncWrites; i++) {
        double t0 = nowSeconds();
        if (pwrite(fd, buffer, 4096, base + (off_t)i * 4096) != 4096) return failed("pwrite 4 KiB");
        if (fdatasync(fd) != 0) return failed("fdatasync");
        latency[i] = (nowSeconds() - t0) * 1e3;
    }
    qsort(latency, syncWrites, sizeof latency[0], byValue);
    printf("DISKBENCH fsync4k n=%d p10=%.2f p50=%.2f p90=%.2f max=%.2f ms\n", syncWrites,
           latency[syncWrites / 10], latency[syncWrites / 2], latency[syncWrites * 9 / 10],
           latency[syncWrites - 1]);

    for (int round = 1; round <= seqRounds; round++) {
        double t0 = nowSeconds();
        for (int i = 0; i < seqMiB; i++) {
            if (pwrite(fd, buffer, mib, base + (off_t)i * mib) != mib) return failed("pwrite 1 MiB");
        }
        if (fdatasync(fd) != 0) return failed("fdatasync");
        printf("DISKBENCH seq round=%d mbps=%.2f\n", round, seqMiB * (double)mib / 1e6 / (nowSeconds() - t0));
    }
    printf("DISKBENCH done\n");
    return 0;
}
