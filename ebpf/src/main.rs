//! egret's kernel programs: cgroup `sock_addr` hooks that decide every outbound `connect()` and
//! unconnected `sendmsg()` of the endpoints' processes, and count each decision.
//!
//! Each hook is a thin entry point over [`decide`]; the maps are described in `docs/datapath.md`.
#![no_std]
#![no_main]
// The BPF target's `core` has no atomic read-modify-write methods; the intrinsic lowers to the
// BPF atomic add instruction.
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "atomic add, see above")]

mod cache;
mod sock;
mod sockopt;
mod tc;

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::{BPF_NOEXIST, bpf_sock_addr},
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_comm,
        bpf_get_current_pid_tgid,
    },
    macros::{cgroup_sock_addr, map},
    maps::{Array, HashMap, LpmTrie, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::SockAddrContext,
};
use egret_common::{
    ADDR_KEY_GENERATION_BITS, Addr4Key, Addr6Key, AddrValue, CLASS_WORLD, CounterKey, CounterValue,
    DecisionEvent, EndpointValue, EventBudget, GENERATIONS, IdKey, IdName, MAX_CGROUP_DEPTH,
    MetaValue, POLICY_PREFIX_PORT, PolicyKey, PolicyValue, RULE_MISSING_POLICY, RULE_PENDING,
    StateValue, capacity, endpoint_flags, family, protocol_key, state_flags, verdict,
};

/// `EEXIST` from the kernel's errno-base.h; the bindings carry no errno values.
const EEXIST: i32 = 17;

/// Return value that lets the syscall proceed.
const PROCEED: i32 = 1;
/// Return value that fails the syscall with `EPERM`.
const REJECT: i32 = 0;

/// What a hook returns when the datapath's own state cannot be read (the state map has no
/// element). Fail open: a fault in egret must not cut a node's network; the agent reports the
/// fault through its health metrics instead.
const ON_DATAPATH_FAULT: i32 = PROCEED;

/// Decision for a managed endpoint that has no policy entry at all in the active generation.
/// The agent writes an endpoint's policy before the endpoint itself, so this only covers a
/// half-removed endpoint; it is counted under its own rule id, so it cannot go unnoticed.
/// Allowed, or denied when the agent runs with `--on-fault deny` (a state flag). Read only on
/// this path: the decisions with a policy pay nothing for it.
fn on_missing_policy() -> PolicyValue {
    let deny = STATE
        .get(0)
        .is_some_and(|state| state.flags & state_flags::FAULT_DENY != 0);
    PolicyValue {
        verdict: if deny { verdict::DENY } else { verdict::ALLOW },
        _pad: [0; 3],
        rule_id: RULE_MISSING_POLICY,
    }
}

#[map(name = "EGRET_ENDPOINTS")]
static ENDPOINTS: HashMap<u64, EndpointValue> = HashMap::pinned(capacity::ENDPOINTS, 0);

#[map(name = "EGRET_STATE")]
static STATE: Array<StateValue> = Array::pinned(1, 0);

#[map(name = "EGRET_ADDR4")]
static ADDR4: LpmTrie<Addr4Key, AddrValue> = LpmTrie::pinned(capacity::ADDR4, 0);

#[map(name = "EGRET_ADDR6")]
static ADDR6: LpmTrie<Addr6Key, AddrValue> = LpmTrie::pinned(capacity::ADDR6, 0);

#[map(name = "EGRET_POLICY")]
static POLICY: LpmTrie<PolicyKey, PolicyValue> = LpmTrie::pinned(capacity::POLICY, 0);

#[map(name = "EGRET_COUNTERS")]
static COUNTERS: HashMap<CounterKey, CounterValue> = HashMap::pinned(capacity::COUNTERS, 0);

#[map(name = "EGRET_COUNTERS_OVERFLOW")]
static COUNTERS_OVERFLOW: HashMap<CounterKey, CounterValue> =
    HashMap::pinned(capacity::COUNTERS_OVERFLOW, 0);

#[map(name = "EGRET_COUNTERS_LOST")]
static COUNTERS_LOST: PerCpuArray<u64> = PerCpuArray::pinned(verdict::COUNT, 0);

#[map(name = "EGRET_EVENTS")]
static EVENTS: RingBuf = RingBuf::pinned(capacity::EVENTS_BYTES, 0);

#[map(name = "EGRET_EVENTS_LOST")]
static EVENTS_LOST: PerCpuArray<u64> = PerCpuArray::pinned(1, 0);

#[map(name = "EGRET_EVENT_BUDGET")]
static EVENT_BUDGET: PerCpuArray<EventBudget> = PerCpuArray::pinned(1, 0);

