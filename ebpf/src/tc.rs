//! The TC programs: packet-level enforcement on the node-side end of each workload's veth, for
//! what the socket hooks never see (raw sockets, unconnected ping sockets, `AF_PACKET`, SCTP).
//!
//! `tc_from_pod` (TCX ingress of the node-side interface) sees every frame the workload sends.
//! The workload is the interface the frame came in on (`EGRET_IFACES`), never the frame's source
//! address, which a raw socket writes itself; a source address that is not the workload's
//! (`EGRET_SOURCES`) is dropped. The decision is the socket hooks' ([`crate::lookup_policy`]:
//! address class, then policy, in the active generation), counted and logged by the same code.
//! `tc_to_pod` (TCX egress of the same interface) only notes flows that peers open towards the
//! workload, so that the workload's replies pass: egress policy decides what a workload opens.
//!
//! `EGRET_CONNTRACK` remembers flows already allowed, with the epoch that allowed them, so a
//! flow's later packets cost one hash lookup; after a generation flip the flow is decided again
//! and a revoked destination stops it. See `docs/datapath.md`, "The TC path".

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    macros::{classifier, map},
    maps::{HashMap, LruHashMap},
    programs::TcContext,
};
use egret_common::{
    FlowKey, FlowValue, FragmentKey, IfaceValue, PolicyValue, RULE_MALFORMED, RULE_PENDING,
    RULE_SOURCE_ROUTE, SourceKey, capacity, family, flow_origin, iface_flags, protocol, verdict,
};

use crate::{Caller, Destination, active_epoch, lookup_policy, record};

/// `TCX_NEXT` (`TC_ACT_UNSPEC`): egret has no objection; the next program, if any, decides.
const PASS: i32 = -1;
/// `TCX_DROP` (`TC_ACT_SHOT`).
const DROP: i32 = 2;
/// What the TC programs return when the state map cannot be read: fail open, as the socket
/// hooks do (`ON_DATAPATH_FAULT`).
const ON_TC_FAULT: i32 = PASS;

#[map(name = "EGRET_IFACES")]
static IFACES: HashMap<u32, IfaceValue> = HashMap::pinned(capacity::IFACES, 0);

#[map(name = "EGRET_SOURCES")]
static SOURCES: HashMap<SourceKey, u32> = HashMap::pinned(capacity::SOURCES, 0);

#[map(name = "EGRET_CONNTRACK")]
static CONNTRACK: LruHashMap<FlowKey, FlowValue> = LruHashMap::pinned(capacity::CONNTRACK, 0);

#[map(name = "EGRET_FRAGMENTS")]
static FRAGMENTS: LruHashMap<FragmentKey, u32> = LruHashMap::pinned(capacity::FRAGMENTS, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;

/// IPv6 extension headers walked before the upper-layer header; a chain longer than this is
/// dropped (no workload needs one).
const MAX_EXTENSION_HEADERS: usize = 6;

/// A drop that no policy rule decided (forged source, unparsed header, orphan fragment).
const MALFORMED: PolicyValue = PolicyValue {
    verdict: verdict::DENY,
    _pad: [0; 3],
    rule_id: RULE_MALFORMED,
};

/// A packet from a pending interface (its pod not known yet) that is not link traffic.
const PENDING: PolicyValue = PolicyValue {
    verdict: verdict::DENY,
    _pad: [0; 3],
    rule_id: RULE_PENDING,
};

/// An IPv4 packet with options (which may hold a source route) or an IPv6 routing header with
/// segments left: the packet would go elsewhere first.
const SOURCE_ROUTE: PolicyValue = PolicyValue {
    verdict: verdict::DENY,
    _pad: [0; 3],
    rule_id: RULE_SOURCE_ROUTE,
};

#[classifier]
pub fn tc_from_pod(ctx: TcContext) -> i32 {
    match try_from_pod(&ctx) {
        Ok(ret) | Err(ret) => ret,
    }
}

#[classifier]
pub fn tc_to_pod(ctx: TcContext) -> i32 {
    // Whatever happens here, the packet goes on: egress policy does not decide what reaches a
    // workload.
    let _ = try_to_pod(&ctx);
    PASS
}

/// Where a packet is in its datagram.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fragment {
    /// Not fragmented.
    Whole,
    /// The first fragment: holds the upper-layer header.
    First,
    /// A later fragment: no upper-layer header.
    Later,
}

