//! The TC programs on workload interfaces: which interfaces belong to which endpoint (names and
//! globs resolved to interface indexes), attaching `tc_from_pod` and `tc_to_pod` with TCX links,
//! pinning them beside the cgroup links, adopting them after a restart, detaching them when a
//! workload goes, and writing `EGRET_IFACES` and `EGRET_SOURCES`.
//!
//! Any source can drive it: it takes "these interface indexes belong to endpoint N, which sends
//! from these addresses" ([`TcDesired`]). Local mode resolves its `interfaces:` globs with
//! [`resolve_interfaces`]; the Kubernetes agent finds each pod's node-side veth (`source::kubernetes::veth`).

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CStr,
    fs,
    net::IpAddr,
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    EbpfLoader,
    maps::{HashMap, MapData, MapError},
    programs::{ProgramError, SchedClassifier},
};
use egret_common::{IfaceValue, SourceKey, iface_flags, map_names, program_names};

use super::load::{EBPF_OBJECT, PinLayout, open_map, program_info};
use crate::sys::{self, SysError};

/// `BPF_TCX_INGRESS` and `BPF_TCX_EGRESS` (`enum bpf_attach_type`).
const TCX_INGRESS: u32 = 46;
const TCX_EGRESS: u32 = 47;
/// `BPF_PROG_TYPE_SCHED_CLS`.
const PROG_TYPE_SCHED_CLS: u32 = 3;

/// Errors of the TC attachments; each names the interface, program, map or pin involved.
#[derive(Debug, thiserror::Error)]
pub enum TcError {
    #[error(transparent)]
    Sys(#[from] SysError),
    /// Boxed: the datapath's errors are large, and this one is rare.
    #[error(transparent)]
    Datapath(Box<super::DatapathError>),
    #[error("failed to load the eBPF object for the TC programs")]
    Load {
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("the eBPF object has no TC program {name}")]
    MissingProgram { name: &'static str },
    #[error("failed to load TC program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("failed to write {entry} to map {name}")]
    WriteMap {
        name: &'static str,
        entry: String,
        #[source]
        source: MapError,
    },
    #[error("failed to read the links directory {}", path.display())]
    ReadLinks {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to remove pin {}", path.display())]
    Unpin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("refusing to adopt {} as egret's {name}: the kernel reports {found}", path.display())]
    ForeignLink {
        name: &'static str,
        path: PathBuf,
        found: String,
    },
}

type Result<T, E = TcError> = std::result::Result<T, E>;

impl From<super::DatapathError> for TcError {
    fn from(err: super::DatapathError) -> Self {
        Self::Datapath(Box::new(err))
    }
}

/// What one interface is: the endpoint whose packets come in on it, and the addresses that
/// endpoint sends from (any other source address is forged and dropped).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TcEndpoint {
    pub endpoint_id: u32,
    pub addresses: BTreeSet<IpAddr>,
    /// A veth whose pod is not known yet: link traffic only ([`iface_flags::PENDING`]).
    pub pending: bool,
}

/// Node-side interface index -> its endpoint: everything the TC path needs from a source.
pub type TcDesired = BTreeMap<u32, TcEndpoint>;

/// What a source wants of the packet level: the interfaces of workloads with their own network
/// namespace, and the endpoints no interface covers (workloads in the host's network
/// namespace), whose processes may not create raw, ping or SCTP sockets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TcPlan {
    pub interfaces: TcDesired,
    pub uncovered: BTreeSet<u32>,
}

/// The interfaces of the current network namespace whose names match one of `patterns`
/// (names or globs such as `veth-web*`), as name -> index. From `if_nameindex(3)`, which asks
/// the kernel about the caller's namespace (unlike `/sys/class/net`, which shows the namespace
/// sysfs was mounted in).
pub fn resolve_interfaces(patterns: &[String]) -> BTreeMap<String, u32> {
    let globs: Vec<glob::Pattern> = patterns
        .iter()
        .filter_map(|p| match glob::Pattern::new(p) {
            Ok(glob) => Some(glob),
            Err(err) => {
                tracing::warn!(pattern = %p, "not an interface name or glob: {err}");
                None
            }
        })
        .collect();
    interfaces()
        .into_iter()
        .filter(|(name, _)| globs.iter().any(|g| g.matches(name)))
        .collect()
}

