// The one malloc tuning remusd does, in C because Glibc's Swift module map leaves malloc.h out.
#include "cmalloc.h"

#include <malloc.h>

int remus_malloc_keep_freed(size_t mmap_threshold, size_t trim_threshold) {
    int mmap_ok = mallopt(M_MMAP_THRESHOLD, (int)mmap_threshold);
    int trim_ok = mallopt(M_TRIM_THRESHOLD, (int)trim_threshold);
    return mmap_ok == 1 && trim_ok == 1;
}
