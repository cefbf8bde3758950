// The part of the tun/tap interface that RemusNetbuf's TapDevice uses. Swift cannot call
// ioctl(2) (variadic) nor see TUNSETIFF and friends (function-like macros), so each ioctl is a
// small C function here. Every function returns 0 (or a file descriptor) on success and
// -errno on failure; none keeps state.
#ifndef CTAP_H
#define CTAP_H

#include <stdint.h>

/// Longest interface name, without the terminating NUL (IFNAMSIZ - 1).
#define CTAP_NAME_MAX 15

/// Opens /dev/net/tun and attaches to the existing persistent tap `name` as an IFF_TAP |
/// IFF_NO_PI queue. Never creates a device: -ENODEV when no interface `name` exists (checked
/// first, and again after attaching: a device the attach itself created is not persistent and
/// disappears when the descriptor is closed), -EINVAL when `name` is not a tap (TUNSETIFF on a
/// device of another kind), -EBUSY when another process is attached to it. Returns the
/// descriptor (O_CLOEXEC).
int ctap_attach(const char *name);

/// The interface's Ethernet address (SIOCGIFHWADDR) into mac[0..5].
int ctap_hardware_address(const char *name, uint8_t mac[6]);

/// The interface's primary IPv4 address and netmask (SIOCGIFADDR, SIOCGIFNETMASK), in network
/// byte order. -EADDRNOTAVAIL when it has none.
int ctap_ipv4_address(const char *name, uint32_t *address, uint32_t *netmask);

/// 1 when the interface is administratively up (IFF_UP), 0 when down.
int ctap_is_up(const char *name);

// For tests and tools only: remusd itself attaches to taps the operator created.

/// Creates a persistent tap `name` (TUNSETIFF, TUNSETPERSIST), as `ip tuntap add mode tap`.
int ctap_create_persistent(const char *name);

/// Deletes the persistent tap `name` (TUNSETPERSIST 0, as `ip tuntap del mode tap`).
int ctap_delete_persistent(const char *name);

/// Sets the interface's IPv4 address and netmask (network byte order) and brings it up (or
/// down, when `up` is 0).
int ctap_configure_ipv4(const char *name, uint32_t address, uint32_t netmask, int up);

#endif
