//! Map keys, values and names shared by egret's kernel programs and its agent.
//!
//! Every type is `#[repr(C)]` with explicit padding and a compile-time size check: the kernel
//! compares key and value sizes byte for byte, so a layout drift must break the build, not the
//! datapath. `docs/datapath.md` describes each map.
#![cfg_attr(target_arch = "bpf", no_std)]

use core::mem::size_of;

/// Names of the maps, as the loaded object and the pin directory know them.
pub mod map_names {
    /// cgroup id -> endpoint.
    pub const ENDPOINTS: &str = "EGRET_ENDPOINTS";
    /// The active policy generation.
    pub const STATE: &str = "EGRET_STATE";
    /// IPv4 destination prefix -> address class.
    pub const ADDR4: &str = "EGRET_ADDR4";
    /// IPv6 destination prefix -> address class.
    pub const ADDR6: &str = "EGRET_ADDR6";
    /// (generation, endpoint, class, protocol, port) prefix -> decision.
    pub const POLICY: &str = "EGRET_POLICY";
    /// (endpoint, destination, verdict, rule) -> attempts.
    pub const COUNTERS: &str = "EGRET_COUNTERS";
    /// Attempts whose destination found no room in `COUNTERS`, without the destination.
    pub const COUNTERS_OVERFLOW: &str = "EGRET_COUNTERS_OVERFLOW";
    /// Attempts that found room in neither counter map, per verdict.
    pub const COUNTERS_LOST: &str = "EGRET_COUNTERS_LOST";
    /// Ring buffer of [`super::DecisionEvent`]s for blocked and audit attempts (the deny log).
    pub const EVENTS: &str = "EGRET_EVENTS";
    /// Events not delivered: the ring buffer had no room, or the CPU's event budget was spent.
    pub const EVENTS_LOST: &str = "EGRET_EVENTS_LOST";
    /// Per CPU: the current window and the events sent in it ([`super::EventBudget`]).
    pub const EVENT_BUDGET: &str = "EGRET_EVENT_BUDGET";
    /// The layout stamp: element 0 holds the [`super::LAYOUT_VERSION`] the pinned maps were
    /// created with.
    pub const META: &str = "EGRET_META";
    /// Endpoint and rule id -> what it stands for: the agent's id table, pinned beside the
    /// counters so that their labels survive a restart. Programs never read it.
    pub const IDS: &str = "EGRET_IDS";
    /// Node-side interface index -> endpoint: the workloads the TC programs decide.
    pub const IFACES: &str = "EGRET_IFACES";
    /// (interface, source address) of each workload: a packet from any other source is forged.
    pub const SOURCES: &str = "EGRET_SOURCES";
    /// The TC programs' connection tracking: flows already decided (LRU, bounded).
    pub const CONNTRACK: &str = "EGRET_CONNTRACK";
    /// Allowed first fragments, whose later fragments follow their verdict (LRU, bounded).
    pub const FRAGMENTS: &str = "EGRET_FRAGMENTS";
    /// Endpoints whose processes may not create packet-level sockets (raw, ping, SCTP): those
    /// no TC program covers, such as workloads in the host's network namespace.
    pub const RAW_REFUSED: &str = "EGRET_RAW_REFUSED";

    /// (epoch, endpoint, destination, protocol, port) -> decision: the per-CPU LRU decision
    /// cache that lets a repeated destination skip the two trie lookups.
    pub const DECISION_CACHE: &str = "EGRET_DECISION_CACHE";

    /// Every map the object must hold.
    pub const ALL: [&str; 19] = [
        ENDPOINTS,
        STATE,
        ADDR4,
        ADDR6,
        POLICY,
        COUNTERS,
        COUNTERS_OVERFLOW,
        COUNTERS_LOST,
        EVENTS,
        EVENTS_LOST,
        EVENT_BUDGET,
        META,
        IDS,
        IFACES,
        SOURCES,
        CONNTRACK,
        FRAGMENTS,
        RAW_REFUSED,
        DECISION_CACHE,
    ];
}

