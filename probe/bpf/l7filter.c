// Flowscope L7 capture: a socket filter on a packet socket bound to an observed interface.
//
// It decides, per packet, what user space gets (the return value is the number of bytes to keep,
// 0 drops the packet for this socket only; the packet itself is never affected):
//
//   * TCP SYN/FIN/RST: kept (headers only unless they carry payload) for the connection lifecycle.
//   * TCP without payload (pure ACKs): dropped.
//   * TCP payload on a port under L7 visibility (tcp_ports, either end): kept, up to SNAPLEN bytes.
//   * TCP payload on any other port: the connection's state in `conns` decides:
//       L7      user space recognised a protocol: kept;
//       SKIP    user space found no protocol it parses (bulk data, TLS...): dropped here, so bulk
//               traffic costs user space nothing;
//       absent / undecided: the first DETECT_PACKETS payload packets are kept for detection, later
//               ones dropped until user space decides (so even before it reacts, a bulk transfer
//               cannot flood the ring).
//   * UDP to or from a port in udp_ports (DNS): kept.
//   * everything else: dropped.
//
// Every decision is counted in per-CPU counters (indexes shared with probe/l7capture.py).
// Only UAPI headers are used: the build headers may not match the running kernel.

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>

#ifndef SNAPLEN
#define SNAPLEN 2048
#endif
#ifndef CONN_ENTRIES
#define CONN_ENTRIES 65536
#endif
#ifndef DETECT_PACKETS
#define DETECT_PACKETS 16
#endif

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10

#define STATE_UNDECIDED 0
#define STATE_L7 1
#define STATE_SKIP 2

#define STAT_PASS_TCP 0          // TCP packets passed to user space
#define STAT_PASS_UDP 1          // UDP datagrams passed
#define STAT_PASS_BYTES 2        // bytes passed (after truncation)
#define STAT_SKIP_CONN 3         // payload packets of SKIP connections dropped
#define STAT_SKIP_CONN_BYTES 4   // their wire bytes
#define STAT_SKIP_UNDECIDED 5    // payload packets dropped while waiting for user space's decision
#define STAT_NO_PAYLOAD 6        // pure ACKs and other empty segments dropped
#define STAT_OTHER 7             // not IP / not TCP-UDP / UDP on other ports / unparsable
#define STAT_TRUNCATED 8         // packets longer than SNAPLEN (the tail is a gap for the parsers)
#define STAT_MAP_FULL 9          // conns insert failures
#define STAT_MAX 10

// One entry per connection *and* observation point: each interface's socket decides on its own (a
// connection between two observed endpoints passes through two host-side interfaces).
struct conn_key {
    __u32 addr_a[4];     // the lower (address, port) end, in network byte order
    __u32 addr_b[4];
    __u16 port_a;        // network byte order
    __u16 port_b;
    __u32 family;        // 4 or 6
    __u32 ifindex;
};

struct conn_state {
    __u32 state;         // STATE_*
    __u32 packets;       // payload packets passed while undecided
};

BPF_TABLE("lru_hash", struct conn_key, struct conn_state, conns, CONN_ENTRIES);
BPF_ARRAY(tcp_ports, __u8, 65536);   // host byte order port -> 1 when under L7 visibility
BPF_ARRAY(udp_ports, __u8, 65536);
BPF_PERCPU_ARRAY(stats, __u64, STAT_MAX);

static __always_inline void count(int idx, __u64 n)
{
    __u64 *v = stats.lookup(&idx);
    if (v)
        *v += n;
}

static __always_inline int port_on(void *map_lookup_result)
{
    __u8 *v = map_lookup_result;
    return v && *v;
}

static __always_inline int keep(struct __sk_buff *skb, int stat, __u32 len)
{
    __u32 n = skb->len < len ? skb->len : len;
    count(stat, 1);
    count(STAT_PASS_BYTES, n);
    return n;
}

// Orders the two ends so both directions of a connection share one key.
static __always_inline void normalise(struct conn_key *k)
{
    int swap = 0;
    int decided = 0;
    #pragma unroll
    for (int i = 0; i < 4; i++) {
        if (!decided && k->addr_a[i] != k->addr_b[i]) {
            swap = k->addr_a[i] > k->addr_b[i];
            decided = 1;
        }
    }
    if (!decided)
        swap = k->port_a > k->port_b;
    if (swap) {
        #pragma unroll
        for (int i = 0; i < 4; i++) {
            __u32 t = k->addr_a[i];
            k->addr_a[i] = k->addr_b[i];
            k->addr_b[i] = t;
        }
        __u16 p = k->port_a;
        k->port_a = k->port_b;
        k->port_b = p;
    }
}

