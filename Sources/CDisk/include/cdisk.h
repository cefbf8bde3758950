// fallocate(2) hole punching: glibc declares fallocate only under _GNU_SOURCE, which Swift's
// Glibc module does not set, and the FALLOC_FL_* flags live in <linux/falloc.h>.
#ifndef CDISK_H
#define CDISK_H
#include <sys/types.h>

/// Punches a hole of `length` bytes at `offset` (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE):
/// the range reads as zeros and the file keeps its size. Returns 0, or -1 with errno set.
int remus_punch_hole(int fd, off_t offset, off_t length);

#endif