/// Names of the kernel programs; each is named after its hook.
pub mod program_names {
    pub const CONNECT4: &str = "connect4";
    pub const CONNECT6: &str = "connect6";
    pub const SENDMSG4: &str = "sendmsg4";
    pub const SENDMSG6: &str = "sendmsg6";
    /// `cgroup/setsockopt`: refuses source-routing options (IPv6 routing headers, IPv4 LSRR and
    /// SSRR) for endpoints' processes.
    pub const SETSOCKOPT: &str = "setsockopt";
    /// `cgroup/sock_create`: refuses raw, ping and SCTP sockets to endpoints in
    /// [`super::map_names::RAW_REFUSED`].
    pub const SOCK_CREATE: &str = "sock_create";

    /// Every cgroup program the object must hold (attached once, at egret's cgroup).
    pub const ALL: [&str; 6] = [
        CONNECT4,
        CONNECT6,
        SENDMSG4,
        SENDMSG6,
        SETSOCKOPT,
        SOCK_CREATE,
    ];

    /// TCX ingress of a workload's node-side interface: decides what the workload sends.
    pub const TC_FROM_POD: &str = "tc_from_pod";
    /// TCX egress of the same interface: notes connections made to the workload, so that its
    /// replies pass.
    pub const TC_TO_POD: &str = "tc_to_pod";

    /// The TC programs, attached once per workload interface.
    pub const TC: [&str; 2] = [TC_FROM_POD, TC_TO_POD];
}

/// Maximum entries of each map. The agent checks fill ratios against these.
pub mod capacity {
    pub const ENDPOINTS: u32 = 16_384;
    pub const ADDR4: u32 = 262_144;
    pub const ADDR6: u32 = 262_144;
    pub const POLICY: u32 = 1_048_576;
    pub const COUNTERS: u32 = 65_536;
    pub const COUNTERS_OVERFLOW: u32 = 16_384;
    /// Named ids: every live endpoint and rule, and retired ones while counters name them.
    /// Allocated on demand (`BPF_F_NO_PREALLOC`), so only used entries take memory.
    pub const IDS: u32 = 262_144;
    /// Bytes of the event ring buffer: 4,681 events of 56 bytes (plus the kernel's 8-byte
    /// header each) between two reads.
    pub const EVENTS_BYTES: u32 = 256 * 1024;
    /// Deny-log events each CPU may send per [`EVENT_WINDOW_NS`] (20,000 a second): a flood of
    /// denials costs the agent a bounded rate of events whatever its size; the rest are
    /// counted as lost, as a full ring buffer's are (every attempt is still counted in the
    /// counter maps).
    pub const EVENTS_PER_WINDOW: u64 = 2_000;
    pub const EVENT_WINDOW_NS: u64 = 100_000_000;
    /// Workload interfaces on one node.
    pub const IFACES: u32 = 16_384;
    /// Workload source addresses (a few per interface).
    pub const SOURCES: u32 = 65_536;
    /// Tracked flows; least recently used ones are evicted, which costs a new decision, never
    /// a pass.
    pub const CONNTRACK: u32 = 65_536;
    /// Datagrams in fragments in flight.
    pub const FRAGMENTS: u32 = 4_096;
    /// One entry per endpoint at most.
    pub const RAW_REFUSED: u32 = ENDPOINTS;
    /// Cached decisions, split between the CPUs' LRU lists (`BPF_F_NO_COMMON_LRU`): a working
    /// set of a few thousand destinations per node; a miss only costs the trie lookups.
    pub const DECISION_CACHE: u32 = 16_384;
}

/// How many cgroup levels the kernel walks up from the caller to find its endpoint.
///
/// A Kubernetes pod's cgroup sits at depth 3 to 5 (`kubepods.slice/…/pod<uid>.slice/<ctr>.scope`),
/// a systemd service at depth 2; 16 leaves room for nesting while keeping the loop bounded.
pub const MAX_CGROUP_DEPTH: u32 = 16;

/// Number of policy generations: the agent writes the inactive one, then flips.
pub const GENERATIONS: u32 = 2;

