//! Loading, attaching and adopting egret's programs, and everything about the pin directory:
//! its layout, its ownership, the links the running agent holds, and what a pinned link must be
//! before it is adopted.
//!
//! A pinned link is adopted only when the kernel's own link and program info say it is egret's:
//! a cgroup link, attached (a link detached with `bpftool link detach` reports cgroup id 0), with
//! the expected attach type at the expected cgroup, running a program of the expected type and
//! name that uses the maps pinned beside it. A dead link is replaced; anything else is refused.

use std::{
    collections::BTreeSet,
    fs::{self, File},
    io,
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    EbpfLoader,
    maps::{Array, Map, MapData, MapError},
    programs::{CgroupSock, CgroupSockAddr, CgroupSockopt, ProgramInfo, loaded_programs},
};
use egret_common::{LAYOUT_VERSION, MetaValue, map_names, program_names};

use super::{BPFFS_MOUNT, DatapathConfig, DatapathError, LoadMode, MapEntries, Result};
use crate::sys::{self, LinkFacts};

/// The kernel programs, built by `build.rs`.
pub(super) static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/egret"));

/// `BPF_PROG_TYPE_CGROUP_SOCK_ADDR` and `BPF_PROG_TYPE_CGROUP_SOCKOPT` (`enum bpf_prog_type`).
const PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const PROG_TYPE_CGROUP_SOCKOPT: u32 = 25;
/// `BPF_PROG_TYPE_CGROUP_SOCK`.
const PROG_TYPE_CGROUP_SOCK: u32 = 9;

/// Maps every egret program uses (`find_endpoint`, `count`, `report`): a program whose map ids
/// lack the ids of these pins is not this pin directory's.
const MAPS_EVERY_PROGRAM_USES: [&str; 3] =
    [map_names::ENDPOINTS, map_names::COUNTERS, map_names::EVENTS];

/// The layout of a pin directory, named here and nowhere else:
///
/// ```text
/// <pin_dir>/maps/EGRET_*        one pinned map per `map_names::ALL`
/// <pin_dir>/links/<program>     one pinned bpf_link per `program_names::ALL`
/// <pin_dir>/links/<tc>@<ifindex> a TCX link per workload interface and `program_names::TC`
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinLayout {
    root: PathBuf,
}

impl PinLayout {
    pub fn new(pin_dir: &Path) -> Self {
        Self {
            root: pin_dir.into(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Directory of the pinned maps.
    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }

    /// Directory of the pinned links.
    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps().join(name)
    }

    pub fn link(&self, name: &str) -> PathBuf {
        self.links().join(name)
    }
}

/// What each program is attached as: (`enum bpf_attach_type`, `enum bpf_prog_type`).
fn expected_kind(name: &str) -> Option<(u32, u32)> {
    // Values from include/uapi/linux/bpf.h.
    match name {
        program_names::CONNECT4 => Some((10, PROG_TYPE_CGROUP_SOCK_ADDR)),
        program_names::CONNECT6 => Some((11, PROG_TYPE_CGROUP_SOCK_ADDR)),
        program_names::SENDMSG4 => Some((14, PROG_TYPE_CGROUP_SOCK_ADDR)),
        program_names::SENDMSG6 => Some((15, PROG_TYPE_CGROUP_SOCK_ADDR)),
        program_names::SETSOCKOPT => Some((22, PROG_TYPE_CGROUP_SOCKOPT)),
        // BPF_CGROUP_INET_SOCK_CREATE.
        program_names::SOCK_CREATE => Some((2, PROG_TYPE_CGROUP_SOCK)),
        _ => None,
    }
}

/// A link the running agent holds open, so removing its pin does not detach the program.
#[derive(Debug)]
pub struct HeldLink {
    pub name: &'static str,
    fd: OwnedFd,
    id: u32,
}

/// What [`Attachment::check_links`] found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkReport {
    /// Programs the kernel reports attached at egret's cgroup.
    pub attached: usize,
    /// Programs whose pin was gone (or replaced) and was pinned again from the held link.
    pub repinned: Vec<&'static str>,
    /// Programs whose link the kernel reported detached (`bpftool link detach`, or their cgroup
    /// went): enforcement by them stopped until they were attached again.
    pub detached: Vec<&'static str>,
    /// Of those, the ones attached again now, with fresh links (pinned in place of the dead).
    pub reattached: Vec<&'static str>,
}

