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
// A SYN on a tuple whose connection has closed (ports are reused within seconds) replaces the old
// entries with a NEW flow, as a connection tracker re-opens a closed entry.
// Idle and closed flows are expired by the agent, which drains the map in batches.
//
// Loss is counted, never hidden: failed ring buffer submits and failed map inserts go to per-CPU
// counters that the agent reports as LostEvents.
//
// Policy enforcement (maps written by enforcer/datapath.py from enforcer/compiler.py's CompiledPolicy):
//   policy_endpoints  ifindex -> (endpoint identity, FLAG_* of the compiler)
//   policy_ipcache    LPM trie: address prefix -> identity (every lookup hits: 0.0.0.0/0 and ::/0 are world)
//   policy_map        LPM trie: (endpoint, direction, deny, peer, proto, port block) -> (policy id, audit, match type)
// The policy is consulted only when a flow entry is created, and only when the endpoint has a policy in
// that direction: the flow map is the connection tracking table. Established flows and replies of
// tracked connections (the reverse entry exists) pass without a lookup; the verdict, policy id and match
// type are stored in the flow entry and reported with its events. Denied packets create no entry (a
// flood of them cannot evict tracked connections), are dropped (TC_ACT_SHOT) and every one of them is
// reported as an EV_DROP event (no aggregation). Audit verdicts pass and are stored as AUDIT.
// IPv6 neighbour discovery and MLD are never subject to policy. Known gaps (as Cilium without its
// "related" CT and fragment tracking): ICMP errors about a tracked connection and non-first IP
// fragments are looked up as flows of their own (ICMP type as the port; fragments with port 0).
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

// TCP flags whose first sighting in a direction produces an event (Cilium's monitor-aggregation-flags;
// default all). Flags outside the mask are still recorded in flags_seen.
#ifndef REPORT_FLAGS
#define REPORT_FLAGS 0x1ff
#endif
#ifndef UPDATE_NS
#define UPDATE_NS 5000000000ULL
#endif
#ifndef FLOW_ENTRIES
#define FLOW_ENTRIES 65536
#endif
#ifndef RINGBUF_PAGES
#define RINGBUF_PAGES 1024
#endif
#ifndef POLICY_ENDPOINTS
#define POLICY_ENDPOINTS 16384
#endif
#ifndef POLICY_IPCACHE
#define POLICY_IPCACHE 65536
#endif
#ifndef POLICY_ENTRIES
#define POLICY_ENTRIES 262144
#endif

// Direction from the endpoint's point of view (the interface is the endpoint's host side).
#define DIR_INGRESS 1   // towards the endpoint: tc egress of the host-side interface
#define DIR_EGRESS 2    // from the endpoint: tc ingress of the host-side interface

#define EV_NEW 1
#define EV_FLAGS 2
#define EV_CLOSE 3
#define EV_UPDATE 4
#define EV_DROP 5       // one per dropped packet (no flow entry exists for it)

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
#define STAT_POLICY_DROP 5   // packets dropped by policy (each one also produces an EV_DROP event)
#define STAT_SHED 6          // FLAGS/UPDATE events not emitted because the ring was full moments ago
#define STAT_MAX 7
#define SHED_NS 100000000ULL // after a failed submit, shed FLAGS/UPDATE events for this long

// Hubble's verdict and drop reason numbers.
#define VERDICT_FORWARDED 1
#define VERDICT_DROPPED 2
#define VERDICT_AUDIT 4
#define DROP_POLICY_DENIED 133
#define DROP_POLICY_DENY 181

// Endpoint flags (enforcer/compiler.py FLAG_*).
#define FLAG_INGRESS_POLICY 0x01
#define FLAG_EGRESS_POLICY 0x02
#define FLAG_INGRESS_AUDIT_POLICY 0x04
#define FLAG_EGRESS_AUDIT_POLICY 0x08
#define FLAG_INGRESS_DENY 0x10
#define FLAG_EGRESS_DENY 0x20
#define FLAG_AUDIT 0x40
#define FLAGS_INGRESS (FLAG_INGRESS_POLICY | FLAG_INGRESS_AUDIT_POLICY | FLAG_INGRESS_DENY)
#define FLAGS_EGRESS (FLAG_EGRESS_POLICY | FLAG_EGRESS_AUDIT_POLICY | FLAG_EGRESS_DENY)