/// Every interface of the current network namespace, name -> index.
fn interfaces() -> BTreeMap<String, u32> {
    let mut out = BTreeMap::new();
    // SAFETY: no arguments; the returned array is freed below.
    let list = unsafe { libc::if_nameindex() };
    if list.is_null() {
        return out;
    }
    let mut entry = list;
    // SAFETY: the array ends with an entry whose index is 0 and name NULL; names are
    // NUL-terminated strings owned by the array until `if_freenameindex`.
    unsafe {
        while (*entry).if_index != 0 && !(*entry).if_name.is_null() {
            let name = CStr::from_ptr((*entry).if_name)
                .to_string_lossy()
                .into_owned();
            out.insert(name, (*entry).if_index);
            entry = entry.add(1);
        }
        libc::if_freenameindex(list);
    }
    out
}

/// Adds the interfaces matching `patterns` to `desired` as endpoint `endpoint_id`'s, sending
/// from `addresses`. An interface two workloads name stays with the first.
pub fn add_workload(
    desired: &mut TcDesired,
    endpoint_id: u32,
    patterns: &[String],
    addresses: &[IpAddr],
) {
    for (name, ifindex) in resolve_interfaces(patterns) {
        if let Some(other) = desired.get(&ifindex) {
            if other.endpoint_id != endpoint_id {
                tracing::warn!(interface = %name, endpoint = endpoint_id, other = other.endpoint_id,
                    "interface named by two workloads: kept with the first");
            }
            continue;
        }
        desired.insert(
            ifindex,
            TcEndpoint {
                endpoint_id,
                addresses: addresses.iter().copied().collect(),
                pending: false,
            },
        );
    }
}

/// What a source says about one workload's packet level: the node-side interfaces it sends
/// through (names or globs), and the addresses it sends from. No patterns: the workload shares
/// the host's network namespace, and no TC program can cover it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkloadInterfaces {
    pub patterns: Vec<String>,
    pub addresses: Vec<IpAddr>,
}

/// The plan for the workloads a source describes ((namespace, name) -> interfaces), for those
/// that compiled to an endpoint (`endpoints`: (namespace, name) -> endpoint id). A workload
/// described without patterns is uncovered; one not described at all (a source that says
/// nothing about interfaces) is neither attached nor refused.
pub fn plan_for(
    workloads: &BTreeMap<(String, String), WorkloadInterfaces>,
    pending: &BTreeSet<u32>,
    endpoints: &BTreeMap<(String, String), u32>,
) -> TcPlan {
    let mut plan = TcPlan::default();
    for (key, w) in workloads {
        let Some(&endpoint_id) = endpoints.get(key) else {
            continue;
        };
        if w.patterns.is_empty() {
            plan.uncovered.insert(endpoint_id);
        } else {
            add_workload(&mut plan.interfaces, endpoint_id, &w.patterns, &w.addresses);
        }
    }
    // A pending interface that a workload claims is that workload's.
    for &ifindex in pending {
        plan.interfaces.entry(ifindex).or_insert(TcEndpoint {
            endpoint_id: 0,
            addresses: BTreeSet::new(),
            pending: true,
        });
    }
    plan
}

/// [`TcAttachments::reconcile`] for a run loop: a failure is logged, and the next pass tries
/// again.
pub fn reconcile_logged(
    tc: &mut TcAttachments,
    workloads: &BTreeMap<(String, String), WorkloadInterfaces>,
    pending: &BTreeSet<u32>,
    endpoints: &BTreeMap<(String, String), u32>,
) {
    if let Err(err) = tc.reconcile(&plan_for(workloads, pending, endpoints)) {
        tracing::error!("failed to attach TC programs: {err}");
    }
}

/// Which end of an interface a program is attached to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Hook {
    program: &'static str,
    attach_type: u32,
}

