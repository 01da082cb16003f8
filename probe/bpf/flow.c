// Flowscope tc probe: per-flow state in the kernel, events only on state changes.
//
// Attached with clsact to ingress and egress of each observed interface (an endpoint's host-side veth).
// Per packet it updates one LRU hash entry (5-tuple + ifindex + direction -> counters, flags, times)
// and emits an event to a BPF ring buffer only when the flow's state changes:
//   NEW     first packet of the flow in this direction
//   FLAGS   a TCP flag seen for the first time in this direction
//   CLOSE   FIN or RST seen for the first time in this direction
//   UPDATE  the flow is still active UPDATE_NS after its last report (long flows, like Cilium's
//           monitor aggregation "medium")
// Idle and closed flows are expired by the agent, which drains the map in batches.
//
// Loss is counted, never hidden: failed ring buffer submits and failed map inserts go to per-CPU
// counters that the agent reports as LostEvents.
//
// Only UAPI headers are used: the build headers may not match the running kernel.

#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/in.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/icmp.h>
#include <uapi/linux/icmpv6.h>

#ifndef UPDATE_NS
#define UPDATE_NS 5000000000ULL
#endif
#ifndef FLOW_ENTRIES
#define FLOW_ENTRIES 65536
#endif
#ifndef RINGBUF_PAGES
#define RINGBUF_PAGES 1024
#endif

// Direction from the endpoint's point of view (the interface is the endpoint's host side).
#define DIR_INGRESS 1   // towards the endpoint: tc egress of the host-side interface
#define DIR_EGRESS 2    // from the endpoint: tc ingress of the host-side interface

#define EV_NEW 1
#define EV_FLAGS 2
#define EV_CLOSE 3
#define EV_UPDATE 4

#define REPLY_NO 0
#define REPLY_YES 1
#define REPLY_UNKNOWN 2

// Per-CPU counters (indexes shared with probe/events.py). Nothing is counted per packet here:
// the flow entries already count packets, and a per-packet counter would cost a map lookup.
#define STAT_UNUSED 0
#define STAT_EVENTS 1
#define STAT_RINGBUF_FAIL 2
#define STAT_MAP_FAIL 3
#define STAT_NON_IP 4
#define STAT_MAX 5

struct flow_key {
    __u32 saddr[4];
    __u32 daddr[4];
    __u16 sport;        // TCP/UDP/SCTP port; ICMP echo id (both ports) or type/code
    __u16 dport;
    __u32 ifindex;
    __u8 family;        // 4 or 6
    __u8 proto;         // IPPROTO_*
    __u8 dir;           // DIR_INGRESS / DIR_EGRESS
    __u8 pad;
};

struct flow_val {
    __u64 first_ns;
    __u64 last_ns;
    __u64 report_ns;    // last time an event was emitted for this flow
    __u64 packets;
    __u64 bytes;
    __u16 flags_seen;   // TCP flags seen so far (NS in bit 8)
    __u8 is_reply;
    __u8 icmp_type;
    __u8 icmp_code;
    __u8 pad[3];
};

struct event {
    struct flow_key key;
    __u64 ts_ns;
    __u64 first_ns;
    __u64 packets;
    __u64 bytes;
    __u64 rev_packets;  // the reverse direction of the same connection on the same interface
    __u64 rev_bytes;
    __u64 rev_first_ns;
    __u16 tcp_flags;    // flags of the packet that caused the event
    __u16 flags_seen;
    __u8 type;          // EV_*
    __u8 is_reply;
    __u8 icmp_type;
    __u8 icmp_code;
    __u32 pkt_len;
    __u32 pad;
};

BPF_TABLE("lru_hash", struct flow_key, struct flow_val, flows, FLOW_ENTRIES);
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_PERCPU_ARRAY(stats, __u64, STAT_MAX);

static __always_inline void stat_inc(int idx)
{
    __u64 *v = stats.lookup(&idx);
    if (v)
        *v += 1;
}