/// Address class of a destination that no prefix in the address map covers.
pub const CLASS_WORLD: u32 = 0;

/// Rule id of a decision no rule made: the endpoint's default, or a datapath fallback.
pub const RULE_DEFAULT: u32 = 0;

/// Rule id of a refused source-routing socket option (`IPV6_RTHDR`, `IPV6_2292RTHDR`,
/// `IPV6_2292PKTOPTIONS`, `IP_OPTIONS` with LSRR or SSRR): no policy rule decides it, the
/// `setsockopt` program always refuses it for endpoints.
pub const RULE_SOURCE_ROUTE: u32 = u32::MAX - 2;

/// Rule id of a packet a TC program dropped without a policy decision: a source address that is
/// not its workload's (forged), a fragment whose first fragment was not allowed, a frame that is
/// neither IP nor ARP, or a header egret does not parse.
pub const RULE_MALFORMED: u32 = u32::MAX - 3;

/// Rule id of a refused raw, ping or SCTP socket (`sock_create`): the endpoint has no TC program
/// to decide what such a socket sends.
pub const RULE_RAW_SOCKET: u32 = u32::MAX - 4;

/// Rule id of a decision for an endpoint that has no policy entry in the active generation (a
/// datapath fault: the agent writes an endpoint's policy before the endpoint): allowed, or
/// denied under [`state_flags::FAULT_DENY`].
pub const RULE_MISSING_POLICY: u32 = u32::MAX - 5;

/// Flags of [`StateValue::flags`], written by the agent at every flip.
pub mod state_flags {
    /// Datapath faults (an endpoint without policy) deny instead of allowing (`--on-fault deny`).
    pub const FAULT_DENY: u32 = 1;
}

/// Version of the layout of egret's pinned maps (names, key and value types, sizes). Stamped
/// into [`map_names::META`] when the maps are created; an agent refuses pinned maps stamped
/// with another version instead of misreading them. Raise it with every incompatible change.
///
/// Version 2: [`StateValue::generation`] became the flip count (the generation is its parity),
/// which keys [`map_names::DECISION_CACHE`]; programs of version 1 would read it as a generation
/// and find no policy.
///
/// Version 3: [`StateValue::flags`] carries [`state_flags::FAULT_DENY`] and
/// [`map_names::EVENT_BUDGET`] bounds the deny-log events; an agent adopting programs of version
/// 2 would silently have neither.
///
/// Version 4: [`IfaceValue::flags`] carries [`iface_flags::PENDING`]; programs of version 3
/// ignore it and decide a pending interface's frames as endpoint 0's, not as pending ones
/// (link traffic only, the rest counted under [`RULE_PENDING`]).
pub const LAYOUT_VERSION: u32 = 4;
/// Rule id of a denial of a process whose cgroup lies under a guarded cgroup but is not an
/// endpoint yet (fail closed until the agent has written its policy).
pub const RULE_PENDING: u32 = u32::MAX - 1;

/// Flags of [`EndpointValue::flags`].
pub mod endpoint_flags {
    /// A guard: a cgroup below it that is no endpoint of its own is denied everything, counted
    /// under [`super::RULE_PENDING`], until the agent writes it (fail closed for workloads that
    /// start before the agent has seen them). The guarded cgroup's own processes too.
    pub const PENDING: u32 = 1;
    /// Not egret's: its processes (and those below, up to the next endpoint) are neither decided
    /// nor counted. Lets known cgroups under a guard run unmanaged.
    pub const UNMANAGED: u32 = 2;
}

/// Verdict values, as stored in [`PolicyValue::verdict`] and [`CounterKey::verdict`].
pub mod verdict {
    /// Allowed; counted as `passthrough`.
    pub const ALLOW: u8 = 0;
    /// Denied with `EPERM`; counted as `blocked`.
    pub const DENY: u8 = 1;
    /// Allowed, but an Audit policy would have denied it; counted as `audit`.
    pub const AUDIT: u8 = 2;
    /// Number of verdicts (size of per-verdict arrays).
    pub const COUNT: u32 = 3;
}

