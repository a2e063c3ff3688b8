//! The agent's side of the kernel boundary: the only writer of the maps, and the reader of the
//! counters. Loading, attaching, adopting and the pin directory are in [`load`].
//!
//! Policy lives in two generations. [`Datapath::apply`] writes the inactive one (a diff against
//! what it held), then flips the one-word state map: every decision the kernel makes reads one
//! generation whole, so no connection sees a verdict that is neither the old policy's nor the
//! new one's.

pub mod barrier;
pub mod batch;
pub mod load;
pub mod lower;
pub mod state;
pub mod tc;

use std::{
    collections::BTreeMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    maps::{Array, HashMap, IterableMap, LpmTrie, MapData, MapError, PerCpuArray, lpm_trie::Key},
    pin::PinError,
    programs::ProgramError,
};
use egret_common::{
    ADDR_KEY_GENERATION_BITS, Addr4Key, Addr6Key, AddrValue, CounterKey, CounterValue,
    DecisionCacheKey, EndpointValue, GENERATIONS, ID_NAME_BYTES, IdKey, IdName, PolicyKey,
    PolicyValue, StateValue, endpoint_flags, family, map_names,
};
use ipnet::{Ipv4Net, Ipv6Net};
use load::{Attachment, open_map};
pub use load::{LinkReport, PinLayout, uninstall};
pub use state::{
    Changes, ClassId, Decision, DesiredState, EndpointId, Lookup, PolicyMatch, PortPrefix, RuleId,
    Verdict, diff,
};

use crate::sys::SysError;

/// Where bpffs is mounted when the pin directory lies on none.
pub const BPFFS_MOUNT: &str = "/sys/fs/bpf";
/// Default pin directory.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/egret";

/// Errors of the datapath; each names the program, map, path or entry involved.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(transparent)]
    Sys(#[from] SysError),
    #[error(
        "egret is not attached at {pin_dir} (no pinned link for {missing:?}); run `egret attach`"
    )]
    NotAttached {
        pin_dir: PathBuf,
        missing: Vec<&'static str>,
    },
    #[error("failed to create pin directory {path}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to open cgroup {path}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to load the eBPF object")]
    Load {
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("the eBPF object has no program {name}")]
    MissingProgram { name: &'static str },
    #[error(
        "the policy needs {needed} entries in {map}, which holds {capacity} with {enforced} of them taken by the enforced policy: nothing was written, the enforced policy stays (make room with --map-entries, or lower --max-policy-entries so that the largest policies are rejected alone)"
    )]
    NoRoom {
        map: &'static str,
        needed: usize,
        enforced: usize,
        capacity: usize,
    },
    #[error("failed to load or attach program {name} to cgroup {cgroup}")]
    Program {
        name: &'static str,
        cgroup: PathBuf,
        #[source]
        source: ProgramError,
    },
    #[error("program {name} has no bpf_link to pin (kernel older than 5.7?)")]
    Link {
        name: &'static str,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("failed to pin {name} at {path}")]
    Pin {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: PinError,
    },
    #[error("failed to open pinned map {name} at {path}")]
    OpenMap {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error("failed to read map {name}")]
    ReadMap {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("failed to write {entry} to map {name} (a full map refuses new entries)")]
    WriteMap {
        name: &'static str,
        entry: String,
        #[source]
        source: MapError,
    },
    #[error(
        "failed to wait for running programs after a generation flip; the generation flipped away from is not rewritten until that wait succeeds"
    )]
    Barrier {
        #[source]
        source: io::Error,
    },
    #[error("id table: the name of {kind} id {id} takes {len} bytes, more than {ID_NAME_BYTES}")]
    IdTooLong { kind: u32, id: u32, len: usize },
    #[error("failed to remove pin {path}")]
    Unpin {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the pinned link {link} is attached to cgroup id {attached_id}, but {requested} (cgroup id {requested_id}) was asked for; detach egret first (`egret detach`) or pass the cgroup it is attached to"
    )]
    CgroupMismatch {
        link: PathBuf,
        attached_id: u64,
        requested: String,
        requested_id: u64,
    },
    #[error(
        "refusing to adopt {path} as egret's {name}: the kernel reports {found}; remove the pin if it is not needed"
    )]
    ForeignLink {
        name: &'static str,
        path: PathBuf,
        found: String,
    },
    #[error(
        "the maps pinned at {pin_dir} have layout version {pinned}, this egret supports version {supported}; migration is not supported yet: `egret detach` (losing counters) or run the matching egret"
    )]
    LayoutVersion {
        pin_dir: PathBuf,
        pinned: u32,
        supported: u32,
    },
}

type Result<T, E = DatapathError> = std::result::Result<T, E>;

/// Where the datapath is pinned and which cgroup it enforces on.
#[derive(Clone, Debug)]
pub struct DatapathConfig {
    /// bpffs directory holding `maps/` and `links/`.
    pub pin_dir: PathBuf,
    /// cgroup v2 directory the programs attach to (everything below it is subject to egret).
    /// `None` only adopts: opening fails when the programs are not attached yet.
    pub cgroup: Option<PathBuf>,
}

/// The sizes of the maps whose need grows with the cluster, in entries. They apply when egret
/// creates its maps (a first start, or after `egret detach`); pinned maps keep the size they
/// were made with, and a request for another size is logged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapEntries {
    pub endpoints: u32,
    pub addr4: u32,
    pub addr6: u32,
    /// Both generations: a policy set may use at most what the enforced one leaves.
    pub policy: u32,
    pub counters: u32,
}

impl Default for MapEntries {
    fn default() -> Self {
        use egret_common::capacity;
        Self {
            endpoints: capacity::ENDPOINTS,
            addr4: capacity::ADDR4,
            addr6: capacity::ADDR6,
            policy: capacity::POLICY,
            counters: capacity::COUNTERS,
        }
    }
}

