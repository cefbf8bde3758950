#ifndef CMALLOC_H
#define CMALLOC_H
#include <stddef.h>

/// Sets glibc's mmap threshold and trim threshold (mallopt M_MMAP_THRESHOLD, M_TRIM_THRESHOLD),
/// which also stops glibc from moving them itself. Returns 1 when both were taken.
int remus_malloc_keep_freed(size_t mmap_threshold, size_t trim_threshold);

#endif