/// The IP header fields a decision needs, for either family.
#[derive(Clone, Copy)]
struct Ip {
    family: u8,
    /// The upper-layer protocol (after IPv6 extension headers).
    protocol: u8,
    /// Network byte order; IPv4 in the first four bytes, the rest zero.
    src: [u8; 16],
    dst: [u8; 16],
    /// Offset of the upper-layer header in the frame.
    l4: usize,
    fragment: Fragment,
    /// IPv4 identification or IPv6 fragment identification.
    fragment_id: u32,
    /// IPv4 options present, or an IPv6 routing header with segments left.
    source_routed: bool,
}

/// Why a frame could not be parsed.
struct Unparsed;

fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: the kernel hands a valid `__sk_buff`; `ifindex` is readable in TC programs.
    unsafe { (*ctx.skb.skb).ifindex }
}

fn vlan_present(ctx: &TcContext) -> bool {
    // SAFETY: as above; `vlan_present` is readable in TC programs.
    unsafe { (*ctx.skb.skb).vlan_present != 0 }
}

fn try_from_pod(ctx: &TcContext) -> Result<i32, i32> {
    let ifindex = ifindex(ctx);
    // SAFETY: values are plain data written whole by the agent.
    let Some(iface) = (unsafe { IFACES.get(ifindex) }).copied() else {
        // Not a workload's interface: not egret's.
        return Ok(PASS);
    };
    let endpoint_id = iface.endpoint_id;
    let pending = iface.flags & iface_flags::PENDING != 0;
    // The receive path takes a VLAN tag off before TC runs and the bridge puts it back: a
    // workload has no business tagging frames, so they go without a decision on the inner one.
    if vlan_present(ctx) {
        return Ok(drop_unaddressed(endpoint_id));
    }
    let Ok(ethertype) = ctx.load::<[u8; 2]>(12) else {
        return Ok(drop_unaddressed(endpoint_id));
    };
    match u16::from_be_bytes(ethertype) {
        // Address resolution carries no payload past the link.
        ETH_P_ARP => Ok(PASS),
        ETH_P_IP => match parse4(ctx) {
            Ok(ip) if pending => Ok(from_pending(ctx, &ip)),
            Ok(ip) => Ok(from_pod(ctx, ifindex, endpoint_id, &ip)),
            Err(Unparsed) => Ok(drop_unaddressed(endpoint_id)),
        },
        ETH_P_IPV6 => match parse6(ctx) {
            Ok(ip) if pending => Ok(from_pending(ctx, &ip)),
            Ok(ip) => Ok(from_pod(ctx, ifindex, endpoint_id, &ip)),
            Err(Unparsed) => Ok(drop_unaddressed(endpoint_id)),
        },
        // Anything else (another ethertype, a second VLAN tag) could still be bridged or routed
        // towards a host: nothing egret cannot read leaves.
        _ => Ok(drop_unaddressed(endpoint_id)),
    }
}

/// Drops and counts a frame egret cannot attribute to a destination.
fn drop_unaddressed(endpoint_id: u32) -> i32 {
    record(
        endpoint_id,
        Destination::Unconnected,
        protocol::OTHER,
        0,
        MALFORMED,
        Caller::NONE,
    );
    DROP
}