/// A `--map-entries` item that does not parse.
#[derive(Debug, thiserror::Error)]
#[error(
    "--map-entries {item:?}: {why} (as in policy=2097152; maps: endpoints, addr4, addr6, policy, counters)"
)]
pub struct MapEntriesError {
    pub item: String,
    pub why: &'static str,
}

impl MapEntries {
    /// The defaults with `items` (`map=entries`, map names as in `egret status` without the
    /// `EGRET_` prefix, in any case) applied.
    pub fn parse(items: &[String]) -> std::result::Result<Self, MapEntriesError> {
        let mut out = Self::default();
        for item in items {
            let err = |why| MapEntriesError {
                item: item.clone(),
                why,
            };
            let (name, value) = item.split_once('=').ok_or_else(|| err("no `=`"))?;
            let value: u32 = value
                .trim()
                .parse()
                .map_err(|_| err("not a whole number of entries"))?;
            if value == 0 {
                return Err(err("a map needs at least one entry"));
            }
            let slot = match name.trim().to_ascii_lowercase().as_str() {
                "endpoints" => &mut out.endpoints,
                "addr4" => &mut out.addr4,
                "addr6" => &mut out.addr6,
                "policy" => &mut out.policy,
                "counters" => &mut out.counters,
                _ => return Err(err("unknown map")),
            };
            *slot = value;
        }
        Ok(out)
    }

    /// (map name, entries), as the loader sets them.
    pub fn by_map(&self) -> [(&'static str, u32); 5] {
        [
            (map_names::ENDPOINTS, self.endpoints),
            (map_names::ADDR4, self.addr4),
            (map_names::ADDR6, self.addr6),
            (map_names::POLICY, self.policy),
            (map_names::COUNTERS, self.counters),
        ]
    }
}

/// How [`Datapath::open`] came by the programs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoadMode {
    /// Every program was already attached through a pinned link: nothing was loaded, and
    /// enforcement never paused.
    Adopted,
    /// These programs were loaded and attached now (all of them on a first start).
    Loaded { attached: Vec<&'static str> },
}

/// One counter: attempts from an endpoint to a destination with one verdict and rule.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct CounterSample {
    pub endpoint: EndpointId,
    pub rule: RuleId,
    /// `None` for attempts counted without their destination (the destination map was full).
    pub destination: Option<IpAddr>,
    pub protocol: u8,
    pub verdict: Verdict,
    pub attempts: u64,
}

impl CounterSample {
    /// Its key in a counter map, to `destination` (`None`: the entry without destination that
    /// the programs write when the destination map is full).
    fn key_to(&self, destination: Option<IpAddr>) -> CounterKey {
        let (addr, key_family) = destination.map_or(([0; 16], 0), encode_addr);
        CounterKey {
            endpoint_id: self.endpoint,
            rule_id: self.rule,
            addr,
            family: key_family,
            protocol: self.protocol,
            verdict: self.verdict.to_raw(),
            _pad: 0,
        }
    }
}

/// Everything the counter maps hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub samples: Vec<CounterSample>,
    /// Attempts neither counter map had room for, per verdict (allow, deny, audit).
    pub lost: [u64; 3],
}

/// What [`Datapath::forget_counters`] moved out of the destination counter map: (sample,
/// attempts moved), and the failure that stopped it, if one did.
#[derive(Debug, Default)]
pub struct Forgotten {
    pub moved: Vec<(CounterSample, u64)>,
    pub error: Option<DatapathError>,
}

/// Number of entries in each map, for fill ratios.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapUsage {
    pub name: &'static str,
    pub entries: u32,
    pub capacity: u32,
}

/// What the kernel does with the processes of one cgroup (and of the cgroups below it that have
/// no role of their own).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CgroupRole {
    /// Decided by this endpoint's policy.
    Endpoint(EndpointId),
    /// A guard: denied, counted under `RULE_PENDING`, until the agent writes the cgroup (fail
    /// closed for workloads that start before the agent has seen them).
    Guard,
    /// Not egret's: neither decided nor counted (a known non-workload cgroup below a guard).
    Unmanaged,
}

impl CgroupRole {
    fn to_value(self) -> EndpointValue {
        let (endpoint_id, flags) = match self {
            Self::Endpoint(id) => (id, 0),
            Self::Guard => (0, endpoint_flags::PENDING),
            Self::Unmanaged => (0, endpoint_flags::UNMANAGED),
        };
        EndpointValue { endpoint_id, flags }
    }

    fn from_value(value: EndpointValue) -> Self {
        if value.flags & endpoint_flags::UNMANAGED != 0 {
            Self::Unmanaged
        } else if value.flags & endpoint_flags::PENDING != 0 {
            Self::Guard
        } else {
            Self::Endpoint(value.endpoint_id)
        }
    }
}

/// One entry of the pinned id table, as stored: kind (`egret_common::id_kind`), id, text.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct IdEntry {
    pub kind: u32,
    pub id: u32,
    pub text: String,
}

/// The loaded (or adopted) datapath.
pub struct Datapath {
    /// The programs' links, held open, and the pin directory.
    attachment: Attachment,
    endpoints: HashMap<MapData, u64, EndpointValue>,
    state: Array<MapData, StateValue>,
    addr4: LpmTrie<MapData, Addr4Key, AddrValue>,
    addr6: LpmTrie<MapData, Addr6Key, AddrValue>,
    policy: LpmTrie<MapData, PolicyKey, PolicyValue>,
    counters: HashMap<MapData, CounterKey, CounterValue>,
    counters_overflow: HashMap<MapData, CounterKey, CounterValue>,
    counters_lost: PerCpuArray<MapData, u64>,
    ids: HashMap<MapData, IdKey, IdName>,
    decision_cache: HashMap<MapData, DecisionCacheKey, PolicyValue>,
    /// The generation the kernel reads: the parity of `epoch`.
    generation: u32,
    /// The flip count in the state map; keys the kernel's decision cache.
    epoch: u32,
    /// What each generation holds, as read at open and kept in step by `apply`.
    shadow: [DesiredState; GENERATIONS as usize],
    barrier: barrier::ProgramBarrier,
    /// A flip whose wait for running programs has not succeeded yet: the inactive generation
    /// may still be read, so it is not written until the wait succeeds.
    unsettled: bool,
    /// `StateValue::flags` written at every flip (`state_flags`).
    state_flags: u32,
    /// Entries each sized map holds at most, read from the kernel at open (a map keeps the
    /// size it was made with).
    capacities: BTreeMap<&'static str, u32>,
}

