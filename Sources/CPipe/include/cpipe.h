#ifndef CPIPE_H
#define CPIPE_H
#include <stddef.h>
#include <sys/types.h>
#include <sys/uio.h>

/// vmsplice(2) on `fd` (the write end of a pipe) with flags 0: hands the pipe references to the
/// pages of `count` bytes at `base`. Returns bytes spliced, or -1 with errno.
ssize_t remus_vmsplice(int fd, const void *base, size_t count);

#endif
