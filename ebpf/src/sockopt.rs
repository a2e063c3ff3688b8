//! The `cgroup/setsockopt` program: refuses source routing for endpoints' processes.
//!
//! The `sock_addr` hooks decide the address a process passes to `connect()` or `sendto()`. A
//! source route makes the packet go elsewhere first: an IPv6 routing header (a segment routing
//! header, type 4, on any kernel with `CONFIG_IPV6`) makes the first hop the header's segment,
//! and an IPv4 loose or strict source route option does the same for IPv4 (see
//! `fl6_update_dst()` in net/ipv6/exthdrs.c and `ip_route_connect()`'s use of `opt.faddr` in
//! net/ipv4/). So the option itself is refused, and counted and logged like a blocked
//! connection under [`RULE_SOURCE_ROUTE`].

use aya_ebpf::{bindings::bpf_sock, macros::cgroup_sockopt, programs::SockoptContext};
use egret_common::{RULE_SOURCE_ROUTE, endpoint_flags, family, protocol_key, verdict};

use crate::{Destination, PROCEED, REJECT};

/// `SOL_IP` (`IPPROTO_IP`) from include/linux/socket.h.
const SOL_IP: i32 = 0;
/// `SOL_IPV6` (`IPPROTO_IPV6`).
const SOL_IPV6: i32 = 41;
/// `IP_OPTIONS` from include/uapi/linux/in.h: the IPv4 options of every packet sent.
const IP_OPTIONS: i32 = 4;
/// `IPV6_2292RTHDR` from include/uapi/linux/in6.h (RFC 2292 name of the routing header).
const IPV6_2292RTHDR: i32 = 5;
/// `IPV6_2292PKTOPTIONS`: sticky ancillary data, which may hold a routing header.
const IPV6_2292PKTOPTIONS: i32 = 6;
/// `IPV6_RTHDR` (RFC 3542).
const IPV6_RTHDR: i32 = 57;

/// `IPOPT_END` and `IPOPT_NOOP` from include/uapi/linux/ip.h: the one-byte options.
const IPOPT_END: u8 = 0;
const IPOPT_NOOP: u8 = 1;
/// `IPOPT_LSRR` and `IPOPT_SSRR`: loose and strict source route.
const IPOPT_LSRR: u8 = 0x83;
const IPOPT_SSRR: u8 = 0x89;
/// IPv4 options take at most 40 bytes (a 60-byte header less the fixed 20).
const MAX_IP_OPTIONS: usize = 40;

/// The refusal as the counters and the deny log see it.
const SOURCE_ROUTE: egret_common::PolicyValue = egret_common::PolicyValue {
    verdict: verdict::DENY,
    _pad: [0; 3],
    rule_id: RULE_SOURCE_ROUTE,
};

#[cgroup_sockopt(setsockopt)]
pub fn setsockopt(ctx: SockoptContext) -> i32 {
    match try_setsockopt(&ctx) {
        Ok(ret) | Err(ret) => ret,
    }
}

fn try_setsockopt(ctx: &SockoptContext) -> Result<i32, i32> {
    let so = ctx.sockopt;
    // SAFETY: the kernel hands a valid context; each field is read with its own width.
    let (level, optname, optlen) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*so).level),
            core::ptr::read_volatile(&raw const (*so).optname),
            core::ptr::read_volatile(&raw const (*so).optlen),
        )
    };
    let source_route = match (level, optname) {
        // optlen 0 clears the header: always allowed.
        (SOL_IPV6, IPV6_RTHDR | IPV6_2292RTHDR) => optlen > 0,
        (SOL_IPV6, IPV6_2292PKTOPTIONS) => optlen > 0,
        (SOL_IP, IP_OPTIONS) => has_source_route(ctx),
        _ => false,
    };
    if !source_route {
        return Ok(PROCEED);
    }
    // Not an endpoint's process (or an unmanaged one): not egret's business. Below a guard,
    // refused too, counted under the pending endpoint like the guard's other denials.
    let Some(endpoint) = crate::find_endpoint() else {
        return Ok(PROCEED);
    };
    if endpoint.flags & endpoint_flags::UNMANAGED != 0 {
        return Ok(PROCEED);
    }
    let endpoint_id = if endpoint.flags & endpoint_flags::PENDING != 0 {
        crate::PENDING_ENDPOINT
    } else {
        endpoint.endpoint_id
    };
    let peer = connected_to(ctx);
    let Peer {
        family: peer_family,
        addr,
        protocol,
        port,
    } = peer;
    // Each branch builds its own `Destination`: one value that may be any variant would carry
    // uninitialised payload bytes, which the verifier refuses to see copied.
    if peer_family == family::INET {
        let dest = Destination::V4([addr[0], addr[1], addr[2], addr[3]]);
        crate::count(endpoint_id, dest, protocol, SOURCE_ROUTE);
        crate::report(endpoint_id, dest, protocol, port, SOURCE_ROUTE);
    } else if peer_family == family::INET6 {
        let dest = Destination::V6(addr);
        crate::count(endpoint_id, dest, protocol, SOURCE_ROUTE);
        crate::report(endpoint_id, dest, protocol, port, SOURCE_ROUTE);
    } else {
        crate::count(
            endpoint_id,
            Destination::Unconnected,
            protocol,
            SOURCE_ROUTE,
        );
        crate::report(
            endpoint_id,
            Destination::Unconnected,
            protocol,
            port,
            SOURCE_ROUTE,
        );
    }
    Ok(REJECT)
}