/// Drops and counts a packet to `ip.dst` with `decision`. Not inlined, here and below: the
/// verifier limits the stack of the deepest call chain to 512 bytes, and each helper's keys
/// and events then live in a frame of their own.
#[inline(never)]
fn drop_to(endpoint_id: u32, ip: &Ip, port: u16, decision: PolicyValue) -> i32 {
    // Each branch builds its own `Destination` (see `sockopt.rs`: the verifier refuses to see
    // uninitialised payload bytes copied).
    if ip.family == family::INET {
        let dest = Destination::V4([ip.dst[0], ip.dst[1], ip.dst[2], ip.dst[3]]);
        record(endpoint_id, dest, ip.protocol, port, decision, Caller::NONE);
    } else {
        let dest = Destination::V6(ip.dst);
        record(endpoint_id, dest, ip.protocol, port, decision, Caller::NONE);
    }
    DROP
}

/// The policy's decision for a packet to `ip.dst`.
fn policy(generation: u32, endpoint_id: u32, ip: &Ip, port: u16) -> PolicyValue {
    if ip.family == family::INET {
        let dest = Destination::V4([ip.dst[0], ip.dst[1], ip.dst[2], ip.dst[3]]);
        lookup_policy(generation, endpoint_id, dest, ip.protocol, port)
    } else {
        let dest = Destination::V6(ip.dst);
        lookup_policy(generation, endpoint_id, dest, ip.protocol, port)
    }
}

fn parse4(ctx: &TcContext) -> Result<Ip, Unparsed> {
    let header: [u8; 20] = ctx.load(ETH_HLEN).map_err(|_| Unparsed)?;
    if header[0] >> 4 != 4 {
        return Err(Unparsed);
    }
    let header_len = usize::from(header[0] & 0x0f) * 4;
    if header_len < 20 {
        return Err(Unparsed);
    }
    let frag = u16::from_be_bytes([header[6], header[7]]);
    let offset = frag & 0x1fff;
    let more = frag & 0x2000 != 0;
    let mut ip = Ip {
        family: family::INET,
        protocol: header[9],
        src: [0; 16],
        dst: [0; 16],
        l4: ETH_HLEN + header_len,
        fragment: if offset != 0 {
            Fragment::Later
        } else if more {
            Fragment::First
        } else {
            Fragment::Whole
        },
        fragment_id: u32::from(u16::from_be_bytes([header[4], header[5]])),
        source_routed: header_len > 20,
    };
    ip.src[..4].copy_from_slice(&header[12..16]);
    ip.dst[..4].copy_from_slice(&header[16..20]);
    Ok(ip)
}

fn parse6(ctx: &TcContext) -> Result<Ip, Unparsed> {
    // Field by field: a 40-byte copy of the header would cost stack the verifier counts.
    let header: [u8; 8] = ctx.load(ETH_HLEN).map_err(|_| Unparsed)?;
    if header[0] >> 4 != 6 {
        return Err(Unparsed);
    }
    let mut ip = Ip {
        family: family::INET6,
        protocol: header[6],
        src: ctx.load(ETH_HLEN + 8).map_err(|_| Unparsed)?,
        dst: ctx.load(ETH_HLEN + 24).map_err(|_| Unparsed)?,
        l4: ETH_HLEN + 40,
        fragment: Fragment::Whole,
        fragment_id: 0,
        source_routed: false,
    };
    for _ in 0..MAX_EXTENSION_HEADERS {
        match ip.protocol {
            // Hop-by-hop and destination options: length in 8-byte units, not counting the
            // first 8.
            0 | 60 => {
                let ext: [u8; 2] = ctx.load(ip.l4).map_err(|_| Unparsed)?;
                ip.protocol = ext[0];
                ip.l4 += (usize::from(ext[1]) + 1) * 8;
            }
            // Routing header: with segments left, the packet goes to the next segment first.
            43 => {
                let ext: [u8; 4] = ctx.load(ip.l4).map_err(|_| Unparsed)?;
                ip.source_routed |= ext[3] != 0;
                ip.protocol = ext[0];
                ip.l4 += (usize::from(ext[1]) + 1) * 8;
            }
            // Fragment header (RFC 8200 4.5): offset in 8-byte units, M flag, identification.
            44 => {
                let ext: [u8; 8] = ctx.load(ip.l4).map_err(|_| Unparsed)?;
                ip.protocol = ext[0];
                let offset = u16::from_be_bytes([ext[2], ext[3]]) >> 3;
                let more = ext[3] & 1 != 0;
                ip.fragment = if offset != 0 {
                    Fragment::Later
                } else if more {
                    Fragment::First
                } else {
                    Fragment::Whole
                };
                ip.fragment_id = u32::from_be_bytes([ext[4], ext[5], ext[6], ext[7]]);
                ip.l4 += 8;
                if ip.fragment == Fragment::Later {
                    return Ok(ip);
                }
            }
            // Authentication header: length in 4-byte units, not counting the first 8 bytes.
            51 => {
                let ext: [u8; 2] = ctx.load(ip.l4).map_err(|_| Unparsed)?;
                ip.protocol = ext[0];
                ip.l4 += (usize::from(ext[1]) + 2) * 4;
            }
            _ => return Ok(ip),
        }
    }
    Err(Unparsed)
}