/// egret's programs as attached: the pin layout, the cgroup, the held links.
#[derive(Debug)]
pub struct Attachment {
    layout: PinLayout,
    mode: LoadMode,
    cgroup_id: u64,
    /// The cgroup asked for, to attach a program again that someone detached.
    cgroup: Option<PathBuf>,
    links: Vec<HeldLink>,
}

/// A pinned link that verified as egret's.
enum Found {
    /// egret's program, attached at `cgroup_id`.
    Live { fd: OwnedFd, facts: LinkFacts },
    /// egret's program, detached: replace it.
    Dead,
}

impl Attachment {
    /// Secures the pin directory, adopts the pinned links that verify, attaches the programs
    /// that have no (live) link, and stamps or checks the layout version.
    pub fn open(config: &DatapathConfig, entries: MapEntries) -> Result<Self> {
        let DatapathConfig { pin_dir, cgroup } = config;
        sys::ensure_bpffs(pin_dir, Path::new(BPFFS_MOUNT))?;
        let layout = PinLayout::new(pin_dir);
        sys::secure_pin_dirs(&[layout.root(), &layout.maps(), &layout.links()])?;
        check_layout_version(&layout)?;
        let wanted_cgroup = match cgroup {
            Some(path) => Some((path.clone(), sys::cgroup_id(path)?)),
            None => None,
        };

        let map_ids = pinned_map_ids(&layout)?;
        let mut links = Vec::new();
        let mut missing = Vec::new();
        // Pins of links the kernel reports detached: replaced when egret may attach.
        let mut dead = Vec::new();
        let mut cgroup_id = wanted_cgroup.as_ref().map(|(_, id)| *id);
        for name in program_names::ALL {
            let path = layout.link(name);
            if !sys::check_pin_file(&path)? {
                missing.push(name);
                continue;
            }
            match verify_link(name, &path, map_ids.as_ref())? {
                Found::Live { fd, facts } => {
                    match cgroup_id {
                        None => cgroup_id = Some(facts.cgroup_id),
                        Some(expected) if expected != facts.cgroup_id => {
                            return Err(DatapathError::CgroupMismatch {
                                link: path,
                                attached_id: facts.cgroup_id,
                                requested: wanted_cgroup.as_ref().map_or_else(
                                    || "the cgroup of this pin directory's other links".into(),
                                    |(p, _)| p.display().to_string(),
                                ),
                                requested_id: expected,
                            });
                        }
                        Some(_) => {}
                    }
                    links.push(HeldLink {
                        name,
                        fd,
                        id: facts.id,
                    });
                }
                Found::Dead => {
                    dead.push(path);
                    missing.push(name);
                }
            }
        }

        let mode = if missing.is_empty() {
            tracing::info!(pin_dir = %pin_dir.display(), "adopting pinned datapath");
            LoadMode::Adopted
        } else {
            let Some((cgroup, id)) = wanted_cgroup else {
                return Err(DatapathError::NotAttached {
                    pin_dir: pin_dir.clone(),
                    missing,
                });
            };
            tracing::info!(
                pin_dir = %pin_dir.display(),
                cgroup = %cgroup.display(),
                programs = ?missing,
                "loading programs: no live pinned link for them"
            );
            for path in dead {
                tracing::warn!(
                    link = %path.display(),
                    "pinned link is detached (bpftool link detach?): replacing it"
                );
                fs::remove_file(&path).map_err(|source| DatapathError::Unpin {
                    path: path.clone(),
                    source,
                })?;
            }
            links.extend(attach(&layout, &cgroup, &missing, &entries)?);
            cgroup_id = Some(id);
            LoadMode::Loaded { attached: missing }
        };
        stamp_layout_version(&layout)?;
        Ok(Self {
            layout,
            mode,
            cgroup_id: cgroup_id.unwrap_or(0),
            cgroup: cgroup.clone(),
            links,
        })
    }