const HOOKS: [Hook; 2] = [
    Hook {
        program: program_names::TC_FROM_POD,
        attach_type: TCX_INGRESS,
    },
    Hook {
        program: program_names::TC_TO_POD,
        attach_type: TCX_EGRESS,
    },
];

/// Pin name of `hook`'s link on `ifindex`, in the links directory beside the cgroup links.
fn pin_name(hook: &Hook, ifindex: u32) -> String {
    format!("{}@{ifindex}", hook.program)
}

/// The interface index and program of a pin name written by [`pin_name`].
fn parse_pin_name(name: &str) -> Option<(Hook, u32)> {
    let (program, ifindex) = name.split_once('@')?;
    let hook = HOOKS.iter().find(|h| h.program == program)?;
    Some((*hook, ifindex.parse().ok()?))
}

/// The TC programs as attached: held links per interface, and what the maps hold.
pub struct TcAttachments {
    layout: PinLayout,
    /// Program descriptors, loaded when the first interface is attached.
    programs: Option<BTreeMap<&'static str, OwnedFd>>,
    /// Interface index -> its links (program, link), held open.
    links: BTreeMap<u32, Vec<(&'static str, OwnedFd)>>,
    /// What `EGRET_IFACES` and `EGRET_SOURCES` hold, as written.
    written: TcDesired,
    /// What `EGRET_RAW_REFUSED` holds, as written.
    refused: BTreeSet<u32>,
}

/// What [`TcAttachments::check_links`] restored, by program.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TcLinkReport {
    /// Links whose pin was gone (or replaced) and was pinned again from the held link.
    pub repinned: Vec<&'static str>,
    /// Programs found detached and attached again with fresh links.
    pub reattached: Vec<&'static str>,
}