/// IP protocol numbers the datapath treats specially.
pub mod protocol {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
    pub const SCTP: u8 = 132;
    /// `IPPROTO_MPTCP`: above 255, so it does not fit the key's protocol byte.
    pub const MPTCP: u32 = 262;
    /// Key byte of protocols that do not fit one (`IPPROTO_RAW`, which no socket hook sees):
    /// only rules without a protocol restriction match it.
    pub const OTHER: u8 = 255;
}

/// The protocol byte of map keys for a socket's protocol number. MPTCP is decided as TCP (its
/// subflows are TCP connections to the same address and port); any other number above 255
/// as [`protocol::OTHER`], never folded onto another protocol's byte.
pub const fn protocol_key(raw: u32) -> u8 {
    if raw == protocol::MPTCP {
        protocol::TCP
    } else if raw > 255 {
        protocol::OTHER
    } else {
        raw as u8
    }
}

/// Address family values in [`CounterKey::family`].
pub mod family {
    pub const INET: u8 = 2;
    pub const INET6: u8 = 10;
    /// Not an address family: in [`super::map_names::COUNTERS_OVERFLOW`], the counts of
    /// destinations the agent took out of [`super::map_names::COUNTERS`] (idle ones, once the
    /// agent had counted them), per (endpoint, rule, protocol, verdict). Only the agent writes
    /// these keys, so its read-add-write cannot race a program's increment.
    pub const FORGOTTEN: u8 = 0xff;
}

/// An endpoint: a cgroup (a pod's, not each container's) whose egress egret decides.
///
/// Value of [`map_names::ENDPOINTS`], keyed by the cgroup id (`u64`, the cgroup directory's inode
/// number on cgroup2).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointValue {
    /// Agent-assigned id, stable for the life of the workload and across agent restarts (the
    /// agent never reuses one); keys the policy and counters. Zero for guards and unmanaged
    /// cgroups.
    pub endpoint_id: u32,
    /// [`endpoint_flags`]; zero for an ordinary endpoint.
    pub flags: u32,
}
const _: () = assert!(size_of::<EndpointValue>() == 8);

/// One CPU's deny-log event budget, the one element of [`map_names::EVENT_BUDGET`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventBudget {
    /// `bpf_ktime_get_ns` at the start of the current window.
    pub window_start: u64,
    /// Events sent in it.
    pub sent: u64,
}
const _: () = assert!(size_of::<EventBudget>() == 16);

/// The datapath's global state, the one element of [`map_names::STATE`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateValue {
    /// The flip count: the agent adds one at every flip. Its parity (`% GENERATIONS`) is the
    /// policy generation programs read; the whole count is the epoch that keys the decision
    /// cache, so a flip makes every cached decision unreachable at once.
    pub generation: u32,
    /// [`state_flags`]; zero is the default behaviour.
    pub flags: u32,
}
const _: () = assert!(size_of::<StateValue>() == 8);

/// The one element of [`map_names::META`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MetaValue {
    /// [`LAYOUT_VERSION`] of the program that created the maps; `0` until the agent stamps it.
    pub layout_version: u32,
    /// Reserved, zero.
    pub flags: u32,
}
const _: () = assert!(size_of::<MetaValue>() == 8);

/// Data part of an [`map_names::ADDR4`] LPM key. Prefix length counts the 32 generation bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Addr4Key {
    pub generation: u32,
    /// Address in network byte order.
    pub addr: [u8; 4],
}
const _: () = assert!(size_of::<Addr4Key>() == 8);

/// Data part of an [`map_names::ADDR6`] LPM key. Prefix length counts the 32 generation bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Addr6Key {
    pub generation: u32,
    /// Address in network byte order.
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<Addr6Key>() == 20);

/// Value of the address maps: the class of addresses that the same rule peers contain.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AddrValue {
    pub class_id: u32,
}
const _: () = assert!(size_of::<AddrValue>() == 4);

/// Bits of an address key's prefix taken by the generation.
pub const ADDR_KEY_GENERATION_BITS: u32 = 32;