/// Whether `protocol` carries 16-bit source and destination ports in its first four bytes.
fn has_ports(protocol: u8) -> bool {
    // TCP, UDP, DCCP, SCTP, UDP-Lite.
    matches!(protocol, 6 | 17 | 33 | 132 | 136)
}

/// ICMP(v6) message kinds the TC path treats apart.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Icmp {
    /// An echo request or reply: tracked by its identifier.
    Echo,
    /// An error quoting a packet the workload received.
    Error,
    /// Neighbour discovery or multicast listener messages (IPv6).
    Link,
    Other,
}

fn icmp_kind(ip: &Ip, icmp_type: u8) -> Icmp {
    if ip.protocol == protocol::ICMP {
        match icmp_type {
            0 | 8 => Icmp::Echo,
            3 | 4 | 11 | 12 => Icmp::Error,
            _ => Icmp::Other,
        }
    } else {
        match icmp_type {
            128 | 129 => Icmp::Echo,
            1..=4 => Icmp::Error,
            130..=137 | 143 => Icmp::Link,
            _ => Icmp::Other,
        }
    }
}

fn is_icmp(ip: &Ip) -> bool {
    (ip.family == family::INET && ip.protocol == protocol::ICMP)
        || (ip.family == family::INET6 && ip.protocol == protocol::ICMPV6)
}

/// A destination that does not leave the link: IPv6 link-local unicast (`fe80::/10`) or
/// link-scope multicast (`ff02::/16`).
fn on_link6(addr: &[u8; 16]) -> bool {
    (addr[0] == 0xfe && addr[1] & 0xc0 == 0x80) || (addr[0] == 0xff && addr[1] & 0x0f == 0x02)
}

/// A packet from a pending interface (a veth whose pod is not known yet): no addresses and no
/// policy yet, so the pod may resolve its neighbours and ask DHCP, nothing more. Kept apart
/// from [`from_pod`], whose call chain already uses most of the verifier's 512 bytes of stack.
#[inline(never)]
fn from_pending(ctx: &TcContext, ip: &Ip) -> i32 {
    let (mut local_port, mut remote_port, mut icmp) = ([0u8; 2], [0u8; 2], Icmp::Other);
    if ip.fragment != Fragment::Later {
        if has_ports(ip.protocol) {
            if let Ok(ports) = ctx.load::<[u8; 4]>(ip.l4) {
                local_port = [ports[0], ports[1]];
                remote_port = [ports[2], ports[3]];
            }
        } else if is_icmp(ip)
            && let Ok(head) = ctx.load::<[u8; 1]>(ip.l4)
        {
            icmp = icmp_kind(ip, head[0]);
        }
    }
    if link_traffic(ip, icmp, local_port, remote_port) {
        PASS
    } else {
        drop_to(0, ip, u16::from_be_bytes(remote_port), PENDING)
    }
}