int l7_filter(struct __sk_buff *skb)
{
    struct conn_key key = {};
    __u32 nh = 0;
    key.ifindex = skb->ifindex;
    __u8 proto;
    __u32 l4;
    __s32 l4len;
    __u16 h_proto = 0;

    // Packet sockets see the MAC header on Ethernet-like devices; headerless devices start at IP.
    if (bpf_skb_load_bytes(skb, 12, &h_proto, 2) == 0 && h_proto == skb->protocol)
        nh = ETH_HLEN;

    __u8 vbyte = 0;
    if (bpf_skb_load_bytes(skb, nh, &vbyte, 1) < 0)
        goto other;
    if ((vbyte >> 4) == 4) {
        __u8 ip[20];
        if (bpf_skb_load_bytes(skb, nh, ip, sizeof(ip)) < 0)
            goto other;
        __u32 ihl = (ip[0] & 0x0f) * 4;
        if (ihl < 20)
            goto other;
        if ((ip[6] & 0x1f) || ip[7])  // non-first fragment: no L4 header
            goto other;
        proto = ip[9];
        __builtin_memcpy(&key.addr_a[0], &ip[12], 4);
        __builtin_memcpy(&key.addr_b[0], &ip[16], 4);
        key.family = 4;
        l4 = nh + ihl;
        __u32 tot = ((__u32)ip[2] << 8) | ip[3];
        l4len = tot ? (__s32)tot - (__s32)ihl : (__s32)(skb->len - l4);
    } else if ((vbyte >> 4) == 6) {
        __u8 ip6[40];
        if (bpf_skb_load_bytes(skb, nh, ip6, sizeof(ip6)) < 0)
            goto other;
        proto = ip6[6];  // extension headers are not followed
        __builtin_memcpy(key.addr_a, &ip6[8], 16);
        __builtin_memcpy(key.addr_b, &ip6[24], 16);
        key.family = 6;
        l4 = nh + 40;
        __u32 plen = ((__u32)ip6[4] << 8) | ip6[5];
        l4len = plen ? (__s32)plen : (__s32)(skb->len - l4);  // 0: jumbogram / BIG TCP
    } else {
        goto other;
    }

    if (proto == IPPROTO_TCP) {
        __u8 th[14];
        if (bpf_skb_load_bytes(skb, l4, th, sizeof(th)) < 0)
            goto other;
        __u32 doff = (th[12] >> 4) * 4;
        __u8 flags = th[13];
        __s32 payload = l4len - (__s32)doff;
        __builtin_memcpy(&key.port_a, &th[0], 2);
        __builtin_memcpy(&key.port_b, &th[2], 2);
        __u32 sport = ((__u32)th[0] << 8) | th[1];
        __u32 dport = ((__u32)th[2] << 8) | th[3];

        if (flags & (TCP_SYN | TCP_FIN | TCP_RST)) {
            if ((flags & TCP_SYN) && !(flags & TCP_ACK)) {
                // A new connection: forget what was decided for an earlier one on this tuple.
                normalise(&key);
                conns.delete(&key);
            }
            if (payload <= 0)
                return keep(skb, STAT_PASS_TCP, l4 + doff);
            if (skb->len > SNAPLEN)
                count(STAT_TRUNCATED, 1);
            return keep(skb, STAT_PASS_TCP, SNAPLEN);
        }
        if (payload <= 0) {
            count(STAT_NO_PAYLOAD, 1);
            return 0;
        }
        if (port_on(tcp_ports.lookup(&sport)) || port_on(tcp_ports.lookup(&dport)))
            goto pass_tcp;

        normalise(&key);
        struct conn_state *st = conns.lookup(&key);
        if (st) {
            if (st->state == STATE_L7)
                goto pass_tcp;
            if (st->state == STATE_SKIP) {
                count(STAT_SKIP_CONN, 1);
                count(STAT_SKIP_CONN_BYTES, skb->len);
                return 0;
            }
            if (st->packets >= DETECT_PACKETS) {
                count(STAT_SKIP_UNDECIDED, 1);
                return 0;
            }
            st->packets += 1;
            goto pass_tcp;
        }
        struct conn_state fresh = {STATE_UNDECIDED, 1};
        if (conns.insert(&key, &fresh) != 0)
            count(STAT_MAP_FULL, 1);
pass_tcp:
        if (skb->len > SNAPLEN)
            count(STAT_TRUNCATED, 1);
        return keep(skb, STAT_PASS_TCP, SNAPLEN);
    }

    if (proto == IPPROTO_UDP) {
        __u8 uh[4];
        if (bpf_skb_load_bytes(skb, l4, uh, sizeof(uh)) < 0)
            goto other;
        __u32 sport = ((__u32)uh[0] << 8) | uh[1];
        __u32 dport = ((__u32)uh[2] << 8) | uh[3];
        if (port_on(udp_ports.lookup(&sport)) || port_on(udp_ports.lookup(&dport))) {
            if (skb->len > SNAPLEN)
                count(STAT_TRUNCATED, 1);
            return keep(skb, STAT_PASS_UDP, SNAPLEN);
        }
    }

other:
    count(STAT_OTHER, 1);
    return 0;
}