    pub fn layout(&self) -> &PinLayout {
        &self.layout
    }

    pub fn mode(&self) -> &LoadMode {
        &self.mode
    }

    /// The cgroup id the programs are attached to.
    pub fn cgroup_id(&self) -> u64 {
        self.cgroup_id
    }

    /// How many of egret's programs the kernel reports attached at egret's cgroup, from the
    /// held links' info (not from the files in `links/`).
    pub fn attached_programs(&self) -> usize {
        self.links
            .iter()
            .filter(|link| {
                sys::bpf_link_info(&link.fd)
                    .is_ok_and(|facts| facts.cgroup_id != 0 && facts.cgroup_id == self.cgroup_id)
            })
            .count()
    }

    /// Pins again, from the held link, every link whose pin was removed (or replaced by
    /// another object), and reports what the kernel says is attached. Meant to be called
    /// periodically by the run loop.
    pub fn check_links(&mut self) -> LinkReport {
        let mut report = LinkReport::default();
        for link in &self.links {
            let path = self.layout.link(link.name);
            let pinned_id = sys::bpf_obj_get(&path)
                .ok()
                .filter(|_| sys::check_pin_file(&path).unwrap_or(false))
                .and_then(|fd| sys::bpf_link_info(&fd).ok())
                .map(|facts| facts.id);
            if pinned_id != Some(link.id) {
                if pinned_id.is_some() || fs::symlink_metadata(&path).is_ok() {
                    // Something else sits at the pin path: only root can have put it there.
                    let _ = fs::remove_file(&path);
                }
                match sys::bpf_obj_pin(link.fd.as_fd(), &path) {
                    Ok(()) => {
                        tracing::warn!(link = %path.display(), "pin was removed: pinned again");
                        report.repinned.push(link.name);
                    }
                    Err(err) => {
                        tracing::error!(link = %path.display(), "failed to pin again: {err}")
                    }
                }
            }
            match sys::bpf_link_info(&link.fd) {
                Ok(facts) if facts.cgroup_id != 0 && facts.cgroup_id == self.cgroup_id => {
                    report.attached += 1;
                }
                _ => report.detached.push(link.name),
            }
        }
        if !report.detached.is_empty() {
            self.attach_again(&mut report);
        }
        report
    }

    /// Attaches the programs `report` found detached again, with fresh links that replace the
    /// dead ones (held and pinned), at the cgroup egret was given; the maps are the pinned ones,
    /// so the policy and counters are those in force.
    fn attach_again(&mut self, report: &mut LinkReport) {
        let names = report.detached.clone();
        let Some(cgroup) = &self.cgroup else {
            tracing::error!(programs = ?names,
                "egret programs detached from their cgroup, and no cgroup to attach them to again: enforcement by them stopped");
            return;
        };
        for name in &names {
            // The dead link's pin: a new link takes its place.
            let _ = fs::remove_file(self.layout.link(name));
        }
        // The maps exist by now: their sizes are theirs.
        match attach(&self.layout, cgroup, &names, &MapEntries::default()) {
            Ok(fresh) => {
                self.links.retain(|link| !names.contains(&link.name));
                self.links.extend(fresh);
                report.attached += names.len();
                tracing::warn!(programs = ?names, cgroup = %cgroup.display(),
                    "egret programs were detached from their cgroup: attached again");
                report.reattached = names;
            }
            Err(err) => tracing::error!(programs = ?names,
                "egret programs detached from their cgroup, and attaching them again failed: {err}; enforcement by them stopped"),
        }
    }
}