fn from_pod(ctx: &TcContext, ifindex: u32, endpoint_id: u32, ip: &Ip) -> i32 {
    // Ports, or the ICMP kind, of the upper-layer header (absent in later fragments).
    let (mut local_port, mut remote_port, mut icmp) = ([0u8; 2], [0u8; 2], Icmp::Other);
    if ip.fragment != Fragment::Later {
        if has_ports(ip.protocol) {
            let Ok(ports) = ctx.load::<[u8; 4]>(ip.l4) else {
                return drop_to(endpoint_id, ip, 0, MALFORMED);
            };
            local_port = [ports[0], ports[1]];
            remote_port = [ports[2], ports[3]];
        } else if is_icmp(ip) {
            let Ok(head) = ctx.load::<[u8; 8]>(ip.l4) else {
                return drop_to(endpoint_id, ip, 0, MALFORMED);
            };
            icmp = icmp_kind(ip, head[0]);
            if icmp == Icmp::Echo {
                local_port = [head[4], head[5]];
            }
        }
    }
    let port = u16::from_be_bytes(remote_port);

    if !source_allowed(ifindex, ip, icmp, local_port, remote_port) {
        return drop_to(endpoint_id, ip, port, MALFORMED);
    }
    if link_traffic(ip, icmp, local_port, remote_port) {
        return PASS;
    }
    if ip.source_routed && !(ip.family == family::INET && ip.dst[0] & 0xf0 == 0xe0) {
        return drop_to(endpoint_id, ip, port, SOURCE_ROUTE);
    }
    let Some(generation) = active_epoch() else {
        return ON_TC_FAULT;
    };

    if ip.fragment == Fragment::Later {
        // Follows its first fragment's verdict, in the same generation; else dropped.
        return if fragment_allowed(ifindex, ip, generation) {
            PASS
        } else {
            drop_to(endpoint_id, ip, 0, MALFORMED)
        };
    }

    if icmp == Icmp::Error && error_of_tracked_flow(ctx, ifindex, ip, generation) {
        return PASS;
    }

    let key = FlowKey {
        ifindex,
        family: ip.family,
        protocol: ip.protocol,
        local_port_be: local_port,
        remote_port_be: remote_port,
        _pad: [0; 2],
        local: ip.src,
        remote: ip.dst,
    };
    let verdict = match flow_verdict(&key, generation) {
        Some(verdict) => verdict,
        None => {
            // ICMP and other protocols without ports are decided as port 0, which only rules
            // without a port restriction match (no rule port range starts at 0).
            let decision = policy(generation, endpoint_id, ip, port);
            if decision.verdict == verdict::DENY {
                // A tracked flow that policy now denies stays tracked as denied, so that the
                // peer's next packet cannot make the workload's look like replies.
                // SAFETY: plain data.
                if unsafe { CONNTRACK.get(key) }.is_some() {
                    let _ = CONNTRACK.insert(
                        key,
                        flow(generation, flow_origin::OUTBOUND, verdict::DENY),
                        u64::from(BPF_ANY),
                    );
                }
                return drop_to(endpoint_id, ip, port, decision);
            }
            let _ = CONNTRACK.insert(
                key,
                flow(generation, flow_origin::OUTBOUND, decision.verdict),
                u64::from(BPF_ANY),
            );
            decision.verdict
        }
    };
    if verdict == verdict::DENY {
        let decision = policy(generation, endpoint_id, ip, port);
        return drop_to(endpoint_id, ip, port, decision);
    }
    if ip.fragment == Fragment::First {
        note_fragment(ifindex, ip, generation);
    }
    PASS
}

fn fragment_key(ifindex: u32, ip: &Ip) -> FragmentKey {
    FragmentKey {
        ifindex,
        id: ip.fragment_id,
        family: ip.family,
        protocol: ip.protocol,
        _pad: [0; 2],
        src: ip.src,
        dst: ip.dst,
    }
}

/// Whether the first fragment of `ip`'s datagram was allowed in `generation`.
#[inline(never)]
fn fragment_allowed(ifindex: u32, ip: &Ip, generation: u32) -> bool {
    // SAFETY: plain data.
    unsafe { FRAGMENTS.get(fragment_key(ifindex, ip)) }.is_some_and(|&g| g == generation)
}

