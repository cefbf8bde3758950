#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/falloc.h>
#include "cdisk.h"

int remus_punch_hole(int fd, off_t offset, off_t length) {
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
}