/// Verifies the link pinned at `path` as egret's `name`, through the kernel's link and
/// program info.
fn verify_link(name: &'static str, path: &Path, map_ids: Option<&BTreeSet<u32>>) -> Result<Found> {
    let refuse = |found: String| DatapathError::ForeignLink {
        name,
        path: path.into(),
        found,
    };
    let fd = sys::bpf_obj_get(path)?;
    let facts = match sys::bpf_link_info(&fd) {
        Ok(facts) => facts,
        Err(_) => return Err(refuse("a pinned object that is not a link".into())),
    };
    let Some((attach_type, prog_type)) = expected_kind(name) else {
        return Err(DatapathError::MissingProgram { name });
    };
    if facts.link_type != sys::BPF_LINK_TYPE_CGROUP {
        return Err(refuse(format!("link type {}", facts.link_type)));
    }
    let program = program_info(facts.prog_id)
        .ok_or_else(|| refuse(format!("program id {} not found", facts.prog_id)))?;
    let program_type = program.program_type() as u32;
    let program_name = program.name_as_str().unwrap_or("?").to_owned();
    if program_type != prog_type || program_name != name {
        return Err(refuse(format!(
            "program {program_name:?} of type {program_type} (want {name:?} of type {prog_type})"
        )));
    }
    let uses: BTreeSet<u32> = program
        .map_ids()
        .ok()
        .flatten()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let Some(ours) = map_ids else {
        return Err(refuse(
            "a link, but no pinned maps beside it (maps/ is empty)".into(),
        ));
    };
    if !ours.is_subset(&uses) {
        return Err(refuse(format!(
            "program {program_name:?} uses maps {uses:?}, not this pin directory's {ours:?}"
        )));
    }
    // A detached cgroup link keeps its program but reports no cgroup.
    if facts.cgroup_id == 0 {
        return Ok(Found::Dead);
    }
    if facts.attach_type != attach_type {
        return Err(refuse(format!(
            "attach type {} (want {attach_type})",
            facts.attach_type
        )));
    }
    Ok(Found::Live { fd, facts })
}

pub(super) fn program_info(id: u32) -> Option<ProgramInfo> {
    loaded_programs().flatten().find(|p| p.id() == id)
}

/// Ids of the pinned maps every program must use; `None` when they are not pinned yet.
fn pinned_map_ids(layout: &PinLayout) -> Result<Option<BTreeSet<u32>>> {
    let mut ids = BTreeSet::new();
    for name in MAPS_EVERY_PROGRAM_USES {
        let path = layout.map(name);
        if !sys::check_pin_file(&path)? {
            return Ok(None);
        }
        let open_err = |source| DatapathError::OpenMap {
            name,
            path: path.clone(),
            source,
        };
        let data = MapData::from_pin(&path).map_err(open_err)?;
        ids.insert(data.info().map_err(open_err)?.id());
    }
    Ok(Some(ids))
}

/// Refuses pinned maps stamped with another layout version, before anything is loaded
/// against them.
fn check_layout_version(layout: &PinLayout) -> Result<()> {
    let path = layout.map(map_names::META);
    if !sys::check_pin_file(&path)? {
        // Maps pinned before the stamp existed have layout 1, whose programs read the state
        // word as a generation, not a flip count: adopting them would open the node.
        if sys::check_pin_file(&layout.map(map_names::STATE))? {
            return Err(DatapathError::LayoutVersion {
                pin_dir: layout.root().into(),
                pinned: 1,
                supported: LAYOUT_VERSION,
            });
        }
        return Ok(());
    }
    let meta: Array<MapData, MetaValue> = open_map(&layout.maps(), map_names::META)?;
    let found = meta
        .get(&0, 0)
        .map_err(|source| DatapathError::ReadMap {
            name: map_names::META,
            source,
        })?
        .layout_version;
    if found != 0 && found != LAYOUT_VERSION {
        return Err(DatapathError::LayoutVersion {
            pin_dir: layout.root().into(),
            pinned: found,
            supported: LAYOUT_VERSION,
        });
    }
    Ok(())
}

/// Writes [`LAYOUT_VERSION`] into a fresh (zero) stamp. Maps pinned before the stamp existed
/// have the layout of version 1.
fn stamp_layout_version(layout: &PinLayout) -> Result<()> {
    let mut meta: Array<MapData, MetaValue> = open_map(&layout.maps(), map_names::META)?;
    let current = meta.get(&0, 0).map_err(|source| DatapathError::ReadMap {
        name: map_names::META,
        source,
    })?;
    if current.layout_version == 0 {
        let value = MetaValue {
            layout_version: LAYOUT_VERSION,
            flags: 0,
        };
        meta.set(0, value, 0)
            .map_err(|source| DatapathError::WriteMap {
                name: map_names::META,
                entry: format!("layout version {LAYOUT_VERSION}"),
                source,
            })?;
    }
    Ok(())
}