static __always_inline void reverse_key(const struct flow_key *k, struct flow_key *r)
{
    #pragma unroll
    for (int i = 0; i < 4; i++) {
        r->saddr[i] = k->daddr[i];
        r->daddr[i] = k->saddr[i];
    }
    r->sport = k->dport;
    r->dport = k->sport;
    r->ifindex = k->ifindex;
    r->family = k->family;
    r->proto = k->proto;
    r->dir = k->dir == DIR_INGRESS ? DIR_EGRESS : DIR_INGRESS;
    r->pad = 0;
}

static __always_inline void emit(struct flow_key *key, struct flow_val *v, __u8 type, __u16 tcp_flags,
                                 __u64 now, __u32 len)
{
    struct event ev = {};
    __builtin_memcpy(&ev.key, key, sizeof(ev.key));
    ev.ts_ns = now;
    ev.first_ns = v->first_ns;
    ev.packets = v->packets;
    ev.bytes = v->bytes;
    ev.tcp_flags = tcp_flags;
    ev.flags_seen = v->flags_seen;
    ev.type = type;
    ev.is_reply = v->is_reply;
    ev.icmp_type = v->icmp_type;
    ev.icmp_code = v->icmp_code;
    ev.pkt_len = len;

    struct flow_key rkey = {};
    reverse_key(key, &rkey);
    struct flow_val *rv = flows.lookup(&rkey);
    if (rv) {
        ev.rev_packets = rv->packets;
        ev.rev_bytes = rv->bytes;
        ev.rev_first_ns = rv->first_ns;
    }

    // No wakeup from the packet path (a wakeup costs microseconds per event): the agent drains the
    // ring on a short timer instead. The ring is sized for the events of several timer periods.
    if (events.ringbuf_output(&ev, sizeof(ev), BPF_RB_NO_WAKEUP) != 0)
        stat_inc(STAT_RINGBUF_FAIL);
    else
        stat_inc(STAT_EVENTS);
}

static __always_inline int handle(struct __sk_buff *skb, __u8 dir)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    struct flow_key key = {};
    __u8 icmp_type = 0, icmp_code = 0, is_echo_reply = 0, is_echo_request = 0;
    __u16 tcp_flags = 0;
    void *l4;

    if ((void *)(eth + 1) > data_end)
        return TC_ACT_OK;

    __u16 proto = eth->h_proto;
    if (proto == bpf_htons(ETH_P_IP)) {
        struct iphdr *ip = (void *)(eth + 1);
        if ((void *)(ip + 1) > data_end)
            return TC_ACT_OK;
        key.family = 4;
        key.proto = ip->protocol;
        key.saddr[0] = ip->saddr;
        key.daddr[0] = ip->daddr;
        __u32 ihl = ip->ihl * 4;
        if (ihl < sizeof(*ip))
            return TC_ACT_OK;
        // Non-first fragments carry no L4 header.
        if (ip->frag_off & bpf_htons(0x1fff))
            goto account;
        l4 = (void *)ip + ihl;
    } else if (proto == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = (void *)(eth + 1);
        if ((void *)(ip6 + 1) > data_end)
            return TC_ACT_OK;
        key.family = 6;
        __builtin_memcpy(key.saddr, &ip6->saddr, 16);
        __builtin_memcpy(key.daddr, &ip6->daddr, 16);
        __u8 nh = ip6->nexthdr;
        l4 = (void *)(ip6 + 1);
        // Skip up to 3 common extension headers.
        #pragma unroll
        for (int i = 0; i < 3; i++) {
            if (nh != IPPROTO_HOPOPTS && nh != IPPROTO_ROUTING && nh != IPPROTO_DSTOPTS && nh != IPPROTO_FRAGMENT)
                break;
            __u8 *ext = l4;
            if ((void *)(ext + 8) > data_end)
                return TC_ACT_OK;
            if (nh == IPPROTO_FRAGMENT) {
                nh = ext[0];
                l4 = ext + 8;
                if (((ext[2] << 8) | ext[3]) & 0xfff8) // not the first fragment
                    goto account_proto;
                continue;
            }
            nh = ext[0];
            l4 = ext + (ext[1] + 1) * 8;
        }
    account_proto:
        key.proto = nh;
    } else {
        stat_inc(STAT_NON_IP);
        return TC_ACT_OK;
    }

    if (key.proto == IPPROTO_TCP) {
        struct tcphdr *tcp = l4;
        if ((void *)(tcp + 1) > data_end)
            goto account;
        key.sport = bpf_ntohs(tcp->source);
        key.dport = bpf_ntohs(tcp->dest);
        __u8 *raw = (__u8 *)tcp;
        tcp_flags = raw[13] | ((raw[12] & 1) << 8);
    } else if (key.proto == IPPROTO_UDP || key.proto == 132 /* SCTP: ports in the same place */) {
        struct udphdr *udp = l4;
        if ((void *)(udp + 1) > data_end)
            goto account;
        key.sport = bpf_ntohs(udp->source);
        key.dport = bpf_ntohs(udp->dest);
    } else if (key.proto == IPPROTO_ICMP || key.proto == IPPROTO_ICMPV6) {
        __u8 *icmp = l4;
        if ((void *)(icmp + 8) > data_end)
            goto account;
        icmp_type = icmp[0];
        icmp_code = icmp[1];
        __u16 id = (icmp[4] << 8) | icmp[5];
        if (key.proto == IPPROTO_ICMP) {
            is_echo_request = icmp_type == 8;
            is_echo_reply = icmp_type == 0;
        } else {
            is_echo_request = icmp_type == 128;
            is_echo_reply = icmp_type == 129;
        }
        if (is_echo_request || is_echo_reply) {
            key.sport = id;
            key.dport = id;
        } else {
            key.sport = icmp_type;
            key.dport = icmp_code;
        }
    }