/// The layout stamp; no program reads it, the agent writes and checks it (see
/// `egret_common::LAYOUT_VERSION`).
#[map(name = "EGRET_META")]
static META: Array<MetaValue> = Array::pinned(1, 0);
/// `BPF_F_NO_PREALLOC`: the id table takes memory only for the ids in use.
const NO_PREALLOC: u32 = 1;

/// The agent's id table. No program reads it; it is declared here so that it is created and
/// pinned with the other maps and shares their lifetime (see `docs/datapath.md`).
#[map(name = "EGRET_IDS")]
static IDS: HashMap<IdKey, IdName> = HashMap::pinned(capacity::IDS, NO_PREALLOC);

/// Decision for a process in a cgroup below a guard that is no endpoint yet: fail closed.
const ON_PENDING: PolicyValue = PolicyValue {
    verdict: verdict::DENY,
    _pad: [0; 3],
    rule_id: RULE_PENDING,
};

/// Endpoint id under which pending denials are counted: none was assigned yet.
const PENDING_ENDPOINT: u32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    match try_hook4::<false>(&ctx) {
        Ok(ret) | Err(ret) => ret,
    }
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    match try_hook4::<true>(&ctx) {
        Ok(ret) | Err(ret) => ret,
    }
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    match try_hook6(&ctx) {
        Ok(ret) | Err(ret) => ret,
    }
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    match try_hook6(&ctx) {
        Ok(ret) | Err(ret) => ret,
    }
}

/// A destination address, in network byte order.
#[derive(Clone, Copy)]
enum Destination {
    V4([u8; 4]),
    V6([u8; 16]),
    /// A socket option refused on a socket that is not connected: counted without destination.
    Unconnected,
}

impl Destination {
    /// The address as the maps store it (IPv4 in the first four bytes), and its family.
    fn encode(self) -> ([u8; 16], u8) {
        let mut out = [0u8; 16];
        match self {
            Self::V4(addr) => {
                out[..4].copy_from_slice(&addr);
                (out, family::INET)
            }
            Self::V6(addr) => (addr, family::INET6),
            Self::Unconnected => (out, 0),
        }
    }
}

/// `127.0.0.1` in network byte order, as the `u32` the context holds.
const LOOPBACK4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);

/// `SENDMSG`: the hook is `sendmsg4`, whose context also holds the datagram's source address.
fn try_hook4<const SENDMSG: bool>(ctx: &SockAddrContext) -> Result<i32, i32> {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel hands a valid context; ctx fields are read with their own width.
    let mut ip = unsafe { core::ptr::read_volatile(&raw const (*sa).user_ip4) };
    if ip == 0 {
        ip = unspecified4::<SENDMSG>(sa);
    }
    decide(sa, Destination::V4(ip.to_ne_bytes()))
}

/// Where the kernel sends a connection or datagram to `0.0.0.0`: to the socket's source
/// address when it has one, else to `127.0.0.1` (`ip_route_output_key_hash_rcu`, "if
/// (!fl4->daddr)"). Decided as that address, or a rule denying loopback would be bypassed.
fn unspecified4<const SENDMSG: bool>(sa: *mut bpf_sock_addr) -> u32 {
    if SENDMSG {
        // SAFETY: valid context; `msg_src_ip4` is readable in sendmsg4 programs only, and
        // this branch is compiled into sendmsg4 alone.
        let source = unsafe { core::ptr::read_volatile(&raw const (*sa).msg_src_ip4) };
        if source != 0 {
            return source;
        }
    }
    // SAFETY: valid context; `sk` is a non-NULL socket pointer in every sock_addr program.
    let source = unsafe {
        let sk = core::ptr::read_volatile(&raw const (*sa).__bindgen_anon_1.sk);
        if sk.is_null() {
            0
        } else {
            core::ptr::read_volatile(&raw const (*sk).src_ip4)
        }
    };
    if source != 0 { source } else { LOOPBACK4 }
}