impl Datapath {
    /// Adopts the datapath pinned at `config.pin_dir`, or loads and attaches the programs that
    /// are not pinned there yet. Pinned maps are always reused, so a restart keeps policy and
    /// counters.
    pub fn open(config: &DatapathConfig) -> Result<Self> {
        Self::open_with(config, None)
    }

    /// [`Self::open`], creating maps that do not exist yet with `entries` (else the defaults);
    /// pinned maps of another size than `entries` asks for are logged.
    pub fn open_with(config: &DatapathConfig, entries: Option<&MapEntries>) -> Result<Self> {
        let attachment = Attachment::open(config, entries.copied().unwrap_or_default())?;
        let maps_dir = attachment.layout().maps();
        let state: Array<MapData, StateValue> = open_map(&maps_dir, map_names::STATE)?;
        let epoch = state
            .get(&0, 0)
            .map_err(|source| DatapathError::ReadMap {
                name: map_names::STATE,
                source,
            })?
            .generation;
        let mut datapath = Self {
            attachment,
            endpoints: open_map(&maps_dir, map_names::ENDPOINTS)?,
            state,
            addr4: open_map(&maps_dir, map_names::ADDR4)?,
            addr6: open_map(&maps_dir, map_names::ADDR6)?,
            policy: open_map(&maps_dir, map_names::POLICY)?,
            counters: open_map(&maps_dir, map_names::COUNTERS)?,
            counters_overflow: open_map(&maps_dir, map_names::COUNTERS_OVERFLOW)?,
            counters_lost: open_map(&maps_dir, map_names::COUNTERS_LOST)?,
            ids: open_map(&maps_dir, map_names::IDS)?,
            decision_cache: open_map(&maps_dir, map_names::DECISION_CACHE)?,
            generation: epoch % GENERATIONS,
            epoch,
            shadow: Default::default(),
            barrier: barrier::ProgramBarrier::new()
                .map_err(|source| DatapathError::Barrier { source })?,
            // A previous process may have flipped just before it died.
            unsettled: true,
            state_flags: 0,
            capacities: BTreeMap::new(),
        };
        datapath.capacities = datapath.read_capacities()?;
        datapath.shadow = datapath.read_generations()?;
        for (name, wanted) in entries.map(MapEntries::by_map).into_iter().flatten() {
            let held = datapath.capacity(name);
            if held != wanted {
                tracing::warn!(
                    map = name,
                    pinned = held,
                    requested = wanted,
                    "a pinned map keeps the size it was made with: the requested size applies after `egret detach`"
                );
            }
        }
        Ok(datapath)
    }