impl std::fmt::Debug for TcAttachments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcAttachments")
            .field("interfaces", &self.links.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl TcAttachments {
    /// Adopts the TC links pinned under `pin_dir` that verify as egret's (a dead one's pin is
    /// removed), and reads back what the interface and source maps hold, so that a restarted
    /// agent changes only what differs.
    pub fn open(pin_dir: &Path) -> Result<Self> {
        let layout = PinLayout::new(pin_dir);
        let mut links: BTreeMap<u32, Vec<(&'static str, OwnedFd)>> = BTreeMap::new();
        let ifaces_id = pinned_map_id(&layout, map_names::IFACES)?;
        let entries = fs::read_dir(layout.links()).map_err(|source| TcError::ReadLinks {
            path: layout.links(),
            source,
        })?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some((hook, ifindex)) = parse_pin_name(&name) else {
                continue;
            };
            let path = entry.path();
            if !sys::check_pin_file(&path)? {
                continue;
            }
            match verify(&hook, ifindex, &path, ifaces_id)? {
                Some(fd) => links.entry(ifindex).or_default().push((hook.program, fd)),
                None => {
                    tracing::warn!(link = %path.display(), "TC link detached (interface gone?): removing its pin");
                    fs::remove_file(&path).map_err(|source| TcError::Unpin {
                        path: path.clone(),
                        source,
                    })?;
                }
            }
        }
        if !links.is_empty() {
            tracing::info!(interfaces = ?links.keys().collect::<Vec<_>>(), "adopted pinned TC links");
        }
        let written = read_written(&layout)?;
        let refused = read_refused(&layout)?;
        Ok(Self {
            layout,
            programs: None,
            links,
            written,
            refused,
        })
    }

    /// Interface indexes with egret's TC programs attached (both ends).
    pub fn interfaces(&self) -> BTreeSet<u32> {
        self.links
            .iter()
            .filter(|(_, fds)| fds.len() == HOOKS.len())
            .map(|(ifindex, _)| *ifindex)
            .collect()
    }

    /// Makes the kernel hold `plan`: the uncovered endpoints, then the interfaces (see
    /// [`Self::reconcile_interfaces`]).
    pub fn reconcile(&mut self, plan: &TcPlan) -> Result<()> {
        let TcPlan {
            interfaces,
            uncovered,
        } = plan;
        if uncovered != &self.refused {
            let mut refused: HashMap<MapData, u32, u32> =
                open_map(&self.layout.maps(), map_names::RAW_REFUSED)?;
            for id in uncovered.difference(&self.refused) {
                refused
                    .insert(id, 1, 0)
                    .map_err(|source| TcError::WriteMap {
                        name: map_names::RAW_REFUSED,
                        entry: format!("endpoint {id}"),
                        source,
                    })?;
            }
            for id in self.refused.difference(uncovered) {
                let _ = refused.remove(id);
            }
            self.refused = uncovered.clone();
        }
        self.reconcile_interfaces(interfaces)
    }

    /// Makes the kernel hold `desired`: sources, then interfaces, are written before the
    /// programs are attached (so the first packet is decided as the workload's); interfaces
    /// that go are detached, then forgotten.
    pub fn reconcile_interfaces(&mut self, desired: &TcDesired) -> Result<()> {
        let gone: Vec<u32> = self
            .links
            .keys()
            .chain(self.written.keys())
            .filter(|ifindex| !desired.contains_key(ifindex))
            .copied()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        for ifindex in gone {
            self.detach(ifindex)?;
        }
        // Most passes of a run loop change nothing: no map is opened then.
        let unchanged = |ifindex: &u32, wanted: &TcEndpoint| {
            self.written.get(ifindex) == Some(wanted)
                && self
                    .links
                    .get(ifindex)
                    .is_some_and(|fds| fds.len() == HOOKS.len())
        };
        if desired
            .iter()
            .all(|(ifindex, wanted)| unchanged(ifindex, wanted))
        {
            return Ok(());
        }
        self.ensure_loaded()?;
        let mut ifaces: HashMap<MapData, u32, IfaceValue> =
            open_map(&self.layout.maps(), map_names::IFACES)?;
        let mut sources: HashMap<MapData, SourceKey, u32> =
            open_map(&self.layout.maps(), map_names::SOURCES)?;
        for (&ifindex, wanted) in desired {
            let before = self.written.get(&ifindex).cloned().unwrap_or_default();
            if &before != wanted {
                for addr in wanted.addresses.difference(&before.addresses) {
                    sources
                        .insert(source_key(ifindex, *addr), wanted.endpoint_id, 0)
                        .map_err(|source| TcError::WriteMap {
                            name: map_names::SOURCES,
                            entry: format!("{addr} on interface {ifindex}"),
                            source,
                        })?;
                }
                let value = IfaceValue {
                    endpoint_id: wanted.endpoint_id,
                    flags: if wanted.pending {
                        iface_flags::PENDING
                    } else {
                        0
                    },
                };
                ifaces
                    .insert(ifindex, value, 0)
                    .map_err(|source| TcError::WriteMap {
                        name: map_names::IFACES,
                        entry: format!("interface {ifindex} -> endpoint {}", wanted.endpoint_id),
                        source,
                    })?;
                for addr in before.addresses.difference(&wanted.addresses) {
                    let _ = sources.remove(&source_key(ifindex, *addr));
                }
                self.written.insert(ifindex, wanted.clone());
            }
            if self
                .links
                .get(&ifindex)
                .is_none_or(|fds| fds.len() != HOOKS.len())
            {
                self.attach(ifindex)?;
            }
        }
        Ok(())
    }

    /// Pins again every held link whose pin was removed (or replaced), and attaches again the
    /// programs of an interface whose link the kernel reports detached (`bpftool link
    /// detach`). An interface that is gone is left to the next reconcile, which forgets it.
    /// Meant to be called periodically by the run loop, as the cgroup links' check is.
    pub fn check_links(&mut self) -> TcLinkReport {
        let mut report = TcLinkReport::default();
        let mut detached: BTreeMap<u32, Vec<&'static str>> = BTreeMap::new();
        for (&ifindex, held) in &self.links {
            for (program, fd) in held {
                let Ok(facts) = sys::bpf_link_info(fd) else {
                    continue;
                };
                if facts.tcx().0 == 0 {
                    detached.entry(ifindex).or_default().push(program);
                    continue;
                }
                let Some(hook) = HOOKS.iter().find(|hook| hook.program == *program) else {
                    continue;
                };
                let path = self.layout.link(&pin_name(hook, ifindex));
                let pinned_id = sys::bpf_obj_get(&path)
                    .ok()
                    .filter(|_| sys::check_pin_file(&path).unwrap_or(false))
                    .and_then(|pinned| sys::bpf_link_info(&pinned).ok())
                    .map(|pinned| pinned.id);
                if pinned_id == Some(facts.id) {
                    continue;
                }
                // Something else sits at the pin path, or nothing: only root can have done it.
                let _ = fs::remove_file(&path);
                match sys::bpf_obj_pin(fd.as_fd(), &path) {
                    Ok(()) => {
                        tracing::warn!(link = %path.display(), "TC link pin was removed: pinned again");
                        report.repinned.push(*program);
                    }
                    Err(err) => {
                        tracing::error!(link = %path.display(), "failed to pin TC link again: {err}")
                    }
                }
            }
        }
        for (ifindex, programs) in detached {
            match self.attach(ifindex) {
                Ok(()) => {
                    tracing::warn!(ifindex, programs = ?programs,
                        "TC programs were detached from their interface: attached again");
                    report.reattached.extend(programs);
                }
                Err(err) => {
                    // The interface went, most likely: forget the dead links; the next
                    // reconcile attaches again if the plan still names it.
                    tracing::info!(
                        ifindex,
                        "TC links detached, and attaching again failed: {err}"
                    );
                    let _ = self.unpin(ifindex);
                    self.links.remove(&ifindex);
                }
            }
        }
        report
    }

    /// Loads the TC programs once, against the pinned maps (creating and pinning those an
    /// older egret did not have).
    fn ensure_loaded(&mut self) -> Result<&BTreeMap<&'static str, OwnedFd>> {
        if self.programs.is_none() {
            let mut ebpf = EbpfLoader::new()
                .default_map_pin_directory(self.layout.maps())
                .load(EBPF_OBJECT)
                .map_err(|source| TcError::Load {
                    source: Box::new(source),
                })?;
            let mut programs = BTreeMap::new();
            for hook in HOOKS {
                let name = hook.program;
                let program_err = |source| TcError::Program { name, source };
                let program: &mut SchedClassifier = ebpf
                    .program_mut(name)
                    .ok_or(TcError::MissingProgram { name })?
                    .try_into()
                    .map_err(program_err)?;
                program.load().map_err(program_err)?;
                let fd = program
                    .fd()
                    .map_err(program_err)?
                    .as_fd()
                    .try_clone_to_owned()
                    .map_err(|source| TcError::Program {
                        name,
                        source: ProgramError::IOError(source),
                    })?;
                programs.insert(name, fd);
            }
            self.programs = Some(programs);
        }
        self.programs
            .as_ref()
            .ok_or(TcError::MissingProgram { name: "tc" })
    }

    /// Attaches both programs to `ifindex` (replacing what is half there) and pins the links.
    fn attach(&mut self, ifindex: u32) -> Result<()> {
        self.unpin(ifindex)?;
        self.links.remove(&ifindex);
        let links_dir = self.layout.clone();
        let programs = self.ensure_loaded()?;
        let mut fds = Vec::new();
        for hook in HOOKS {
            let prog = programs
                .get(hook.program)
                .ok_or(TcError::MissingProgram { name: hook.program })?;
            let fd = sys::bpf_link_create_tcx(prog.as_fd(), ifindex, hook.attach_type)?;
            sys::bpf_obj_pin(fd.as_fd(), &links_dir.link(&pin_name(&hook, ifindex)))?;
            fds.push((hook.program, fd));
        }
        tracing::info!(ifindex, "TC programs attached");
        self.links.insert(ifindex, fds);
        Ok(())
    }

    /// Detaches `ifindex`'s programs (removing the pins and dropping the held links), then
    /// forgets its map entries.
    fn detach(&mut self, ifindex: u32) -> Result<()> {
        self.unpin(ifindex)?;
        if self.links.remove(&ifindex).is_some() {
            tracing::info!(ifindex, "TC programs detached");
        }
        if let Some(before) = self.written.remove(&ifindex) {
            let maps = self.layout.maps();
            if let Ok(mut ifaces) =
                open_map::<HashMap<MapData, u32, IfaceValue>>(&maps, map_names::IFACES)
            {
                let _ = ifaces.remove(&ifindex);
            }
            if let Ok(mut sources) =
                open_map::<HashMap<MapData, SourceKey, u32>>(&maps, map_names::SOURCES)
            {
                for addr in before.addresses {
                    let _ = sources.remove(&source_key(ifindex, addr));
                }
            }
        }
        Ok(())
    }

    fn unpin(&self, ifindex: u32) -> Result<()> {
        for hook in HOOKS {
            let path = self.layout.link(&pin_name(&hook, ifindex));
            match fs::remove_file(&path) {
                Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                    return Err(TcError::Unpin { path, source: err });
                }
                _ => {}
            }
        }
        Ok(())
    }
}