/// Data part of a [`map_names::POLICY`] LPM key.
///
/// Field order is match order: the prefix covers generation and endpoint always, then class,
/// protocol and port as far as they are specified. Prefix lengths:
/// [`POLICY_PREFIX_ENDPOINT`] (endpoint default), [`POLICY_PREFIX_CLASS`] (any protocol),
/// [`POLICY_PREFIX_PROTOCOL`] (any port), and up to [`POLICY_PREFIX_PORT`] (one port); a port
/// range is a few prefixes in between.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub generation: u32,
    /// Stored big-endian so the trie's bit order matches numeric order.
    pub endpoint_id_be: [u8; 4],
    /// Stored big-endian, like the endpoint id.
    pub class_id_be: [u8; 4],
    /// IP protocol number (`IPPROTO_TCP`, …).
    pub protocol: u8,
    /// Destination port, network byte order.
    pub port_be: [u8; 2],
    /// Never part of a prefix; zero.
    pub _pad: u8,
}
const _: () = assert!(size_of::<PolicyKey>() == 16);

pub const POLICY_PREFIX_ENDPOINT: u32 = 64;
pub const POLICY_PREFIX_CLASS: u32 = 96;
pub const POLICY_PREFIX_PROTOCOL: u32 = 104;
pub const POLICY_PREFIX_PORT: u32 = 120;

impl PolicyKey {
    /// A fully specified key, as the kernel looks it up.
    pub const fn new(
        generation: u32,
        endpoint_id: u32,
        class_id: u32,
        protocol: u8,
        port: u16,
    ) -> Self {
        Self {
            generation,
            endpoint_id_be: endpoint_id.to_be_bytes(),
            class_id_be: class_id.to_be_bytes(),
            protocol,
            port_be: port.to_be_bytes(),
            _pad: 0,
        }
    }

    pub const fn endpoint_id(&self) -> u32 {
        u32::from_be_bytes(self.endpoint_id_be)
    }

    pub const fn class_id(&self) -> u32 {
        u32::from_be_bytes(self.class_id_be)
    }

    pub const fn port(&self) -> u16 {
        u16::from_be_bytes(self.port_be)
    }
}

/// Value of [`map_names::POLICY`]: what to do, and which rule said so.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyValue {
    /// One of [`verdict`].
    pub verdict: u8,
    pub _pad: [u8; 3],
    /// Agent-assigned id of the deciding rule; [`RULE_DEFAULT`] for the endpoint's default.
    pub rule_id: u32,
}
const _: () = assert!(size_of::<PolicyValue>() == 8);

/// Key of [`map_names::COUNTERS`] (and, with a zero address, of the overflow map).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CounterKey {
    pub endpoint_id: u32,
    pub rule_id: u32,
    /// Destination in network byte order; IPv4 in the first four bytes, the rest zero.
    pub addr: [u8; 16],
    /// One of [`family`]; zero in the overflow map.
    pub family: u8,
    /// IP protocol number.
    pub protocol: u8,
    /// One of [`verdict`].
    pub verdict: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<CounterKey>() == 28);

/// Value of the counter maps. Incremented atomically by the kernel, never reset by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterValue {
    /// Connection attempts (a `connect()`, or one datagram's `sendmsg()`).
    pub attempts: u64,
}
const _: () = assert!(size_of::<CounterValue>() == 8);

/// Key of [`map_names::DECISION_CACHE`]: one decision, valid only while `epoch` is the flip
/// count in [`map_names::STATE`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DecisionCacheKey {
    /// [`StateValue::generation`] (the flip count) the decision was made under.
    pub epoch: u32,
    pub endpoint_id: u32,
    /// Destination in network byte order; IPv4 in the first four bytes, the rest zero.
    pub addr: [u8; 16],
    /// Destination port, host byte order.
    pub port: u16,
    /// One of [`family`].
    pub family: u8,
    /// The protocol byte of the policy key ([`protocol_key`]).
    pub protocol: u8,
}
const _: () = assert!(size_of::<DecisionCacheKey>() == 28);