    /// Entries each sized map holds at most, as the kernel reports (what it was made with).
    fn read_capacities(&self) -> Result<BTreeMap<&'static str, u32>> {
        let read = |name: &'static str, data: &MapData| {
            data.info()
                .map(|info| (name, info.max_entries()))
                .map_err(|source| DatapathError::ReadMap { name, source })
        };
        [
            read(map_names::ENDPOINTS, self.endpoints.map()),
            read(map_names::ADDR4, self.addr4.map()),
            read(map_names::ADDR6, self.addr6.map()),
            read(map_names::POLICY, self.policy.map()),
            read(map_names::COUNTERS, self.counters.map()),
            read(map_names::COUNTERS_OVERFLOW, self.counters_overflow.map()),
        ]
        .into_iter()
        .collect()
    }

    /// Entries `map` holds at most (what it was made with); 0 for a map that is not sized by
    /// [`MapEntries`].
    pub fn capacity(&self, map: &str) -> u32 {
        self.capacities.get(map).copied().unwrap_or(0)
    }

    /// Refuses, before anything is written, a state the maps cannot hold beside the enforced
    /// generation: a write that fails half way costs seconds and leaves the inactive half full.
    fn check_room(&self, desired: &DesiredState) -> Result<()> {
        let active = &self.shadow[self.generation as usize];
        for (map, needed, enforced) in [
            (map_names::ADDR4, desired.addr4.len(), active.addr4.len()),
            (map_names::ADDR6, desired.addr6.len(), active.addr6.len()),
            (map_names::POLICY, desired.policy.len(), active.policy.len()),
        ] {
            let capacity = self.capacity(map) as usize;
            if needed.saturating_add(enforced) > capacity {
                return Err(DatapathError::NoRoom {
                    map,
                    needed,
                    enforced,
                    capacity,
                });
            }
        }
        Ok(())
    }

    /// What a datapath fault (an endpoint without policy in the active generation) gets:
    /// `Deny` or `Allow` (the default). Written with the next flip.
    pub fn set_on_fault(&mut self, verdict: Verdict) {
        if verdict == Verdict::Deny {
            self.state_flags |= egret_common::state_flags::FAULT_DENY;
        } else {
            self.state_flags &= !egret_common::state_flags::FAULT_DENY;
        }
    }

    /// How the programs were come by.
    pub fn mode(&self) -> &LoadMode {
        self.attachment.mode()
    }

    /// The pin directory.
    pub fn pin_dir(&self) -> &Path {
        self.attachment.layout().root()
    }

    /// How many of egret's programs the kernel reports attached at egret's cgroup (from the
    /// links' info, not from the pin files): the `egret_programs_attached` gauge.
    pub fn attached_programs(&self) -> usize {
        self.attachment.attached_programs()
    }

    /// Pins again every link whose pin was removed while egret runs (the agent holds each link
    /// open, so the programs stayed attached), and reports what the kernel says is attached.
    /// Call it periodically.
    pub fn check_links(&mut self) -> LinkReport {
        self.attachment.check_links()
    }

    /// The generation the kernel currently reads.
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// What the kernel currently enforces, as last written (or read at open).
    pub fn active(&self) -> &DesiredState {
        &self.shadow[self.generation as usize]
    }

    /// Makes `desired` the enforced policy: writes the inactive generation, then flips.
    /// On error the active generation is untouched, and so is enforcement.
    pub fn apply(&mut self, desired: &DesiredState) -> Result<Changes> {
        let (next, changes) = self.prepare(desired)?;
        self.flip(next)?;
        Ok(changes)
    }

    /// Writes `desired` into the inactive generation, which no program reads. Returns that
    /// generation and what was written. On error nothing the kernel reads has changed.
    fn prepare(&mut self, desired: &DesiredState) -> Result<(u32, Changes)> {
        if self.unsettled {
            // The last flip's wait failed (or this process did not see it): wait now.
            self.barrier
                .wait()
                .map_err(|source| DatapathError::Barrier { source })?;
            self.unsettled = false;
            self.purge_decision_cache();
        }
        self.check_room(desired)?;
        let next = (self.generation + 1) % GENERATIONS;
        let changes = diff(&self.shadow[next as usize], desired);
        if let Err(err) = self.write_generation(next, &changes) {
            // Whatever did get written stays in the inactive generation; re-read it so the
            // next diff starts from the truth.
            if let Ok(shadow) = self.read_generations() {
                self.shadow = shadow;
            }
            return Err(err);
        }
        self.shadow[next as usize] = desired.clone();
        Ok((next, changes))
    }

    /// Makes the kernel read generation `next`, then waits until no program can still be
    /// reading the other one, so that the next [`Self::prepare`] may rewrite it.
    fn flip(&mut self, next: u32) -> Result<()> {
        // The flip count's parity is the generation; 2^32 is even, so wrapping keeps it.
        let epoch = self.epoch.wrapping_add(1);
        debug_assert_eq!(epoch % GENERATIONS, next);
        self.state
            .set(
                0,
                StateValue {
                    generation: epoch,
                    flags: self.state_flags,
                },
                0,
            )
            .map_err(|source| DatapathError::WriteMap {
                name: map_names::STATE,
                entry: format!("generation {next} (flip {epoch})"),
                source,
            })?;
        self.generation = next;
        self.epoch = epoch;
        self.unsettled = true;
        match self.barrier.wait() {
            Ok(()) => {
                self.unsettled = false;
                self.purge_decision_cache();
            }
            // Enforcement is right (the flip happened); only the next write has to wait.
            Err(err) => tracing::warn!(
                error = %err,
                "waiting for running programs after a flip failed; retried before the next write"
            ),
        }
        tracing::debug!(generation = next, "policy generation flipped");
        Ok(())
    }

    /// Deletes the kernel's cached decisions of past epochs. No program can compute their keys
    /// any more, and after the wait for running programs none still holds one, so the deleted
    /// elements cannot be read while the kernel reuses them. Only makes room: a failure is
    /// logged, and costs cache misses, never a wrong verdict.
    fn purge_decision_cache(&mut self) {
        let epoch = self.epoch;
        let stale = |key: &DecisionCacheKey| key.epoch != epoch;
        let fd = self.decision_cache.map().fd().as_fd();
        let result = match batch::lookup_all::<DecisionCacheKey, PolicyValue>(fd) {
            Ok(batch::Batch::Done(entries)) => {
                let keys: Vec<_> = entries.into_iter().map(|(k, _)| k).filter(stale).collect();
                match batch::delete(fd, &keys) {
                    Ok(batch::Batch::Done(())) => Ok(keys.len()),
                    Ok(batch::Batch::Unsupported) => self.purge_key_by_key(&keys),
                    Err(err) => Err(err.to_string()),
                }
            }
            Ok(batch::Batch::Unsupported) => {
                let keys: Vec<_> = self.decision_cache.keys().flatten().filter(stale).collect();
                self.purge_key_by_key(&keys)
            }
            Err(err) => Err(err.to_string()),
        };
        match result {
            Ok(purged) => tracing::debug!(epoch, purged, "decision cache purged"),
            Err(error) => tracing::warn!(epoch, %error, "failed to purge the decision cache"),
        }
    }

    fn purge_key_by_key(&mut self, keys: &[DecisionCacheKey]) -> Result<usize, String> {
        for key in keys {
            ignore_missing(self.decision_cache.remove(key)).map_err(|e| e.to_string())?;
        }
        Ok(keys.len())
    }

    fn write_generation(&mut self, generation: u32, changes: &Changes) -> Result<()> {
        let Changes {
            upsert_addr4,
            upsert_addr6,
            upsert_policy,
            delete_addr4,
            delete_addr6,
            delete_policy,
        } = changes;
        // Deletes first: they make room for the upserts in a nearly full map.
        for net in delete_addr4 {
            ignore_missing(self.addr4.remove(&addr4_key(generation, *net)))
                .map_err(|source| write_err(map_names::ADDR4, net, source))?;
        }
        for net in delete_addr6 {
            ignore_missing(self.addr6.remove(&addr6_key(generation, *net)))
                .map_err(|source| write_err(map_names::ADDR6, net, source))?;
        }
        for m in delete_policy {
            ignore_missing(
                self.policy
                    .remove(&Key::new(m.prefix_len(), m.to_key(generation))),
            )
            .map_err(|source| write_err(map_names::POLICY, m, source))?;
        }
        // Upserts in batches (`BPF_MAP_UPDATE_BATCH`: one syscall per few thousand entries);
        // from the first refused entry on, one by one, so that an error names its entry.
        let keys: Vec<_> = upsert_addr4
            .iter()
            .map(|(net, _)| addr4_key(generation, *net))
            .collect();
        let values: Vec<_> = upsert_addr4
            .iter()
            .map(|(_, class)| AddrValue { class_id: *class })
            .collect();
        for i in batched(self.addr4.map().fd().as_fd(), &keys, &values)..keys.len() {
            self.addr4
                .insert(&keys[i], values[i], 0)
                .map_err(|source| write_err(map_names::ADDR4, &upsert_addr4[i].0, source))?;
        }
        let keys: Vec<_> = upsert_addr6
            .iter()
            .map(|(net, _)| addr6_key(generation, *net))
            .collect();
        let values: Vec<_> = upsert_addr6
            .iter()
            .map(|(_, class)| AddrValue { class_id: *class })
            .collect();
        for i in batched(self.addr6.map().fd().as_fd(), &keys, &values)..keys.len() {
            self.addr6
                .insert(&keys[i], values[i], 0)
                .map_err(|source| write_err(map_names::ADDR6, &upsert_addr6[i].0, source))?;
        }
        let keys: Vec<_> = upsert_policy
            .iter()
            .map(|(m, _)| Key::new(m.prefix_len(), m.to_key(generation)))
            .collect();
        let values: Vec<_> = upsert_policy
            .iter()
            .map(|(_, decision)| PolicyValue {
                verdict: decision.verdict.to_raw(),
                _pad: [0; 3],
                rule_id: decision.rule,
            })
            .collect();
        for i in batched(self.policy.map().fd().as_fd(), &keys, &values)..keys.len() {
            self.policy
                .insert(&keys[i], values[i], 0)
                .map_err(|source| write_err(map_names::POLICY, &upsert_policy[i].0, source))?;
        }
        Ok(())
    }

    /// Reads what each generation holds from the kernel maps.
    fn read_generations(&self) -> Result<[DesiredState; GENERATIONS as usize]> {
        let mut out: [DesiredState; GENERATIONS as usize] = Default::default();
        let read_err = |name| move |source| DatapathError::ReadMap { name, source };
        for item in self.addr4.iter() {
            let (key, value) = item.map_err(read_err(map_names::ADDR4))?;
            let data = key.data();
            let len = key.prefix_len().saturating_sub(ADDR_KEY_GENERATION_BITS) as u8;
            if let (Some(gen_state), Ok(net)) = (
                out.get_mut(data.generation as usize),
                Ipv4Net::new(Ipv4Addr::from(data.addr), len),
            ) {
                gen_state.addr4.insert(net, value.class_id);
            }
        }
        for item in self.addr6.iter() {
            let (key, value) = item.map_err(read_err(map_names::ADDR6))?;
            let data = key.data();
            let len = key.prefix_len().saturating_sub(ADDR_KEY_GENERATION_BITS) as u8;
            if let (Some(gen_state), Ok(net)) = (
                out.get_mut(data.generation as usize),
                Ipv6Net::new(Ipv6Addr::from(data.addr), len),
            ) {
                gen_state.addr6.insert(net, value.class_id);
            }
        }
        for item in self.policy.iter() {
            let (key, value) = item.map_err(read_err(map_names::POLICY))?;
            let data = key.data();
            if let (Some(gen_state), Some(m), Some(verdict)) = (
                out.get_mut(data.generation as usize),
                PolicyMatch::from_key(&data, key.prefix_len()),
                Verdict::from_raw(value.verdict),
            ) {
                gen_state.policy.insert(
                    m,
                    Decision {
                        verdict,
                        rule: value.rule_id,
                    },
                );
            }
        }
        Ok(out)
    }

    /// Makes the kernel enforce `desired` on exactly `cgroups` (cgroup id -> role), in an order
    /// in which no cgroup is ever decided by entries that are not its own:
    ///
    /// 1. the new policy goes into the inactive generation (nothing the kernel reads changes);
    /// 2. cgroups that go are removed, and cgroups that become guards or unmanaged are written
    ///    (neither reads the policy); a cgroup that moves to another endpoint id becomes a guard
    ///    meanwhile (fail closed): after the flip its old id may have no entries;
    /// 3. the generation flips;
    /// 4. cgroups that become or change endpoint are written: their entries are live now.
    ///
    /// Endpoint ids are stable per workload (`policy::ids`), so step 2's guard only covers a
    /// cgroup that changes workload. If a write fails, every cgroup is either as before with
    /// its own entries live, or a guard; the next sync finishes the job.
    pub fn sync(
        &mut self,
        desired: &DesiredState,
        cgroups: &BTreeMap<u64, CgroupRole>,
    ) -> Result<Changes> {
        let current = self.endpoints()?;
        let (next, changes) = self.prepare(desired)?;
        for (cgroup, role) in &current {
            match (role, cgroups.get(cgroup)) {
                (_, None) => self.remove_endpoint(*cgroup)?,
                (old, Some(new)) if old == new => {}
                // Another workload's cgroup now: its old id's entries may be gone after the
                // flip, and the new id's are not live before it.
                (CgroupRole::Endpoint(_), Some(CgroupRole::Endpoint(_))) => {
                    self.set_role(*cgroup, CgroupRole::Guard)?;
                }
                // A guard or unmanaged cgroup that becomes an endpoint stays as it is (no
                // policy read) until its entries are live.
                (_, Some(CgroupRole::Endpoint(_))) => {}
                (_, Some(new)) => self.set_role(*cgroup, *new)?,
            }
        }
        self.flip(next)?;
        let now = self.endpoints()?;
        for (cgroup, role) in cgroups {
            if now.get(cgroup) != Some(role) {
                self.set_role(*cgroup, *role)?;
            }
        }
        Ok(changes)
    }

    /// Gives the cgroup with id `cgroup_id` (and every cgroup below it without a role of its
    /// own) `role`. An endpoint's policy must be live first: until then it meets
    /// `ON_MISSING_POLICY`.
    pub fn set_role(&mut self, cgroup_id: u64, role: CgroupRole) -> Result<()> {
        self.endpoints
            .insert(cgroup_id, role.to_value(), 0)
            .map_err(|source| DatapathError::WriteMap {
                name: map_names::ENDPOINTS,
                entry: format!("cgroup {cgroup_id} -> {role:?}"),
                source,
            })
    }

    /// Makes the cgroup with id `cgroup_id` (and every cgroup below it) the endpoint
    /// `endpoint`. Write the endpoint's policy first: until then it gets the fail-open default.
    pub fn set_endpoint(&mut self, cgroup_id: u64, endpoint: EndpointId) -> Result<()> {
        self.set_role(cgroup_id, CgroupRole::Endpoint(endpoint))
    }

    /// Stops treating the cgroup as an endpoint; its processes are no longer decided.
    pub fn remove_endpoint(&mut self, cgroup_id: u64) -> Result<()> {
        ignore_missing(self.endpoints.remove(&cgroup_id)).map_err(|source| {
            DatapathError::WriteMap {
                name: map_names::ENDPOINTS,
                entry: format!("cgroup {cgroup_id}"),
                source,
            }
        })
    }

    /// The cgroups the kernel knows, and their roles.
    pub fn endpoints(&self) -> Result<BTreeMap<u64, CgroupRole>> {
        self.endpoints
            .iter()
            .map(|item| item.map(|(cgroup, value)| (cgroup, CgroupRole::from_value(value))))
            .collect::<Result<_, _>>()
            .map_err(|source| DatapathError::ReadMap {
                name: map_names::ENDPOINTS,
                source,
            })
    }

    /// Every entry of the pinned id table.
    pub fn id_entries(&self) -> Result<Vec<IdEntry>> {
        let mut out = Vec::new();
        for item in self.ids.iter() {
            let (key, value) = item.map_err(|source| DatapathError::ReadMap {
                name: map_names::IDS,
                source,
            })?;
            let len = (value.len as usize).min(ID_NAME_BYTES);
            out.push(IdEntry {
                kind: key.kind,
                id: key.id,
                text: String::from_utf8_lossy(&value.text[..len]).into_owned(),
            });
        }
        out.sort();
        Ok(out)
    }

    /// Writes and removes entries of the pinned id table. An entry too long to store is an
    /// error naming it; the others are written.
    pub fn write_ids(&mut self, upsert: &[IdEntry], remove: &[(u32, u32)]) -> Result<()> {
        let mut first_error = None;
        for IdEntry { kind, id, text } in upsert {
            let key = IdKey {
                kind: *kind,
                id: *id,
            };
            let bytes = text.as_bytes();
            if bytes.len() > ID_NAME_BYTES {
                first_error.get_or_insert(DatapathError::IdTooLong {
                    kind: *kind,
                    id: *id,
                    len: bytes.len(),
                });
                continue;
            }
            let mut value = IdName {
                len: bytes.len() as u32,
                ..IdName::default()
            };
            value.text[..bytes.len()].copy_from_slice(bytes);
            if let Err(source) = self.ids.insert(key, value, 0) {
                first_error.get_or_insert(write_err(map_names::IDS, &key, source));
            }
        }
        for (kind, id) in remove {
            let key = IdKey {
                kind: *kind,
                id: *id,
            };
            if let Err(source) = ignore_missing(self.ids.remove(&key)) {
                first_error.get_or_insert(write_err(map_names::IDS, &key, source));
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Reads every counter. The kernel only ever adds to them. Each map is read in batches
    /// (a full 65,536-entry map in a few calls); a kernel without batch lookups for hash maps
    /// is read key by key.
    pub fn counters(&self) -> Result<Counters> {
        let mut samples = Vec::new();
        for (name, map) in [
            (map_names::COUNTERS, &self.counters),
            (map_names::COUNTERS_OVERFLOW, &self.counters_overflow),
        ] {
            for (key, value) in read_all(name, map)? {
                let Some(verdict) = Verdict::from_raw(key.verdict) else {
                    continue;
                };
                samples.push(CounterSample {
                    endpoint: key.endpoint_id,
                    rule: key.rule_id,
                    destination: counter_destination(&key),
                    protocol: key.protocol,
                    verdict,
                    attempts: value.attempts,
                });
            }
        }
        samples.sort();
        // An overflow entry and the forgotten destinations' entry of the same (endpoint, rule,
        // protocol, verdict) are one count without destination.
        samples.dedup_by(|next, kept| {
            let same = (
                next.endpoint,
                next.rule,
                next.destination,
                next.protocol,
                next.verdict,
            ) == (
                kept.endpoint,
                kept.rule,
                kept.destination,
                kept.protocol,
                kept.verdict,
            );
            if same {
                kept.attempts += next.attempts;
            }
            same
        });
        let mut lost = [0u64; 3];
        for (verdict, slot) in lost.iter_mut().enumerate() {
            let per_cpu = self
                .counters_lost
                .get(&(verdict as u32), 0)
                .map_err(|source| DatapathError::ReadMap {
                    name: map_names::COUNTERS_LOST,
                    source,
                })?;
            *slot = per_cpu.iter().sum();
        }
        Ok(Counters { samples, lost })
    }

    /// Takes `samples` (destinations the caller has counted up to their `attempts`, and
    /// idle since) out of the destination counter map, so that its room goes to destinations
    /// still in use; their counts move to the entry without destination of the same
    /// (endpoint, rule, protocol, verdict), which only the agent writes ([`family::FORGOTTEN`]),
    /// so every total stays what the kernel counted. Each is read and deleted in one step, and
    /// whatever was counted after the caller's read moves too. Returns the samples taken out,
    /// with what moved, and the first failure, at which it stops (the rest stays where it is;
    /// what moved before it did move, and the caller must account for it either way).
    pub fn forget_counters(&mut self, samples: &[CounterSample]) -> Forgotten {
        let mut moved = Vec::new();
        let error = self.forget_each(samples, &mut moved).err();
        Forgotten { moved, error }
    }

    fn forget_each(
        &mut self,
        samples: &[CounterSample],
        moved: &mut Vec<(CounterSample, u64)>,
    ) -> Result<()> {
        for sample in samples {
            if sample.destination.is_none() {
                continue;
            }
            let key = sample.key_to(sample.destination);
            let taken = batch::lookup_and_delete::<CounterKey, CounterValue>(
                self.counters.map().fd().as_fd(),
                &key,
            )
            .map_err(|io_error| DatapathError::ReadMap {
                name: map_names::COUNTERS,
                source: MapError::SyscallError(aya::sys::SyscallError {
                    call: "bpf_map_lookup_and_delete_elem",
                    io_error,
                }),
            })?;
            let Some(value) = taken else { continue };
            let forgotten = CounterKey {
                family: family::FORGOTTEN,
                ..sample.key_to(None)
            };
            let before = match self.counters_overflow.get(&forgotten, 0) {
                Ok(v) => v.attempts,
                Err(MapError::KeyNotFound) => 0,
                Err(source) => {
                    self.restore_counter(&key, value);
                    return Err(DatapathError::ReadMap {
                        name: map_names::COUNTERS_OVERFLOW,
                        source,
                    });
                }
            };
            let total = CounterValue {
                attempts: before + value.attempts,
            };
            if let Err(source) = self.counters_overflow.insert(forgotten, total, 0) {
                self.restore_counter(&key, value);
                return Err(write_err(map_names::COUNTERS_OVERFLOW, &forgotten, source));
            }
            moved.push((sample.clone(), value.attempts));
        }
        Ok(())
    }

    /// Deletes the counters of `samples` (endpoints that are gone, whose counts the caller
    /// has taken): a destination's entry, or for a sample without destination both entries
    /// that make it up (the programs' overflow and the agent's [`family::FORGOTTEN`]). No
    /// program counts for a gone endpoint (its cgroups and interfaces point elsewhere and ids
    /// are never reused), so nothing races the delete. Stops at the first failure other than
    /// an entry already gone.
    pub fn delete_counters(&mut self, samples: &[CounterSample]) -> Result<()> {
        for sample in samples {
            let key = sample.key_to(sample.destination);
            let keys: &[(&'static str, CounterKey)] = if sample.destination.is_some() {
                &[(map_names::COUNTERS, key)]
            } else {
                &[
                    (map_names::COUNTERS_OVERFLOW, key),
                    (
                        map_names::COUNTERS_OVERFLOW,
                        CounterKey {
                            family: family::FORGOTTEN,
                            ..key
                        },
                    ),
                ]
            };
            for (name, key) in keys {
                let map = if *name == map_names::COUNTERS {
                    &mut self.counters
                } else {
                    &mut self.counters_overflow
                };
                ignore_missing(map.remove(key)).map_err(|source| write_err(name, key, source))?;
            }
        }
        Ok(())
    }

    /// Puts a counter taken out back (its forgotten entry could not be written); whatever the
    /// kernel counted for it meanwhile is added.
    fn restore_counter(&mut self, key: &CounterKey, value: CounterValue) {
        let now = self.counters.get(key, 0).map_or(0, |v| v.attempts);
        let restored = CounterValue {
            attempts: now + value.attempts,
        };
        if let Err(err) = self.counters.insert(key, restored, 0) {
            tracing::error!(key = ?key, attempts = value.attempts, "a counter taken out could not be put back: {err}");
        }
    }

    /// Entries and capacity of each map, for fill ratios.
    pub fn usage(&self) -> Vec<MapUsage> {
        // The maps this process writes hold what it wrote: both generations of its shadow
        // (counting them key by key costs a syscall per entry, a quarter of a second at 10^5).
        // The counters the kernel fills are read in batches.
        let written = |count: fn(&DesiredState) -> usize| self.shadow.iter().map(count).sum();
        let counted = |map: &HashMap<MapData, CounterKey, CounterValue>| match batch::lookup_all::<
            CounterKey,
            CounterValue,
        >(
            map.map().fd().as_fd(),
        ) {
            Ok(batch::Batch::Done(entries)) => entries.len(),
            Ok(batch::Batch::Unsupported) | Err(_) => map.keys().count(),
        };
        let entries = [
            self.endpoints.keys().count(),
            written(|d| d.addr4.len()),
            written(|d| d.addr6.len()),
            written(|d| d.policy.len()),
            counted(&self.counters),
            counted(&self.counters_overflow),
        ];
        [
            map_names::ENDPOINTS,
            map_names::ADDR4,
            map_names::ADDR6,
            map_names::POLICY,
            map_names::COUNTERS,
            map_names::COUNTERS_OVERFLOW,
        ]
        .into_iter()
        .zip(entries)
        .map(|(name, entries)| MapUsage {
            name,
            entries: entries as u32,
            capacity: self.capacity(name),
        })
        .collect()
    }
}

/// Writes `keys[i] -> values[i]` in batches; returns how many were written. The caller writes
/// the rest one by one: all of them where the kernel has no batch update for the map type.
fn batched<K: aya::Pod, V: aya::Pod>(
    fd: std::os::fd::BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> usize {
    match batch::update(fd, keys, values) {
        batch::Batch::Done((written, error)) => {
            if let Some(error) = error {
                tracing::debug!(written, %error, "batch update stopped; writing the rest one by one");
            }
            written
        }
        batch::Batch::Unsupported => 0,
    }
}

/// Every entry of a counter map: in batches, else key by key.
fn read_all(
    name: &'static str,
    map: &HashMap<MapData, CounterKey, CounterValue>,
) -> Result<Vec<(CounterKey, CounterValue)>> {
    match batch::lookup_all(map.map().fd().as_fd()) {
        Ok(batch::Batch::Done(entries)) => Ok(entries),
        Ok(batch::Batch::Unsupported) => read_key_by_key(name, map),
        Err(io_error) => Err(DatapathError::ReadMap {
            name,
            source: MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_lookup_batch",
                io_error,
            }),
        }),
    }
}

/// Every entry of a counter map, one `get_next_key` and one lookup per entry.
pub fn read_key_by_key(
    name: &'static str,
    map: &HashMap<MapData, CounterKey, CounterValue>,
) -> Result<Vec<(CounterKey, CounterValue)>> {
    map.iter()
        .collect::<Result<_, _>>()
        .map_err(|source| DatapathError::ReadMap { name, source })
}

fn addr4_key(generation: u32, net: Ipv4Net) -> Key<Addr4Key> {
    Key::new(
        ADDR_KEY_GENERATION_BITS + u32::from(net.prefix_len()),
        Addr4Key {
            generation,
            addr: net.network().octets(),
        },
    )
}

fn addr6_key(generation: u32, net: Ipv6Net) -> Key<Addr6Key> {
    Key::new(
        ADDR_KEY_GENERATION_BITS + u32::from(net.prefix_len()),
        Addr6Key {
            generation,
            addr: net.network().octets(),
        },
    )
}

fn counter_destination(key: &CounterKey) -> Option<IpAddr> {
    decode_addr(key.addr, key.family)
}

/// An address as map keys hold it: 16 bytes in network order (IPv4 in the first four) and its
/// [`family`].
pub(crate) fn encode_addr(addr: IpAddr) -> ([u8; 16], u8) {
    let mut out = [0; 16];
    match addr {
        IpAddr::V4(v4) => {
            out[..4].copy_from_slice(&v4.octets());
            (out, family::INET)
        }
        IpAddr::V6(v6) => (v6.octets(), family::INET6),
    }
}

/// The address [`encode_addr`] made; `None` for another family.
pub(crate) fn decode_addr(addr: [u8; 16], key_family: u8) -> Option<IpAddr> {
    match key_family {
        family::INET => {
            let [a, b, c, d, ..] = addr;
            Some(IpAddr::V4(Ipv4Addr::new(a, b, c, d)))
        }
        family::INET6 => Some(IpAddr::V6(Ipv6Addr::from(addr))),
        _ => None,
    }
}

fn write_err(name: &'static str, entry: &impl std::fmt::Debug, source: MapError) -> DatapathError {
    DatapathError::WriteMap {
        name,
        entry: format!("{entry:?}"),
        source,
    }
}

/// A delete of an entry that is already gone has done its job.
fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(err)) if err.io_error.raw_os_error() == Some(libc::ENOENT) => {
            Ok(())
        }
        other => other,
    }
}