/// Notes an allowed first fragment: the datagram's later fragments follow it.
#[inline(never)]
fn note_fragment(ifindex: u32, ip: &Ip, generation: u32) {
    let _ = FRAGMENTS.insert(fragment_key(ifindex, ip), generation, u64::from(BPF_ANY));
}

fn flow(generation: u32, origin: u8, verdict: u8) -> FlowValue {
    FlowValue {
        generation,
        origin,
        verdict,
        _pad: [0; 2],
    }
}

/// The verdict a tracked flow already has: replies to flows peers opened pass; the workload's
/// own flows keep the verdict of the generation that decided them. `None`: decide now.
fn flow_verdict(key: &FlowKey, generation: u32) -> Option<u8> {
    // SAFETY: plain data.
    let entry = unsafe { CONNTRACK.get(key) }.copied()?;
    if entry.origin == flow_origin::INBOUND {
        return Some(verdict::ALLOW);
    }
    (entry.generation == generation).then_some(entry.verdict)
}

/// Whether the source address is the workload's. Exceptions are those the link needs: IPv6
/// link-local sources (still decided by destination below), the unspecified source of IPv6
/// duplicate address detection and listener reports, and of a DHCP client's first request.
fn source_allowed(
    ifindex: u32,
    ip: &Ip,
    icmp: Icmp,
    local_port: [u8; 2],
    remote_port: [u8; 2],
) -> bool {
    let key = SourceKey {
        ifindex,
        family: ip.family,
        _pad: [0; 3],
        addr: ip.src,
    };
    // SAFETY: plain data.
    if unsafe { SOURCES.get(key) }.is_some() {
        return true;
    }
    if ip.family == family::INET6 {
        let link_local = ip.src[0] == 0xfe && ip.src[1] & 0xc0 == 0x80;
        let unspecified = ip.src == [0; 16];
        return link_local || (unspecified && icmp == Icmp::Link && on_link6(&ip.dst));
    }
    ip.src == [0; 16] && dhcp4(ip, local_port, remote_port)
}

/// A DHCP client's broadcast (UDP 68 to 67, to 255.255.255.255).
fn dhcp4(ip: &Ip, local_port: [u8; 2], remote_port: [u8; 2]) -> bool {
    ip.protocol == protocol::UDP
        && u16::from_be_bytes(local_port) == 68
        && u16::from_be_bytes(remote_port) == 67
        && ip.dst[..4] == [255, 255, 255, 255]
}

/// Traffic that keeps the link working and cannot leave it: neighbour discovery and multicast
/// listener messages to link-local or link-scope multicast addresses, DHCPv6 client messages
/// to their link-scope group, DHCP client broadcasts.
fn link_traffic(ip: &Ip, icmp: Icmp, local_port: [u8; 2], remote_port: [u8; 2]) -> bool {
    if ip.family == family::INET {
        return dhcp4(ip, local_port, remote_port);
    }
    if !on_link6(&ip.dst) {
        return false;
    }
    icmp == Icmp::Link
        || (ip.protocol == protocol::UDP
            && u16::from_be_bytes(local_port) == 546
            && u16::from_be_bytes(remote_port) == 547)
}

