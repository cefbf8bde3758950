// fallocate(2) hole punching: glibc declares fallocate only under _GNU_SOURCE, which Swift's
// Glibc module does not set, and the FALLOC_FL_* flags live in <linux/falloc.h>.
#ifndef CDISK_H
#define CDISK_H
#include <sys/types.h>

/// Punches a hole of `length` bytes at `offset` (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE):
/// the range reads as zeros and the file keeps its size. Returns 0, or -1 with errno set.
int remus_punch_hole(int fd, off_t offset, off_t length);
/// Zeroes `length` bytes at `offset` without writing them where the storage can
/// (FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE; on a block device, WRITE_ZEROES).
/// Returns 0, or -1 with errno set.
int remus_zero_range(int fd, off_t offset, off_t length);

/// A block device's size in bytes (BLKGETSIZE64): its `st_size` is 0. Returns 0, or -1 with
/// errno set.
int remus_block_device_size(int fd, unsigned long long *size_bytes);
/// Writes back and drops the block device's page cache (BLKFLSBUF), so reads through `fd` see
/// what others wrote to the device directly (blkback writes around the page cache).
/// Returns 0, or -1 with errno set.
int remus_block_device_drop_cache(int fd);
/// A block device's logical sector size in bytes (BLKSSZGET). Returns 0, or -1 with errno set.
int remus_block_device_sector_size(int fd, unsigned int *bytes);

/// The kernel's NBD client (linux/nbd.h), driven by ioctls on an open /dev/nbdN: `_IO` is a
/// function-like macro Swift cannot import. Each returns the ioctl's result (-1 with errno).
/// Gives the device its socket, block size, size and transmission flags, and a request timeout
/// in seconds (0: none).
int remus_nbd_configure(int nbd_fd, int sock_fd, unsigned long block_size, unsigned long long size_bytes,
                        unsigned long flags, unsigned long timeout_s);
/// Serves the device until it is disconnected (blocks; call on a thread of its own).
int remus_nbd_do_it(int nbd_fd);
/// Asks the kernel to end the session (NBD_DISCONNECT); `remus_nbd_do_it` then returns.
int remus_nbd_disconnect(int nbd_fd);
/// Drops the socket and queued requests (NBD_CLEAR_QUE, NBD_CLEAR_SOCK) after the session ended.
int remus_nbd_clear(int nbd_fd);
/// Marks the calling thread an I/O flusher (PR_SET_IO_FLUSHER): its allocations never wait for
/// the writeback it serves.
int remus_set_io_flusher(void);

/// Attaches the open file `backing_fd` to a free loop device with LO_FLAGS_AUTOCLEAR (the kernel
/// detaches it when its last user closes it), read-only when `read_only`. Returns the loop
/// device's descriptor (close-on-exec) and writes its number to `*number`, or -1 with errno set.
/// A device another process took between LOOP_CTL_GET_FREE and LOOP_SET_FD is skipped.
int remus_loop_attach(int backing_fd, int read_only, int *number);

#endif