/// Reads blocked and audit decisions from the kernel's ring buffer as they happen.
pub struct EventReader {
    ring: aya::maps::RingBuf<MapData>,
    lost: PerCpuArray<MapData, u64>,
}

impl EventReader {
    /// Opens the pinned ring buffer under `pin_dir` (the datapath must be attached).
    pub fn open(pin_dir: &Path) -> Result<Self> {
        let maps_dir = PinLayout::new(pin_dir).maps();
        Ok(Self {
            ring: open_map(&maps_dir, map_names::EVENTS)?,
            lost: open_map(&maps_dir, map_names::EVENTS_LOST)?,
        })
    }

    /// Waits up to `timeout` for events (blocking in `poll` on the ring buffer, woken by the
    /// kernel), then returns every event available.
    pub fn wait(&mut self, timeout: Duration) -> Vec<egret_common::DecisionEvent> {
        use std::os::fd::AsRawFd as _;
        let mut pfd = libc::pollfd {
            fd: self.ring.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let millis = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, millis) };
        let mut events = Vec::new();
        while let Some(item) = self.ring.next() {
            if item.len() >= std::mem::size_of::<egret_common::DecisionEvent>() {
                // SAFETY: the kernel wrote a whole DecisionEvent (checked length); read unaligned.
                events.push(unsafe {
                    item.as_ptr()
                        .cast::<egret_common::DecisionEvent>()
                        .read_unaligned()
                });
            }
        }
        events
    }

    /// Events the kernel dropped because the ring buffer was full.
    pub fn lost(&self) -> u64 {
        self.lost
            .get(&0, 0)
            .map_or(0, |per_cpu| per_cpu.iter().sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_entries_parse_by_name_and_refuse_what_is_not_a_size() {
        let parsed =
            MapEntries::parse(&["policy=2097152".into(), "COUNTERS=131072".into()]).expect("valid");
        assert_eq!(parsed.policy, 2_097_152);
        assert_eq!(parsed.counters, 131_072);
        assert_eq!(parsed.endpoints, MapEntries::default().endpoints);
        for (bad, why) in [
            ("policy", "no `=`"),
            ("policy=lots", "not a whole number of entries"),
            ("policy=0", "a map needs at least one entry"),
            ("conntrack=5", "unknown map"),
        ] {
            let err = MapEntries::parse(&[bad.into()]).expect_err(bad);
            assert_eq!(err.why, why, "{bad}");
            assert!(
                err.to_string()
                    .starts_with(&format!("--map-entries {bad:?}")),
                "{err}"
            );
        }
    }
}