/// Whether an ICMP error the workload sends quotes a packet of a flow egret tracks (and, for
/// the workload's own flows, still allows): the quoted packet came from the peer, so the flow
/// is looked up the other way round.
#[inline(never)]
fn error_of_tracked_flow(ctx: &TcContext, ifindex: u32, ip: &Ip, generation: u32) -> bool {
    let quoted = ip.l4 + 8;
    let mut key = FlowKey {
        ifindex,
        family: ip.family,
        protocol: 0,
        local_port_be: [0; 2],
        remote_port_be: [0; 2],
        _pad: [0; 2],
        local: [0; 16],
        remote: [0; 16],
    };
    let ports_at = if ip.family == family::INET {
        let Ok(inner) = ctx.load::<[u8; 20]>(quoted) else {
            return false;
        };
        key.protocol = inner[9];
        key.remote[..4].copy_from_slice(&inner[12..16]);
        key.local[..4].copy_from_slice(&inner[16..20]);
        quoted + usize::from(inner[0] & 0x0f) * 4
    } else {
        let Ok(inner) = ctx.load::<[u8; 8]>(quoted) else {
            return false;
        };
        key.protocol = inner[6];
        let (Ok(remote), Ok(local)) = (ctx.load(quoted + 8), ctx.load(quoted + 24)) else {
            return false;
        };
        key.remote = remote;
        key.local = local;
        quoted + 40
    };
    // The error goes back to the quoted packet's sender, from its receiver.
    if key.remote != ip.dst || key.local != ip.src {
        return false;
    }
    if has_ports(key.protocol) {
        let Ok(ports) = ctx.load::<[u8; 4]>(ports_at) else {
            return false;
        };
        key.remote_port_be = [ports[0], ports[1]];
        key.local_port_be = [ports[2], ports[3]];
    } else if key.protocol == protocol::ICMP || key.protocol == protocol::ICMPV6 {
        let Ok(head) = ctx.load::<[u8; 6]>(ports_at) else {
            return false;
        };
        key.local_port_be = [head[4], head[5]];
    }
    flow_verdict(&key, generation).is_some_and(|v| v != verdict::DENY)
}

/// Notes a flow a peer opens towards the workload, so that the workload's replies pass: a TCP
/// SYN, or any UDP, SCTP or ICMP echo request packet of a flow not tracked yet.
fn try_to_pod(ctx: &TcContext) -> Result<(), Unparsed> {
    let ifindex = ifindex(ctx);
    // SAFETY: plain data.
    if unsafe { IFACES.get(ifindex) }.is_none() {
        return Ok(());
    }
    let ethertype: [u8; 2] = ctx.load(12).map_err(|_| Unparsed)?;
    let ip = match u16::from_be_bytes(ethertype) {
        ETH_P_IP => parse4(ctx)?,
        ETH_P_IPV6 => parse6(ctx)?,
        _ => return Ok(()),
    };
    if ip.fragment == Fragment::Later {
        return Ok(());
    }
    let (local_port, remote_port);
    if has_ports(ip.protocol) {
        let head: [u8; 4] = ctx.load(ip.l4).map_err(|_| Unparsed)?;
        if ip.protocol == protocol::TCP {
            // Only a connection's first segment: a peer's stray ACK must not open a way out.
            const SYN: u8 = 0x02;
            const ACK: u8 = 0x10;
            let flags: u8 = ctx.load(ip.l4 + 13).map_err(|_| Unparsed)?;
            if flags & (SYN | ACK) != SYN {
                return Ok(());
            }
        }
        remote_port = [head[0], head[1]];
        local_port = [head[2], head[3]];
    } else if is_icmp(&ip) {
        let head: [u8; 8] = ctx.load(ip.l4).map_err(|_| Unparsed)?;
        // Echo requests only (type 8, or 128 for ICMPv6); the reply carries the identifier.
        if !(head[0] == 8 && ip.protocol == protocol::ICMP || head[0] == 128) {
            return Ok(());
        }
        local_port = [head[4], head[5]];
        remote_port = [0; 2];
    } else {
        return Ok(());
    }
    let key = FlowKey {
        ifindex,
        family: ip.family,
        protocol: ip.protocol,
        local_port_be: local_port,
        remote_port_be: remote_port,
        _pad: [0; 2],
        local: ip.dst,
        remote: ip.src,
    };
    // A flow the workload opened (allowed or denied) keeps its entry.
    let _ = CONNTRACK.insert(
        key,
        flow(0, flow_origin::INBOUND, verdict::ALLOW),
        u64::from(BPF_NOEXIST),
    );
    Ok(())
}