fn try_hook6(ctx: &SockAddrContext) -> Result<i32, i32> {
    let sa = ctx.sock_addr;
    let mut words = [0u32; 4];
    for (i, word) in words.iter_mut().enumerate() {
        // SAFETY: as in `try_hook4`; the verifier only accepts 4-byte loads of `user_ip6`.
        *word = unsafe { core::ptr::read_volatile(&raw const (*sa).user_ip6[i]) };
    }
    // An IPv4-mapped address (::ffff:a.b.c.d) on an AF_INET6 socket reaches an IPv4 host:
    // decide it by the IPv4 rules, or a dual-stack socket would bypass them.
    if words[0] == 0 && words[1] == 0 && words[2].to_ne_bytes() == [0, 0, 0xff, 0xff] {
        let mut ip = words[3];
        if ip == 0 {
            // `::ffff:0.0.0.0` goes the IPv4 way (`tcp_v4_connect`, `udp_sendmsg`).
            ip = unspecified4::<false>(sa);
        }
        return decide(sa, Destination::V4(ip.to_ne_bytes()));
    }
    // `::` means `::1` (`tcp_v6_connect`, `udpv6_sendmsg`: "BSD'ism").
    if words == [0; 4] {
        words[3] = u32::from_ne_bytes([0, 0, 0, 1]);
    }
    let mut addr = [0u8; 16];
    for (i, word) in words.iter().enumerate() {
        addr[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
    }
    decide(sa, Destination::V6(addr))
}

/// Decides one connection attempt to `dest` and counts it.
fn decide(sa: *mut bpf_sock_addr, dest: Destination) -> Result<i32, i32> {
    // Cgroups that belong to no endpoint are not egret's: no lookup, no count.
    let Some(endpoint) = find_endpoint() else {
        return Ok(PROCEED);
    };
    // SAFETY: valid context, as in `try_hook4`.
    let (protocol, port) = unsafe {
        let protocol = core::ptr::read_volatile(&raw const (*sa).protocol);
        let port = core::ptr::read_volatile(&raw const (*sa).user_port);
        // `user_port` holds the port in network byte order in its low 16 bits.
        (protocol_key(protocol), u16::from_be(port as u16))
    };
    let (endpoint_id, decision) = if endpoint.flags & endpoint_flags::UNMANAGED != 0 {
        return Ok(PROCEED);
    } else if endpoint.flags & endpoint_flags::PENDING != 0 {
        (PENDING_ENDPOINT, ON_PENDING)
    } else {
        // The state holds the flip count (the epoch); its parity is the generation.
        let epoch = active_epoch().ok_or(ON_DATAPATH_FAULT)?;
        // Fast path (cache.rs): a destination decided before in this epoch skips both tries.
        let id = endpoint.endpoint_id;
        let decision = cache::decide_with(epoch, id, dest.encode(), protocol, port, || {
            lookup_policy(epoch, id, dest, protocol, port)
        });
        (endpoint.endpoint_id, decision)
    };
    record(
        endpoint_id,
        dest,
        protocol,
        port,
        decision,
        Caller::current(),
    );
    Ok(if decision.verdict == verdict::DENY {
        REJECT
    } else {
        PROCEED
    })
}

/// The active epoch (the flip count; its parity is the policy generation); `None` when the state
/// map cannot be read (a datapath fault). The TC path stores it in its tracked flows, so any
/// flip, not only one to the other generation, makes a flow be decided again.
fn active_epoch() -> Option<u32> {
    STATE.get(0).map(|state| state.generation)
}

/// The decision of the policy of `epoch`'s generation for `endpoint_id` reaching `dest` over `protocol`
/// (a key byte, see [`protocol_key`]) at `port` (host order; `0` for protocols without ports,
/// which only rules without a port restriction match). Shared by the socket hooks and the TC
/// programs: two lookups, the address class and the policy.
fn lookup_policy(
    epoch: u32,
    endpoint_id: u32,
    dest: Destination,
    protocol: u8,
    port: u16,
) -> PolicyValue {
    let generation = epoch % GENERATIONS;
    let class_id = class_of(generation, dest);
    let key = Key::new(
        POLICY_PREFIX_PORT,
        PolicyKey::new(generation, endpoint_id, class_id, protocol, port),
    );
    POLICY.get(&key).copied().unwrap_or_else(on_missing_policy)
}

/// Counts a decision and, when it is not a plain allow, sends it to the deny log. Inlined: a BPF
/// function takes at most five arguments.
#[inline(always)]
fn record(
    endpoint_id: u32,
    dest: Destination,
    protocol: u8,
    port: u16,
    decision: PolicyValue,
    caller: Caller,
) {
    count(endpoint_id, dest, protocol, decision);
    if decision.verdict != verdict::ALLOW {
        report(endpoint_id, dest, protocol, port, decision, caller);
    }
}

/// Who made the attempt, for the deny log.
#[derive(Clone, Copy)]
struct Caller {
    pid_tgid: u64,
    comm: [u8; 16],
}

impl Caller {
    /// The current task: socket hooks run in the caller's context.
    fn current() -> Self {
        Self {
            pid_tgid: bpf_get_current_pid_tgid(),
            comm: bpf_get_current_comm().unwrap_or([0; 16]),
        }
    }

    /// No task: a packet seen by a TC program may be handled in softirq context, where the
    /// current task is whoever happened to run, so none is named.
    const NONE: Self = Self {
        pid_tgid: 0,
        comm: [0; 16],
    };
}

/// The endpoint entry of the calling task: its own cgroup's, else its deepest ancestor's that
/// has one. A container cgroup created under a pod after the policy was written is thus
/// enforced from its first syscall without a new map entry, and a cgroup created below a guard
/// before the agent saw it meets the guard.
fn find_endpoint() -> Option<EndpointValue> {
    // SAFETY: helpers without pointer arguments.
    let current = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: values are plain data written whole by the agent.
    if let Some(endpoint) = unsafe { ENDPOINTS.get(current) } {
        return Some(*endpoint);
    }
    for level in (0..MAX_CGROUP_DEPTH).rev() {
        // SAFETY: as above. Levels deeper than the caller's return 0.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if id == 0 || id == current {
            continue;
        }
        // SAFETY: as above.
        if let Some(endpoint) = unsafe { ENDPOINTS.get(id) } {
            return Some(*endpoint);
        }
    }
    None
}