fn source_key(ifindex: u32, addr: IpAddr) -> SourceKey {
    let (addr, family) = super::encode_addr(addr);
    SourceKey {
        ifindex,
        family,
        _pad: [0; 3],
        addr,
    }
}

fn address_of(key: &SourceKey) -> Option<IpAddr> {
    super::decode_addr(key.addr, key.family)
}

/// What the interface and source maps hold (empty when they are not pinned yet).
fn read_written(layout: &PinLayout) -> Result<TcDesired> {
    let mut out = TcDesired::new();
    if !sys::check_pin_file(&layout.map(map_names::IFACES))? {
        return Ok(out);
    }
    let ifaces: HashMap<MapData, u32, IfaceValue> = open_map(&layout.maps(), map_names::IFACES)?;
    for (ifindex, value) in ifaces.iter().flatten() {
        out.insert(
            ifindex,
            TcEndpoint {
                endpoint_id: value.endpoint_id,
                addresses: BTreeSet::new(),
                pending: value.flags & iface_flags::PENDING != 0,
            },
        );
    }
    if sys::check_pin_file(&layout.map(map_names::SOURCES))? {
        let sources: HashMap<MapData, SourceKey, u32> =
            open_map(&layout.maps(), map_names::SOURCES)?;
        for (key, _) in sources.iter().flatten() {
            if let (Some(entry), Some(addr)) = (out.get_mut(&key.ifindex), address_of(&key)) {
                entry.addresses.insert(addr);
            }
        }
    }
    Ok(out)
}

