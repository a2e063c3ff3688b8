//! The `cgroup/sock_create` program: refuses packet-level sockets to endpoints no TC program
//! covers.
//!
//! A raw socket, a ping socket's unconnected `sendto` and SCTP send what no socket-address hook
//! decides. For a workload with its own network namespace, `tc_from_pod` decides those packets on
//! its veth; a workload in the host's network namespace has no interface of its own, so the agent
//! lists its endpoint in `EGRET_RAW_REFUSED` and the socket is refused at `socket()` with
//! `EPERM`, counted and logged under [`RULE_RAW_SOCKET`]. The hook runs for `AF_INET` and
//! `AF_INET6` sockets only (`inet_create`, `inet6_create`); `AF_PACKET` is not covered (see
//! `docs/datapath.md`).

use aya_ebpf::{
    macros::{cgroup_sock, map},
    maps::HashMap,
    programs::SockContext,
};
use egret_common::{
    PolicyValue, RULE_RAW_SOCKET, capacity, endpoint_flags, protocol, protocol_key, verdict,
};

use crate::{Caller, Destination, PROCEED, REJECT, find_endpoint, record};

/// `SOCK_DGRAM` and `SOCK_RAW` from include/linux/net.h.
const SOCK_DGRAM: u32 = 2;
const SOCK_RAW: u32 = 3;

#[map(name = "EGRET_RAW_REFUSED")]
static RAW_REFUSED: HashMap<u32, u32> = HashMap::pinned(capacity::RAW_REFUSED, 0);

/// The refusal as the counters and the deny log see it.
const RAW_SOCKET: PolicyValue = PolicyValue {
    verdict: verdict::DENY,
    _pad: [0; 3],
    rule_id: RULE_RAW_SOCKET,
};

#[cgroup_sock(sock_create)]
pub fn sock_create(ctx: SockContext) -> i32 {
    match try_sock_create(&ctx) {
        Ok(ret) | Err(ret) => ret,
    }
}

fn try_sock_create(ctx: &SockContext) -> Result<i32, i32> {
    let sk = ctx.sock;
    // SAFETY: the kernel hands a valid context; each field is read with its own width.
    let (kind, raw_protocol) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*sk).type_),
            core::ptr::read_volatile(&raw const (*sk).protocol),
        )
    };
    let proto = protocol_key(raw_protocol);
    let ping = kind == SOCK_DGRAM && (proto == protocol::ICMP || proto == protocol::ICMPV6);
    if kind != SOCK_RAW && !ping && proto != protocol::SCTP {
        return Ok(PROCEED);
    }
    let Some(endpoint) = find_endpoint() else {
        return Ok(PROCEED);
    };
    if endpoint.flags & (endpoint_flags::UNMANAGED | endpoint_flags::PENDING) != 0 {
        return Ok(PROCEED);
    }
    // SAFETY: plain data.
    if unsafe { RAW_REFUSED.get(endpoint.endpoint_id) }.is_none() {
        return Ok(PROCEED);
    }
    record(
        endpoint.endpoint_id,
        Destination::Unconnected,
        proto,
        0,
        RAW_SOCKET,
        Caller::current(),
    );
    Ok(REJECT)
}