// Policy state of a flow entry / event (pflags).
#define PF_VERDICT 0x01      // a policy verdict was computed when the entry was created
#define PF_REASON_DENY 0x02  // the (would-be) drop reason is an explicit deny rule, else no allow
#define PF_CT_REPLY 0x04     // passed as the reply of a tracked connection, verdict taken from it

// LPM key bits before the port: endpoint(32) + direction, deny, proto, pad (32) + peer (32).
#define POLICY_FIXED_BITS 96

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
    __u8 verdict;       // 0 (no policy: forwarded), VERDICT_FORWARDED, VERDICT_AUDIT
    __u8 match_type;    // Hubble's policy_match_type of the deciding entry
    __u8 pflags;        // PF_*
    __u32 policy_id;    // deciding policy (0: none)
    __u32 peer_id;      // the peer's identity when a verdict was computed
    __u64 report_packets; // packets when the last event was emitted (the agent's expiry skips a final
                          // record that would repeat it)
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
    __u32 policy_id;
    __u32 peer_id;
    __u8 verdict;       // VERDICT_* (0: no policy)
    __u8 drop_reason;   // DROP_POLICY_* for DROPPED and AUDIT, else 0
    __u8 match_type;
    __u8 pflags;
};

struct ep_info {
    __u32 identity;
    __u8 flags;         // FLAG_*
    __u8 pad[3];
};

struct ipc_key {
    __u32 prefixlen;    // 32 + address prefix length
    __u8 family;        // 4 or 6
    __u8 pad[3];
    __u32 addr[4];
};

struct policy_key {
    __u32 prefixlen;    // POLICY_FIXED_BITS + port prefix length (0..16)
    __u32 endpoint;     // local endpoint identity
    __u8 direction;     // 0 ingress, 1 egress
    __u8 deny;
    __u8 proto;         // 0: any protocol (then port block 0/0)
    __u8 pad;
    __u32 peer;         // 0: any peer
    __be16 port;        // big-endian: the prefix bits are the port's high bits
    __u16 pad2;
};

struct policy_value {
    __u32 policy_id;
    __u8 audit;
    __u8 match_type;
    __u16 pad;
};

struct verdict_info {
    __u32 policy_id;
    __u32 peer_id;
    __u8 verdict;
    __u8 drop_reason;
    __u8 match_type;
    __u8 pflags;
};

BPF_TABLE("lru_hash", struct flow_key, struct flow_val, flows, FLOW_ENTRIES);
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_PERCPU_ARRAY(stats, __u64, STAT_MAX);
BPF_ARRAY(ring_full_until, __u64, 1);  // a failed submit sets it to now + SHED_NS
BPF_HASH(policy_endpoints, __u32, struct ep_info, POLICY_ENDPOINTS);
BPF_LPM_TRIE(policy_ipcache, struct ipc_key, __u32, POLICY_IPCACHE);
BPF_LPM_TRIE(policy_map, struct policy_key, struct policy_value, POLICY_ENTRIES);

static __always_inline void stat_inc(int idx)
{
    __u64 *v = stats.lookup(&idx);
    if (v)
        *v += 1;
}

// An overloaded ring keeps its room for what matters most: for SHED_NS after a submit failed, the first
// sighting of a TCP flag and periodic updates are counted (STAT_SHED, reported as lost) instead of
// queued, so new flows, closes and drops still fit. The flow entry keeps the flags and counters either
// way; its final record carries them.
static __always_inline int ring_shedding(__u64 now)
{
    int zero = 0;
    __u64 *until = ring_full_until.lookup(&zero);
    return until && (__s64)(*until - now) > 0;
}