/// What the refused-endpoints map holds (empty when it is not pinned yet).
fn read_refused(layout: &PinLayout) -> Result<BTreeSet<u32>> {
    if !sys::check_pin_file(&layout.map(map_names::RAW_REFUSED))? {
        return Ok(BTreeSet::new());
    }
    let refused: HashMap<MapData, u32, u32> = open_map(&layout.maps(), map_names::RAW_REFUSED)?;
    Ok(refused.keys().flatten().collect())
}

fn pinned_map_id(layout: &PinLayout, name: &'static str) -> Result<Option<u32>> {
    let path = layout.map(name);
    if !sys::check_pin_file(&path)? {
        return Ok(None);
    }
    let data = MapData::from_pin(&path).map_err(|source| super::DatapathError::OpenMap {
        name,
        path: path.clone(),
        source,
    })?;
    let info = data
        .info()
        .map_err(|source| super::DatapathError::OpenMap {
            name,
            path: path.clone(),
            source,
        })?;
    Ok(Some(info.id()))
}

/// Verifies the link pinned at `path` as egret's `hook` on `ifindex`: a TCX link of a
/// `SCHED_CLS` program of that name using this pin directory's `EGRET_IFACES`, attached there.
/// `None`: egret's, but detached (its interface is gone): the pin is stale.
fn verify(
    hook: &Hook,
    ifindex: u32,
    path: &Path,
    ifaces_id: Option<u32>,
) -> Result<Option<OwnedFd>> {
    let name = hook.program;
    let refuse = |found: String| TcError::ForeignLink {
        name,
        path: path.into(),
        found,
    };
    let fd = sys::bpf_obj_get(path)?;
    let Ok(facts) = sys::bpf_link_info(&fd) else {
        return Err(refuse("a pinned object that is not a link".into()));
    };
    if facts.link_type != sys::BPF_LINK_TYPE_TCX {
        return Err(refuse(format!("link type {}", facts.link_type)));
    }
    let program = program_info(facts.prog_id)
        .ok_or_else(|| refuse(format!("program id {} not found", facts.prog_id)))?;
    let program_type = program.program_type() as u32;
    let program_name = program.name_as_str().unwrap_or("?").to_owned();
    if program_type != PROG_TYPE_SCHED_CLS || program_name != name {
        return Err(refuse(format!(
            "program {program_name:?} of type {program_type} (want {name:?} of type {PROG_TYPE_SCHED_CLS})"
        )));
    }
    let uses: BTreeSet<u32> = program
        .map_ids()
        .ok()
        .flatten()
        .unwrap_or_default()
        .into_iter()
        .collect();
    if !ifaces_id.is_some_and(|id| uses.contains(&id)) {
        return Err(refuse(format!(
            "program {program_name:?} uses maps {uses:?}, not this pin directory's {}",
            map_names::IFACES
        )));
    }
    let (attached_to, attach_type) = facts.tcx();
    if attached_to == 0 {
        return Ok(None);
    }
    if attached_to != ifindex || attach_type != hook.attach_type {
        return Err(refuse(format!(
            "attached to interface {attached_to} as attach type {attach_type} (want interface {ifindex}, type {})",
            hook.attach_type
        )));
    }
    Ok(Some(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_names_round_trip_and_ignore_other_links() {
        for hook in HOOKS {
            assert_eq!(parse_pin_name(&pin_name(&hook, 42)), Some((hook, 42)));
        }
        assert_eq!(parse_pin_name("connect4"), None);
        assert_eq!(parse_pin_name("tc_from_pod@x"), None);
        assert_eq!(parse_pin_name("other@3"), None);
    }

    #[test]
    fn source_keys_round_trip_both_families() {
        for addr in ["198.51.100.2", "2001:db8:1::2"] {
            let addr: IpAddr = addr.parse().unwrap();
            assert_eq!(address_of(&source_key(7, addr)), Some(addr));
        }
    }

    #[test]
    fn pending_interfaces_are_held_unless_a_workload_claims_them() {
        // `lo` (index 1) is a workload's; index 9 is pending, and so is `lo` as a source sees it
        // in the same pass: the workload wins.
        let workloads = BTreeMap::from([(
            ("ns".to_owned(), "web".to_owned()),
            WorkloadInterfaces {
                patterns: vec!["lo".into()],
                addresses: vec!["198.51.100.2".parse().unwrap()],
            },
        )]);
        let endpoints = BTreeMap::from([(("ns".to_owned(), "web".to_owned()), 7)]);
        let plan = plan_for(&workloads, &BTreeSet::from([1, 9]), &endpoints);
        assert_eq!(plan.interfaces[&1].endpoint_id, 7);
        assert!(!plan.interfaces[&1].pending);
        assert_eq!(
            plan.interfaces[&9],
            TcEndpoint {
                endpoint_id: 0,
                addresses: BTreeSet::new(),
                pending: true,
            }
        );
        assert!(plan.uncovered.is_empty());
    }

    #[test]
    fn loopback_resolves_by_name_and_glob() {
        assert_eq!(resolve_interfaces(&["lo".into()]).get("lo"), Some(&1));
        assert!(resolve_interfaces(&["l?".into()]).contains_key("lo"));
        assert!(resolve_interfaces(&["nosuch*".into()]).is_empty());
    }
}
