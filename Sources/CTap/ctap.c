#include "ctap.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/if_tun.h>
#include <net/if.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

_Static_assert(CTAP_NAME_MAX + 1 == IFNAMSIZ, "CTAP_NAME_MAX must be IFNAMSIZ - 1");

static int fill_ifreq(struct ifreq *ifr, const char *name) {
    size_t length = strlen(name);
    if (length == 0 || length > CTAP_NAME_MAX) return -EINVAL;
    memset(ifr, 0, sizeof *ifr);
    memcpy(ifr->ifr_name, name, length);
    return 0;
}

/// One ioctl on a throwaway AF_INET datagram socket (the SIOC*IF* requests need a socket).
static int socket_ioctl(unsigned long request, struct ifreq *ifr) {
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -errno;
    int rc = ioctl(fd, request, ifr) < 0 ? -errno : 0;
    close(fd);
    return rc;
}

static int open_tun(const char *name, short flags, struct ifreq *ifr) {
    int rc = fill_ifreq(ifr, name);
    if (rc < 0) return rc;
    ifr->ifr_flags = flags;
    int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
    if (fd < 0) return -errno;
    if (ioctl(fd, TUNSETIFF, ifr) < 0) {
        rc = -errno;
        close(fd);
        return rc;
    }
    return fd;
}

int ctap_attach(const char *name) {
    struct ifreq ifr;
    int rc = fill_ifreq(&ifr, name);
    if (rc < 0) return rc;
    if (if_nametoindex(name) == 0) return -ENODEV;
    int fd = open_tun(name, IFF_TAP | IFF_NO_PI, &ifr);
    if (fd < 0) return fd;
    // The device may have vanished between the check and TUNSETIFF, which then created a new,
    // non-persistent one: refuse it (closing the descriptor deletes it again).
    if (ioctl(fd, TUNGETIFF, &ifr) < 0 || !(ifr.ifr_flags & IFF_PERSIST)) {
        close(fd);
        return -ENODEV;
    }
    return fd;
}

int ctap_hardware_address(const char *name, uint8_t mac[6]) {
    struct ifreq ifr;
    int rc = fill_ifreq(&ifr, name);
    if (rc < 0) return rc;
    if ((rc = socket_ioctl(SIOCGIFHWADDR, &ifr)) < 0) return rc;
    memcpy(mac, ifr.ifr_hwaddr.sa_data, 6);
    return 0;
}

int ctap_ipv4_address(const char *name, uint32_t *address, uint32_t *netmask) {
    struct ifreq ifr;
    int rc = fill_ifreq(&ifr, name);
    if (rc < 0) return rc;
    ifr.ifr_addr.sa_family = AF_INET;
    if ((rc = socket_ioctl(SIOCGIFADDR, &ifr)) < 0) return rc;
    *address = ((struct sockaddr_in *)&ifr.ifr_addr)->sin_addr.s_addr;
    fill_ifreq(&ifr, name);
    ifr.ifr_addr.sa_family = AF_INET;
    if ((rc = socket_ioctl(SIOCGIFNETMASK, &ifr)) < 0) return rc;
    *netmask = ((struct sockaddr_in *)&ifr.ifr_netmask)->sin_addr.s_addr;
    return 0;
}

int ctap_is_up(const char *name) {
    struct ifreq ifr;
    int rc = fill_ifreq(&ifr, name);
    if (rc < 0) return rc;
    if ((rc = socket_ioctl(SIOCGIFFLAGS, &ifr)) < 0) return rc;
    return (ifr.ifr_flags & IFF_UP) ? 1 : 0;
}

int ctap_create_persistent(const char *name) {
    struct ifreq ifr;
    int fd = open_tun(name, IFF_TAP | IFF_NO_PI, &ifr);
    if (fd < 0) return fd;
    int rc = ioctl(fd, TUNSETPERSIST, 1) < 0 ? -errno : 0;
    close(fd);
    return rc;
}

int ctap_delete_persistent(const char *name) {
    struct ifreq ifr;
    int fd = open_tun(name, IFF_TAP | IFF_NO_PI, &ifr);
    if (fd < 0) return fd;
    int rc = ioctl(fd, TUNSETPERSIST, 0) < 0 ? -errno : 0;
    close(fd);
    return rc;
}

int ctap_configure_ipv4(const char *name, uint32_t address, uint32_t netmask, int up) {
    struct ifreq ifr;
    int rc = fill_ifreq(&ifr, name);
    if (rc < 0) return rc;
    struct sockaddr_in *in = (struct sockaddr_in *)&ifr.ifr_addr;
    in->sin_family = AF_INET;
    in->sin_addr.s_addr = address;
    if ((rc = socket_ioctl(SIOCSIFADDR, &ifr)) < 0) return rc;
    fill_ifreq(&ifr, name);
    in->sin_family = AF_INET;
    in->sin_addr.s_addr = netmask;
    if ((rc = socket_ioctl(SIOCSIFNETMASK, &ifr)) < 0) return rc;
    fill_ifreq(&ifr, name);
    if ((rc = socket_ioctl(SIOCGIFFLAGS, &ifr)) < 0) return rc;
    if (up) ifr.ifr_flags |= IFF_UP;
    else ifr.ifr_flags &= ~IFF_UP;
    return socket_ioctl(SIOCSIFFLAGS, &ifr);
}