/// Removes egret's pins under `pin_dir`: dropping the last reference to each link detaches its
/// program, and the maps go with the programs. Enforcement stops.
pub fn uninstall(pin_dir: &Path) -> Result<()> {
    let layout = PinLayout::new(pin_dir);
    for dir in [layout.links(), layout.maps()] {
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => return Err(DatapathError::Unpin { path: dir, source }),
        };
        for entry in entries.flatten() {
            let path = entry.path();
            fs::remove_file(&path).map_err(|source| DatapathError::Unpin { path, source })?;
        }
        fs::remove_dir(&dir).map_err(|source| DatapathError::Unpin { path: dir, source })?;
    }
    match fs::remove_dir(pin_dir) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(DatapathError::Unpin {
            path: pin_dir.into(),
            source: err,
        }),
        _ => Ok(()),
    }
}

/// Loads the object (reusing pinned maps), attaches `programs` to `cgroup`, pins their links
/// and returns them held open.
fn attach(
    layout: &PinLayout,
    cgroup: &Path,
    programs: &[&'static str],
    entries: &MapEntries,
) -> Result<Vec<HeldLink>> {
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(layout.maps());
    for (name, size) in entries.by_map() {
        loader.map_max_entries(name, size);
    }
    let mut ebpf = loader
        .load(EBPF_OBJECT)
        .map_err(|source| DatapathError::Load {
            source: Box::new(source),
        })?;
    let cgroup_dir = File::open(cgroup).map_err(|source| DatapathError::Cgroup {
        path: cgroup.into(),
        source,
    })?;
    let mut held = Vec::new();
    for &name in programs {
        let program_err = |source| DatapathError::Program {
            name,
            cgroup: cgroup.into(),
            source,
        };
        let (attach_type, _) = expected_kind(name).ok_or(DatapathError::MissingProgram { name })?;
        let program = ebpf
            .program_mut(name)
            .ok_or(DatapathError::MissingProgram { name })?;
        // The link is made here rather than through aya's `attach`: aya 0.14 cannot turn a
        // sockopt link into a pinnable `FdLink`, and egret holds each link's descriptor anyway.
        let prog_fd = if name == program_names::SOCK_CREATE {
            let program: &mut CgroupSock = program.try_into().map_err(program_err)?;
            program.load().map_err(program_err)?;
            program
                .fd()
                .map_err(program_err)?
                .as_fd()
                .try_clone_to_owned()
        } else if name == program_names::SETSOCKOPT {
            let program: &mut CgroupSockopt = program.try_into().map_err(program_err)?;
            program.load().map_err(program_err)?;
            program
                .fd()
                .map_err(program_err)?
                .as_fd()
                .try_clone_to_owned()
        } else {
            let program: &mut CgroupSockAddr = program.try_into().map_err(program_err)?;
            program.load().map_err(program_err)?;
            program
                .fd()
                .map_err(program_err)?
                .as_fd()
                .try_clone_to_owned()
        }
        .map_err(|source| DatapathError::Cgroup {
            path: cgroup.into(),
            source,
        })?;
        let fd = sys::bpf_link_create_cgroup(prog_fd.as_fd(), cgroup_dir.as_fd(), attach_type)?;
        let facts = sys::bpf_link_info(&fd)?;
        let path = layout.link(name);
        sys::bpf_obj_pin(fd.as_fd(), &path)?;
        held.push(HeldLink {
            name,
            fd,
            id: facts.id,
        });
    }
    Ok(held)
}

pub(super) fn open_map<T>(maps_dir: &Path, name: &'static str) -> Result<T>
where
    T: TryFrom<Map, Error = MapError>,
{
    let path = maps_dir.join(name);
    sys::check_pin_file(&path)?;
    let open_err = |source| DatapathError::OpenMap {
        name,
        path: path.clone(),
        source,
    };
    let data = MapData::from_pin(&path).map_err(open_err)?;
    T::try_from(Map::from_map_data(data).map_err(open_err)?).map_err(open_err)
}