/// The address class of `dest` in `generation`: the longest prefix that holds it.
fn class_of(generation: u32, dest: Destination) -> u32 {
    let found = match dest {
        Destination::V4(addr) => ADDR4.get(Key::new(
            ADDR_KEY_GENERATION_BITS + 32,
            Addr4Key { generation, addr },
        )),
        Destination::V6(addr) => ADDR6.get(Key::new(
            ADDR_KEY_GENERATION_BITS + 128,
            Addr6Key { generation, addr },
        )),
        Destination::Unconnected => None,
    };
    found.map_or(CLASS_WORLD, |class| class.class_id)
}

/// Counts one attempt under (endpoint, destination, verdict, rule). When the destination map is
/// full the attempt is counted without its destination; when that is full too, per verdict in
/// `COUNTERS_LOST`. Nothing goes uncounted.
fn count(endpoint_id: u32, dest: Destination, protocol: u8, decision: PolicyValue) {
    let mut key = CounterKey {
        endpoint_id,
        rule_id: decision.rule_id,
        addr: [0; 16],
        family: 0,
        protocol,
        verdict: decision.verdict,
        _pad: 0,
    };
    (key.addr, key.family) = dest.encode();
    if bump(&COUNTERS, &key) {
        return;
    }
    key.addr = [0; 16];
    key.family = 0;
    if bump(&COUNTERS_OVERFLOW, &key) {
        return;
    }
    if let Some(lost) = COUNTERS_LOST.get_ptr_mut(u32::from(decision.verdict)) {
        // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
        unsafe { *lost += 1 };
    }
}

/// Sends a blocked or audit decision to the deny log; when the ring buffer is full (no agent
/// reading, or a flood), counts it in `EVENTS_LOST` instead. Inlined, as [`record`].
#[inline(always)]
fn report(
    endpoint_id: u32,
    dest: Destination,
    protocol: u8,
    port: u16,
    decision: PolicyValue,
    caller: Caller,
) {
    let lose = || {
        if let Some(lost) = EVENTS_LOST.get_ptr_mut(0) {
            // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
            unsafe { *lost += 1 };
        }
    };
    if !within_event_budget() {
        lose();
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<DecisionEvent>(0) else {
        lose();
        return;
    };
    let Caller { pid_tgid, comm } = caller;
    let mut event = DecisionEvent {
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        endpoint_id,
        rule_id: decision.rule_id,
        addr: [0; 16],
        port,
        family: 0,
        protocol,
        verdict: decision.verdict,
        _pad: [0; 3],
        comm,
    };
    (event.addr, event.family) = dest.encode();
    entry.write(event);
    entry.submit(0);
}

/// Whether this CPU may send one more deny-log event in the current window (and takes it): at
/// most `EVENTS_PER_WINDOW` per `EVENT_WINDOW_NS`, so that a flood costs the agent a bounded
/// event rate. Without its state (cannot happen for an array), the event is sent.
#[inline(always)]
fn within_event_budget() -> bool {
    let Some(budget) = EVENT_BUDGET.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: a plain helper call; the pointer is this CPU's slot, which only this CPU writes
    // while this program runs.
    unsafe {
        let now = aya_ebpf::helpers::bpf_ktime_get_ns();
        if now.wrapping_sub((*budget).window_start) >= capacity::EVENT_WINDOW_NS {
            (*budget).window_start = now;
            (*budget).sent = 0;
        }
        if (*budget).sent >= capacity::EVENTS_PER_WINDOW {
            return false;
        }
        (*budget).sent += 1;
    }
    true
}

/// Adds one to `key`'s counter in `map`, creating it; false when the map has no room.
fn bump(map: &HashMap<CounterKey, CounterValue>, key: &CounterKey) -> bool {
    for _ in 0..2 {
        if let Some(value) = map.get_ptr_mut(key) {
            // SAFETY: the pointer is to a live map value; other CPUs add to it atomically too.
            unsafe {
                atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*value).attempts, 1)
            };
            return true;
        }
        match map.insert(key, CounterValue { attempts: 1 }, u64::from(BPF_NOEXIST)) {
            Ok(()) => return true,
            // Another CPU created it between our lookup and insert: add to theirs.
            Err(err) if err == -EEXIST => {}
            Err(_) => return false,
        }
    }
    false
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
