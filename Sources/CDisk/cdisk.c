#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/nbd.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include "cdisk.h"

#ifndef PR_SET_IO_FLUSHER
#define PR_SET_IO_FLUSHER 57
#endif

int remus_punch_hole(int fd, off_t offset, off_t length) {
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
}

int remus_nbd_configure(int nbd_fd, int sock_fd, unsigned long block_size, unsigned long long size_bytes,
                        unsigned long flags, unsigned long timeout_s) {
    if (ioctl(nbd_fd, NBD_SET_BLKSIZE, block_size) < 0) return -1;
    if (ioctl(nbd_fd, NBD_SET_SIZE_BLOCKS, (unsigned long)(size_bytes / block_size)) < 0) return -1;
    if (ioctl(nbd_fd, NBD_SET_FLAGS, flags) < 0) return -1;
    if (timeout_s > 0 && ioctl(nbd_fd, NBD_SET_TIMEOUT, timeout_s) < 0) return -1;
    return ioctl(nbd_fd, NBD_SET_SOCK, (unsigned long)sock_fd);
}

int remus_nbd_do_it(int nbd_fd) { return ioctl(nbd_fd, NBD_DO_IT); }

int remus_nbd_disconnect(int nbd_fd) { return ioctl(nbd_fd, NBD_DISCONNECT); }

int remus_nbd_clear(int nbd_fd) {
    ioctl(nbd_fd, NBD_CLEAR_QUE);
    return ioctl(nbd_fd, NBD_CLEAR_SOCK);
}

int remus_set_io_flusher(void) { return prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0); }
