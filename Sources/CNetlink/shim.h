// The part of libnl-3 / libnl-route-3 that RemusNetbuf uses, plus the kernel's tc constants.
// Everything here is a plain function, an opaque struct or an integer macro that Swift imports
// directly, so no C wrapper target is needed.
#include <netlink/netlink.h>
#include <netlink/errno.h>
#include <netlink/socket.h>
#include <netlink/cache.h>
#include <netlink/route/link.h>
#include <netlink/route/link/veth.h>
#include <netlink/route/tc.h>
#include <netlink/route/qdisc.h>
#include <netlink/route/qdisc/plug.h>
#include <netlink/route/classifier.h>
#include <netlink/route/cls/u32.h>
#include <netlink/route/action.h>
#include <netlink/route/act/mirred.h>

#include <linux/if_ether.h>        // ETH_P_ALL
#include <linux/pkt_sched.h>       // TC_H_ROOT, TC_H_INGRESS, TCQ_PLUG_*
#include <linux/pkt_cls.h>         // TC_ACT_STOLEN
#include <linux/tc_act/tc_mirred.h> // TCA_EGRESS_REDIR

#include <netpacket/packet.h>      // struct sockaddr_ll, PACKET_OUTGOING (testbed probes)
