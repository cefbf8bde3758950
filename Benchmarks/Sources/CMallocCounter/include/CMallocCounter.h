#ifndef CMALLOCCOUNTER_H
#define CMALLOCCOUNTER_H

/// Number of malloc, calloc, realloc, posix_memalign, aligned_alloc and memalign calls so far.
long remus_bench_allocations(void);

#endif