/// Key of [`map_names::IDS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdKey {
    /// One of [`id_kind`].
    pub kind: u32,
    pub id: u32,
}
const _: () = assert!(size_of::<IdKey>() == 8);

/// Kinds of [`IdKey`].
pub mod id_kind {
    /// The allocator: id 0 holds the next endpoint id, id 1 the next rule id (as `u32` in the
    /// first four bytes, little-endian), so ids are never reused across restarts.
    pub const NEXT: u32 = 0;
    pub const ENDPOINT: u32 = 1;
    pub const RULE: u32 = 2;
}

/// Bytes of an [`IdName`]'s text.
pub const ID_NAME_BYTES: usize = 1016;

/// Value of [`map_names::IDS`]: what an id stands for, as UTF-8 JSON the agent writes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdName {
    /// Bytes of `text` in use.
    pub len: u32,
    pub _pad: u32,
    pub text: [u8; ID_NAME_BYTES],
}
const _: () = assert!(size_of::<IdName>() == 1024);

impl Default for IdName {
    fn default() -> Self {
        Self {
            len: 0,
            _pad: 0,
            text: [0; ID_NAME_BYTES],
        }
    }
}

/// A blocked or audit decision, sent to the agent through [`map_names::EVENTS`] for the deny
/// log. Filled in the caller's context, so the process is known.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecisionEvent {
    /// Thread group id (the process id as userspace sees it).
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    pub endpoint_id: u32,
    pub rule_id: u32,
    /// Destination in network byte order; IPv4 in the first four bytes.
    pub addr: [u8; 16],
    /// Destination port, host byte order.
    pub port: u16,
    /// One of [`family`].
    pub family: u8,
    pub protocol: u8,
    /// One of [`verdict`].
    pub verdict: u8,
    pub _pad: [u8; 3],
    /// The task's command name (`comm`), NUL-padded.
    pub comm: [u8; 16],
}
const _: () = assert!(size_of::<DecisionEvent>() == 56);

/// Value of [`map_names::IFACES`], keyed by the node-side interface index (`u32`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IfaceValue {
    /// The endpoint whose packets come in on the interface; keys policy and counters. Zero for
    /// a pending interface.
    pub endpoint_id: u32,
    /// [`iface_flags`].
    pub flags: u32,
}

/// Flags of [`IfaceValue`].
pub mod iface_flags {
    /// A veth whose pod is not known yet (a pod of the node has started but its veth was not
    /// found yet): only link traffic (ARP, neighbour discovery, DHCP) passes, everything else is
    /// dropped and counted under [`super::RULE_PENDING`], until the agent writes its endpoint.
    /// Closes the window in which a pod's first process could send `AF_PACKET` frames that no
    /// socket hook sees.
    pub const PENDING: u32 = 1;
}
const _: () = assert!(size_of::<IfaceValue>() == 8);

/// Key of [`map_names::SOURCES`]: an address a workload may send from on an interface. The
/// value is a `u32`, the endpoint id (for the agent's reading; programs only test presence).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceKey {
    pub ifindex: u32,
    /// One of [`family`].
    pub family: u8,
    pub _pad: [u8; 3],
    /// Network byte order; IPv4 in the first four bytes, the rest zero.
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<SourceKey>() == 24);

/// Key of [`map_names::CONNTRACK`]: one flow, seen from the workload (local) side, whichever
/// end opened it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub ifindex: u32,
    /// One of [`family`].
    pub family: u8,
    /// IP protocol number.
    pub protocol: u8,
    /// The workload's port (TCP, UDP, SCTP) or ICMP echo identifier; network byte order.
    pub local_port_be: [u8; 2],
    /// The peer's port; network byte order; zero for ICMP.
    pub remote_port_be: [u8; 2],
    pub _pad: [u8; 2],
    /// Network byte order; IPv4 in the first four bytes.
    pub local: [u8; 16],
    pub remote: [u8; 16],
}
const _: () = assert!(size_of::<FlowKey>() == 44);

