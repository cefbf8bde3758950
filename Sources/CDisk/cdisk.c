#define _GNU_SOURCE
#include <fcntl.h>
#include <errno.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <linux/loop.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
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

int remus_zero_range(int fd, off_t offset, off_t length) {
    return fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length);
}

int remus_block_device_size(int fd, unsigned long long *size_bytes) {
    uint64_t size = 0;
    if (ioctl(fd, BLKGETSIZE64, &size) < 0) return -1;
    *size_bytes = size;
    return 0;
}

int remus_block_device_drop_cache(int fd) { return ioctl(fd, BLKFLSBUF, 0); }

int remus_block_device_sector_size(int fd, unsigned int *bytes) {
    int size = 0;
    if (ioctl(fd, BLKSSZGET, &size) < 0) return -1;
    *bytes = (unsigned int)size;
    return 0;
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

int remus_loop_attach(int backing_fd, int read_only, int *number) {
    int control = open("/dev/loop-control", O_RDWR | O_CLOEXEC);
    if (control < 0) return -1;
    for (int attempt = 0; attempt < 8; attempt++) {
        int n = ioctl(control, LOOP_CTL_GET_FREE);
        if (n < 0) break;
        char path[32];
        snprintf(path, sizeof path, "/dev/loop%d", n);
        int loop = open(path, (read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC);
        if (loop < 0) break;
        if (ioctl(loop, LOOP_SET_FD, backing_fd) < 0) {
            int code = errno;
            close(loop);
            if (code == EBUSY) continue;  /* taken by someone else meanwhile */
            errno = code;
            close(control);
            return -1;
        }
        struct loop_info64 info;
        memset(&info, 0, sizeof info);
        info.lo_flags = LO_FLAGS_AUTOCLEAR | (read_only ? LO_FLAGS_READ_ONLY : 0);
        if (ioctl(loop, LOOP_SET_STATUS64, &info) < 0) {
            int code = errno;
            ioctl(loop, LOOP_CLR_FD, 0);
            close(loop);
            close(control);
            errno = code;
            return -1;
        }
        close(control);
        *number = n;
        return loop;
    }
    int code = errno == 0 ? EBUSY : errno;
    close(control);
    errno = code;
    return -1;
}