static __always_inline void ring_submit_failed(__u64 now)
{
    int zero = 0;
    __u64 *until = ring_full_until.lookup(&zero);
    stat_inc(STAT_RINGBUF_FAIL);
    if (until)
        *until = now + SHED_NS;
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

// Returns whether the event was queued.
static __always_inline int emit(struct flow_key *key, struct flow_val *v, __u8 type, __u16 tcp_flags,
                                __u64 now, __u32 len)
{
    if ((type == EV_FLAGS || type == EV_UPDATE) && ring_shedding(now)) {
        stat_inc(STAT_SHED);
        return 0;
    }
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
    ev.verdict = v->verdict;
    ev.match_type = v->match_type;
    ev.pflags = v->pflags;
    ev.policy_id = v->policy_id;
    ev.peer_id = v->peer_id;
    if (v->verdict == VERDICT_AUDIT)
        ev.drop_reason = (v->pflags & PF_REASON_DENY) ? DROP_POLICY_DENY : DROP_POLICY_DENIED;

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
    if (events.ringbuf_output(&ev, sizeof(ev), BPF_RB_NO_WAKEUP) != 0) {
        ring_submit_failed(now);
        return 0;
    }
    stat_inc(STAT_EVENTS);
    return 1;
}

// A dropped packet: one event each, never aggregated. There is no flow entry, so no reverse counters.
static __always_inline void emit_drop(struct flow_key *key, struct verdict_info *vi, __u16 tcp_flags,
                                      __u8 icmp_type, __u8 icmp_code, __u64 now, __u32 len)
{
    struct event ev = {};
    __builtin_memcpy(&ev.key, key, sizeof(ev.key));
    ev.ts_ns = now;
    ev.first_ns = now;
    ev.packets = 1;
    ev.bytes = len;
    ev.tcp_flags = tcp_flags;
    ev.flags_seen = tcp_flags;
    ev.type = EV_DROP;
    ev.is_reply = REPLY_NO;
    ev.icmp_type = icmp_type;
    ev.icmp_code = icmp_code;
    ev.pkt_len = len;
    ev.verdict = VERDICT_DROPPED;
    ev.drop_reason = vi->drop_reason;
    ev.match_type = vi->match_type;
    ev.pflags = vi->pflags;
    ev.policy_id = vi->policy_id;
    ev.peer_id = vi->peer_id;
    stat_inc(STAT_POLICY_DROP);
    if (events.ringbuf_output(&ev, sizeof(ev), BPF_RB_NO_WAKEUP) != 0)
        ring_submit_failed(now);
    else
        stat_inc(STAT_EVENTS);
}

static __always_inline __u32 peer_identity(const __u32 *addr, __u8 family)
{
    struct ipc_key k = {};
    k.family = family;
    if (family == 4) {
        k.prefixlen = 32 + 32;
        k.addr[0] = addr[0];
    } else {
        k.prefixlen = 32 + 128;
        k.addr[0] = addr[0];
        k.addr[1] = addr[1];
        k.addr[2] = addr[2];
        k.addr[3] = addr[3];
    }
    __u32 *id = policy_ipcache.lookup(&k);
    return id ? *id : 2;  // world
}

// Walk the four levels in Cilium's order (L3+L4, L4-only, L3-only, all); stop at the first enforcing
// entry, remember the first audit-mode one. Returns 1 when an enforcing entry was found.
static __always_inline int policy_walk(struct policy_key *k, __u32 peer, __u8 proto, __u16 port,
                                       struct policy_value *enforced, struct policy_value *audited,
                                       int *has_audited)
{
    #pragma unroll
    for (int lvl = 0; lvl < 4; lvl++) {
        k->peer = (lvl == 0 || lvl == 2) ? peer : 0;
        k->proto = lvl < 2 ? proto : 0;
        k->port = lvl < 2 ? bpf_htons(port) : 0;
        struct policy_value *e = policy_map.lookup(k);
        if (!e)
            continue;
        if (!e->audit) {
            *enforced = *e;
            return 1;
        }
        if (!*has_audited) {
            *audited = *e;
            *has_audited = 1;
        }
    }
    return 0;
}

// The verdict for the first packet of a flow at an endpoint (enforcer/decide.py is the reference).
static __always_inline void policy_decide(const struct ep_info *ep, __u8 dir, __u32 peer, __u8 proto,
                                          __u16 port, struct verdict_info *vi)
{
    __u8 pdir = dir == DIR_INGRESS ? 0 : 1;
    __u8 flags = ep->flags;
    __u8 f_policy = pdir ? FLAG_EGRESS_POLICY : FLAG_INGRESS_POLICY;
    __u8 f_audit_policy = pdir ? FLAG_EGRESS_AUDIT_POLICY : FLAG_INGRESS_AUDIT_POLICY;
    __u8 f_deny = pdir ? FLAG_EGRESS_DENY : FLAG_INGRESS_DENY;
    struct policy_key k = {};
    k.prefixlen = POLICY_FIXED_BITS + 16;
    k.endpoint = ep->identity;
    k.direction = pdir;
    struct policy_value deny = {}, adeny = {}, allow = {}, aallow = {};
    int has_deny = 0, has_adeny = 0, has_allow = 0, has_aallow = 0;
    if (flags & f_deny) {
        k.deny = 1;
        has_deny = policy_walk(&k, peer, proto, port, &deny, &adeny, &has_adeny);
    }
    int policy_on = (flags & f_policy) != 0;
    int audit_on = (flags & f_audit_policy) != 0;
    if (!has_deny && (policy_on || audit_on)) {
        k.deny = 0;
        has_allow = policy_walk(&k, peer, proto, port, &allow, &aallow, &has_aallow);
    }
    __u8 drop = (flags & FLAG_AUDIT) ? VERDICT_AUDIT : VERDICT_DROPPED;
    vi->peer_id = peer;
    vi->pflags = PF_VERDICT;
    if (has_deny) {
        vi->verdict = drop;
        vi->drop_reason = DROP_POLICY_DENY;
        vi->pflags |= PF_REASON_DENY;
        vi->policy_id = deny.policy_id;
        vi->match_type = deny.match_type;
    } else if (policy_on && !has_allow) {
        vi->verdict = drop;
        vi->drop_reason = DROP_POLICY_DENIED;
    } else if (has_adeny) {
        vi->verdict = VERDICT_AUDIT;
        vi->drop_reason = DROP_POLICY_DENY;
        vi->pflags |= PF_REASON_DENY;
        vi->policy_id = adeny.policy_id;
        vi->match_type = adeny.match_type;
    } else if (audit_on && !has_allow && !has_aallow) {
        vi->verdict = VERDICT_AUDIT;
        vi->drop_reason = DROP_POLICY_DENIED;
    } else if ((policy_on || audit_on) && (has_allow || has_aallow)) {
        vi->verdict = VERDICT_FORWARDED;
        vi->policy_id = has_allow ? allow.policy_id : aallow.policy_id;
        vi->match_type = has_allow ? allow.match_type : aallow.match_type;
    } else {
        vi->verdict = VERDICT_FORWARDED;  // only deny rules, none matched: no policy verdict
        vi->pflags = 0;
    }
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
    // The fast path (an established flow, no event) needs time only for idleness and the periodic
    // update: the coarse clock (jiffy resolution) is ~15 ns cheaper. Events and new flows take the
    // precise clock.
    __u64 now = bpf_ktime_get_coarse_ns();
    __u32 len = skb->len;
    key.ifindex = skb->ifindex;
    key.dir = dir;

    struct flow_val *v = flows.lookup(&key);
    // A connection's first SYN (no ACK) on a tuple whose previous connection is over (FIN or RST seen
    // either way) starts a new flow: clients reuse ports within seconds, long before the agent expires
    // the closed entries. Both directions of the old connection are forgotten (their close was already
    // reported), so the new connection is counted from zero and goes through policy again.
    if (v && key.proto == IPPROTO_TCP && (tcp_flags & 0x12) == 0x02) {
        struct flow_key okey = {};
        reverse_key(&key, &okey);
        struct flow_val *ov = flows.lookup(&okey);
        if ((v->flags_seen & 0x05) || (ov && (ov->flags_seen & 0x05))) {
            flows.delete(&key);
            if (ov)
                flows.delete(&okey);
            v = NULL;
        }
    }
    if (!v) {
        now = bpf_ktime_get_ns();
        struct flow_val nv = {};
        nv.first_ns = now;
        nv.last_ns = now;
        nv.report_ns = now;
        nv.packets = 1;
        nv.bytes = len;
        nv.flags_seen = tcp_flags;
        nv.icmp_type = icmp_type;
        nv.icmp_code = icmp_code;

        // Policy: only for a new flow at an endpoint with a policy in this direction.
        struct flow_val *rv = NULL;
        int rv_known = 0;
        struct ep_info *ep = policy_endpoints.lookup(&key.ifindex);
        __u8 pmask = 0;
        if (ep)
            pmask = ep->flags & (dir == DIR_INGRESS ? FLAGS_INGRESS : FLAGS_EGRESS);
        // IPv6 neighbour discovery and MLD are never subject to policy (as in Cilium).
        if (pmask && key.proto == IPPROTO_ICMPV6 && ((icmp_type >= 130 && icmp_type <= 137) || icmp_type == 143))
            pmask = 0;
        if (pmask) {
            struct flow_key rkey = {};
            reverse_key(&key, &rkey);
            rv = flows.lookup(&rkey);
            rv_known = 1;
            if (rv) {
                // A reply of a tracked connection: it passes, with the connection's verdict.
                nv.verdict = rv->verdict;
                nv.match_type = rv->match_type;
                nv.policy_id = rv->policy_id;
                nv.peer_id = rv->peer_id;
                nv.pflags = (rv->pflags & PF_REASON_DENY) | PF_CT_REPLY;
            } else {
                struct verdict_info vi = {};
                __u32 peer = peer_identity(dir == DIR_INGRESS ? key.saddr : key.daddr, key.family);
                __u16 port = (key.proto == IPPROTO_ICMP || key.proto == IPPROTO_ICMPV6) ? icmp_type : key.dport;
                policy_decide(ep, dir, peer, key.proto, port, &vi);
                if (vi.verdict == VERDICT_DROPPED) {
                    emit_drop(&key, &vi, tcp_flags, icmp_type, icmp_code, now, len);
                    return TC_ACT_SHOT;
                }
                nv.verdict = vi.verdict;
                nv.match_type = vi.match_type;
                nv.policy_id = vi.policy_id;
                nv.peer_id = vi.peer_id;
                nv.pflags = vi.pflags;
            }
        }

        if (key.proto == IPPROTO_TCP && (tcp_flags & 0x12) == 0x02) {
            nv.is_reply = REPLY_NO;            // SYN
        } else if (key.proto == IPPROTO_TCP && (tcp_flags & 0x12) == 0x12) {
            nv.is_reply = REPLY_YES;           // SYN-ACK
        } else if (is_echo_request) {
            nv.is_reply = REPLY_NO;
        } else if (is_echo_reply) {
            nv.is_reply = REPLY_YES;
        } else {
            if (!rv_known) {
                struct flow_key rkey = {};
                reverse_key(&key, &rkey);
                rv = flows.lookup(&rkey);
            }
            if (rv)
                nv.is_reply = rv->is_reply == REPLY_UNKNOWN ? REPLY_UNKNOWN : !rv->is_reply;
            else
                nv.is_reply = key.proto == IPPROTO_TCP ? REPLY_UNKNOWN : REPLY_NO;
        }
        // The event first: whether it was queued decides whether the entry's first packet counts as
        // reported (if not, the sweep's final record is the flow's only record).
        nv.report_packets = emit(&key, &nv, EV_NEW, tcp_flags, now, len) ? 1 : 0;
        if (flows.update(&key, &nv) != 0)
            stat_inc(STAT_MAP_FAIL);
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
    }
    if (fresh & REPORT_FLAGS) {
        v->report_ns = now;
        if (emit(&key, v, (fresh & 0x05) ? EV_CLOSE : EV_FLAGS, tcp_flags, bpf_ktime_get_ns(), len))
            v->report_packets = v->packets;
        return TC_ACT_OK;
    }
    // Signed: report_ns may come from the precise clock, which runs up to a jiffy ahead of the coarse one.
    if ((__s64)(now - v->report_ns) >= (__s64)UPDATE_NS) {
        v->report_ns = now;
        if (emit(&key, v, EV_UPDATE, tcp_flags, bpf_ktime_get_ns(), len))
            v->report_packets = v->packets;
    }
    return TC_ACT_OK;
}

int fs_ingress(struct __sk_buff *skb) { return handle(skb, DIR_EGRESS); }
int fs_egress(struct __sk_buff *skb) { return handle(skb, DIR_INGRESS); }