account:;
    __u64 now = bpf_ktime_get_ns();
    __u32 len = skb->len;
    key.ifindex = skb->ifindex;
    key.dir = dir;

    struct flow_val *v = flows.lookup(&key);
    if (!v) {
        struct flow_val nv = {};
        nv.first_ns = now;
        nv.last_ns = now;
        nv.report_ns = now;
        nv.packets = 1;
        nv.bytes = len;
        nv.flags_seen = tcp_flags;
        nv.icmp_type = icmp_type;
        nv.icmp_code = icmp_code;
        if (key.proto == IPPROTO_TCP && (tcp_flags & 0x12) == 0x02) {
            nv.is_reply = REPLY_NO;            // SYN
        } else if (key.proto == IPPROTO_TCP && (tcp_flags & 0x12) == 0x12) {
            nv.is_reply = REPLY_YES;           // SYN-ACK
        } else if (is_echo_request) {
            nv.is_reply = REPLY_NO;
        } else if (is_echo_reply) {
            nv.is_reply = REPLY_YES;
        } else {
            struct flow_key rkey = {};
            reverse_key(&key, &rkey);
            struct flow_val *rv = flows.lookup(&rkey);
            if (rv)
                nv.is_reply = rv->is_reply == REPLY_UNKNOWN ? REPLY_UNKNOWN : !rv->is_reply;
            else
                nv.is_reply = key.proto == IPPROTO_TCP ? REPLY_UNKNOWN : REPLY_NO;
        }
        if (flows.update(&key, &nv) != 0) {
            stat_inc(STAT_MAP_FAIL);
            return TC_ACT_OK;
        }
        emit(&key, &nv, EV_NEW, tcp_flags, now, len);
        return TC_ACT_OK;
    }

    __sync_fetch_and_add(&v->packets, 1);
    __sync_fetch_and_add(&v->bytes, len);
    v->last_ns = now;
    if (icmp_type || icmp_code) {
        v->icmp_type = icmp_type;
        v->icmp_code = icmp_code;
    }

    __u16 fresh = tcp_flags & ~v->flags_seen;
    if (fresh) {
        v->flags_seen |= fresh;
        v->report_ns = now;
        emit(&key, v, (fresh & 0x05) ? EV_CLOSE : EV_FLAGS, tcp_flags, now, len);
        return TC_ACT_OK;
    }
    if (now - v->report_ns >= UPDATE_NS) {
        v->report_ns = now;
        emit(&key, v, EV_UPDATE, tcp_flags, now, len);
    }
    return TC_ACT_OK;
}

int fs_ingress(struct __sk_buff *skb) { return handle(skb, DIR_EGRESS); }
int fs_egress(struct __sk_buff *skb) { return handle(skb, DIR_INGRESS); }