/// Who opened a tracked flow ([`FlowValue::origin`]).
pub mod flow_origin {
    /// The workload: allowed by the policy of [`super::FlowValue::generation`], decided again
    /// after a generation flip.
    pub const OUTBOUND: u8 = 0;
    /// The peer: the workload's packets are replies, which egress policy does not decide.
    pub const INBOUND: u8 = 1;
}

/// Value of [`map_names::CONNTRACK`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    /// The epoch (the state's flip count, whose parity is the generation) that decided an
    /// outbound flow: any flip decides it again.
    pub generation: u32,
    /// One of [`flow_origin`].
    pub origin: u8,
    /// The verdict that allowed it ([`verdict::ALLOW`] or [`verdict::AUDIT`]).
    pub verdict: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<FlowValue>() == 8);

/// Key of [`map_names::FRAGMENTS`]: one fragmented datagram. The value is the epoch that
/// allowed its first fragment (`u32`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FragmentKey {
    pub ifindex: u32,
    /// IPv4 identification (16 bits) or IPv6 fragment header identification (32 bits).
    pub id: u32,
    /// One of [`family`].
    pub family: u8,
    pub protocol: u8,
    pub _pad: [u8; 2],
    pub src: [u8; 16],
    pub dst: [u8; 16],
}
const _: () = assert!(size_of::<FragmentKey>() == 44);

#[cfg(feature = "user")]
mod user {
    //! Lets the agent use these types as map keys and values.
    use super::*;

    // SAFETY: each type is `repr(C)`, `Copy`, has explicit padding and no invalid bit patterns.
    unsafe impl aya::Pod for EndpointValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for StateValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for MetaValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Addr4Key {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Addr6Key {}
    // SAFETY: as above.
    unsafe impl aya::Pod for AddrValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PolicyKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PolicyValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CounterKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CounterValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for DecisionEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for IdKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for IdName {}
    // SAFETY: as above.
    unsafe impl aya::Pod for IfaceValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SourceKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FlowValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FragmentKey {}
    unsafe impl aya::Pod for DecisionCacheKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_key_orders_bits_like_the_trie() {
        // The LPM trie compares bits from the first byte's most significant bit: big-endian ids
        // and ports make "prefix of the port" mean "range of numerically adjacent ports".
        let key = PolicyKey::new(1, 0x0102_0304, 7, 6, 0x1f90);
        assert_eq!(key.endpoint_id_be, [1, 2, 3, 4]);
        assert_eq!(key.endpoint_id(), 0x0102_0304);
        assert_eq!(key.class_id(), 7);
        assert_eq!(key.port(), 8080);
        assert_eq!(key.port_be, [0x1f, 0x90]);
    }

    #[test]
    fn protocols_above_a_byte_never_fold_onto_another() {
        assert_eq!(protocol_key(6), 6);
        assert_eq!(protocol_key(17), 17);
        assert_eq!(protocol_key(132), 132);
        assert_eq!(protocol_key(262), protocol::TCP);
        // 256 + 17 would be UDP if truncated.
        assert_eq!(protocol_key(273), protocol::OTHER);
        assert_eq!(protocol_key(256 + 6 + 256), protocol::OTHER);
    }

    #[test]
    fn prefix_lengths_match_field_offsets() {
        assert_eq!(
            POLICY_PREFIX_ENDPOINT as usize,
            8 * core::mem::offset_of!(PolicyKey, class_id_be)
        );
        assert_eq!(
            POLICY_PREFIX_CLASS as usize,
            8 * core::mem::offset_of!(PolicyKey, protocol)
        );
        assert_eq!(
            POLICY_PREFIX_PROTOCOL as usize,
            8 * core::mem::offset_of!(PolicyKey, port_be)
        );
        assert_eq!(
            POLICY_PREFIX_PORT as usize,
            8 * core::mem::offset_of!(PolicyKey, _pad)
        );
        assert_eq!(
            ADDR_KEY_GENERATION_BITS as usize,
            8 * core::mem::offset_of!(Addr4Key, addr)
        );
        assert_eq!(
            ADDR_KEY_GENERATION_BITS as usize,
            8 * core::mem::offset_of!(Addr6Key, addr)
        );
    }
}