/// Whether the `IP_OPTIONS` buffer holds a loose or strict source route. Walks the option list
/// as `ip_options_compile()` does; stops at the end option, a malformed length (the kernel
/// refuses those options itself) or 40 bytes.
fn has_source_route(ctx: &SockoptContext) -> bool {
    // SAFETY: valid context; the pointers are only compared and dereferenced below after a
    // bounds check against `optval_end`, which the verifier demands too.
    let (start, end) = unsafe {
        (
            (*ctx.sockopt).__bindgen_anon_2.optval as *const u8,
            (*ctx.sockopt).__bindgen_anon_3.optval_end as *const u8,
        )
    };
    let mut offset = 0usize;
    for _ in 0..MAX_IP_OPTIONS {
        if offset >= MAX_IP_OPTIONS {
            break;
        }
        let kind_at = start.wrapping_add(offset);
        if kind_at.wrapping_add(1) > end {
            break;
        }
        // SAFETY: one byte inside [optval, optval_end), checked above.
        let kind = unsafe { *kind_at };
        match kind {
            IPOPT_END => break,
            IPOPT_NOOP => offset += 1,
            IPOPT_LSRR | IPOPT_SSRR => return true,
            _ => {
                let len_at = kind_at.wrapping_add(1);
                if len_at.wrapping_add(1) > end {
                    break;
                }
                // SAFETY: as above.
                let len = unsafe { *len_at };
                if len < 2 {
                    break;
                }
                offset += usize::from(len);
            }
        }
    }
    false
}

/// The peer of a socket: family `0` when it is not connected.
struct Peer {
    family: u8,
    /// Network byte order; IPv4 in the first four bytes.
    addr: [u8; 16],
    protocol: u8,
    port: u16,
}

/// The socket's peer if it is connected (the destination, protocol and port a blocked
/// connection would be counted under), else no destination.
fn connected_to(ctx: &SockoptContext) -> Peer {
    // SAFETY: `sk` of a sockopt context is a valid socket pointer (PTR_TO_SOCKET, never null).
    let sk: *const bpf_sock = unsafe { (*ctx.sockopt).__bindgen_anon_1.sk };
    // SAFETY: fields of `struct bpf_sock` the verifier lets sockopt programs read.
    let (sk_family, protocol, port) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*sk).family),
            core::ptr::read_volatile(&raw const (*sk).protocol),
            core::ptr::read_volatile(&raw const (*sk).dst_port),
        )
    };
    let mut peer = Peer {
        family: 0,
        addr: [0; 16],
        protocol: protocol_key(protocol),
        port: u16::from_be(port),
    };
    if sk_family == u32::from(family::INET) {
        // SAFETY: as above.
        let ip = unsafe { core::ptr::read_volatile(&raw const (*sk).dst_ip4) };
        if ip != 0 {
            peer.family = family::INET;
            peer.addr[..4].copy_from_slice(&ip.to_ne_bytes());
            return peer;
        }
    } else if sk_family == u32::from(family::INET6) {
        let mut words = [0u32; 4];
        for (i, word) in words.iter_mut().enumerate() {
            // SAFETY: as above; 4-byte loads.
            *word = unsafe { core::ptr::read_volatile(&raw const (*sk).dst_ip6[i]) };
        }
        // An IPv4-mapped peer of a dual-stack socket is an IPv4 host, as in the hooks.
        if words[0] == 0 && words[1] == 0 && words[2].to_ne_bytes() == [0, 0, 0xff, 0xff] {
            peer.family = family::INET;
            peer.addr[..4].copy_from_slice(&words[3].to_ne_bytes());
            return peer;
        }
        if words != [0; 4] {
            peer.family = family::INET6;
            for (i, word) in words.iter().enumerate() {
                peer.addr[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
            }
            return peer;
        }
    }
    peer.port = 0;
    peer
}
