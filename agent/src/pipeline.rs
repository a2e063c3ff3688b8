//! The one pipeline every source feeds: cluster state -> compile -> lower -> diff -> apply.
//! Local mode drives it from files; the Kubernetes agent will drive it from reflectors.
//!
//! It also keeps the compiler's id table in step with the copy pinned beside the counters: ids
//! are stored before any entry uses them, and ids that nothing refers to any more (no live
//! object, no kernel counter) are forgotten now and then.

use std::collections::{BTreeMap, BTreeSet};

use egret_common::id_kind;

use crate::{
    datapath::{CgroupRole, Changes, Counters, Datapath, DatapathError, IdEntry},
    policy::{
        compile::{CompileOptions, Compiled, Compiler},
        ids::{IdKind, IdRecord, IdTable},
        model::{PodInfo, World},
    },
};

/// Retired ids the table may hold before a sync looks for ones to forget (each look reads
/// every counter).
const RETIRED_IDS_BEFORE_GC: usize = 1024;

/// What changed in the cluster since the last compile.
#[derive(Debug)]
pub enum StateChange {
    /// Anything: the whole validated cluster.
    World(World),
    /// Only pods (their other objects as before): the compiler redoes what they touch.
    Pods {
        /// Pods added or changed.
        upsert: Vec<PodInfo>,
        /// (namespace, name) of pods gone.
        remove: Vec<(String, String)>,
    },
}

/// Compiler and datapath, and what was last compiled and enforced.
pub struct Pipeline {
    compiler: Compiler,
    compiled: Compiled,
    datapath: Datapath,
    /// cgroup id -> role, as last enforced.
    cgroups: BTreeMap<u64, CgroupRole>,
}

impl Pipeline {
    /// Compiles `world` with the ids pinned in `datapath` (so a restart keeps every id);
    /// nothing is enforced until [`Self::enforce`].
    pub fn new(
        datapath: Datapath,
        world: World,
        options: CompileOptions,
    ) -> Result<Self, DatapathError> {
        let ids = load_ids(&datapath)?;
        let mut compiler = Compiler::with_ids(world, options, ids);
        let compiled = compiler.compile();
        Ok(Self {
            compiler,
            compiled,
            datapath,
            cgroups: BTreeMap::new(),
        })
    }

    /// Recompiles for a new cluster state (not yet enforced).
    pub fn set_world(&mut self, world: World) {
        self.compiler.set_world(world);
        self.compiled = self.compiler.compile();
    }

    /// Recompiles after `change` with `options` (not yet enforced). Ids stay whatever changes.
    pub fn apply(&mut self, change: StateChange, options: CompileOptions) {
        if &options != self.compiler.options() {
            self.compiler.set_options(options);
        }
        match change {
            StateChange::World(world) => self.compiler.set_world(world),
            StateChange::Pods { upsert, remove } => {
                for (namespace, name) in &remove {
                    self.compiler.remove_pod(namespace, name);
                }
                for pod in upsert {
                    self.compiler.update_pod(pod);
                }
            }
        }
        self.compiled = self.compiler.compile();
    }

    /// What the compiler last produced.
    pub fn compiled(&self) -> &Compiled {
        &self.compiled
    }

    pub fn datapath(&self) -> &Datapath {
        &self.datapath
    }

    /// The datapath, to restore its links (`Datapath::check_links`).
    pub fn datapath_mut(&mut self) -> &mut Datapath {
        &mut self.datapath
    }

    /// The cgroups enforced on, and their roles.
    pub fn cgroups(&self) -> &BTreeMap<u64, CgroupRole> {
        &self.cgroups
    }

    /// Writes the last compile to the kernel for `cgroups` (cgroup id -> role): first the
    /// names of new ids, then the policy and the cgroups (see [`Datapath::sync`]). On error the
    /// kernel keeps enforcing what it did.
    pub fn enforce(
        &mut self,
        cgroups: BTreeMap<u64, CgroupRole>,
    ) -> Result<Changes, DatapathError> {
        self.store_ids()?;
        let changes = self.datapath.sync(&self.compiled.desired, &cgroups)?;
        self.cgroups = cgroups;
        // Ids the table holds beyond the live ones: only when there are many does a sync pay
        // for reading every counter.
        let held = self.compiled.ids.endpoint_names().len() + self.compiled.ids.origins().len();
        let live = self.compiled.workloads.len() + self.compiler.live_rules().len();
        if held.saturating_sub(live) > RETIRED_IDS_BEFORE_GC {
            match self.datapath.counters() {
                Ok(counters) => self.forget_unused_ids(&counters)?,
                Err(err) => tracing::warn!(error = %err, "not forgetting ids: counters unreadable"),
            }
        }
        Ok(changes)
    }

    /// Forgets the ids of endpoints and rules that are gone and that no counter names any
    /// more, in the compiler and in the pinned table.
    pub fn forget_unused_ids(&mut self, counters: &Counters) -> Result<(), DatapathError> {
        let mut endpoints: BTreeSet<u32> = self.compiled.workloads.keys().copied().collect();
        endpoints.extend(self.cgroups.values().filter_map(|role| match role {
            CgroupRole::Endpoint(id) => Some(*id),
            CgroupRole::Guard | CgroupRole::Unmanaged => None,
        }));
        let mut rules = self.compiler.live_rules();
        for sample in &counters.samples {
            endpoints.insert(sample.endpoint);
            rules.insert(sample.rule);
        }
        self.compiler.ids_mut().retain(|kind, id| match kind {
            IdKind::Endpoint => endpoints.contains(&id),
            IdKind::Rule => rules.contains(&id),
            IdKind::Next => true,
        });
        self.store_ids()
    }

    /// Writes what changed in the compiler's id table to the pinned one. On error the changes
    /// stay pending and are written by the next call.
    fn store_ids(&mut self) -> Result<(), DatapathError> {
        let changes = self.compiler.ids_mut().take_changes();
        if changes.is_empty() {
            return Ok(());
        }
        let upsert: Vec<IdEntry> = changes
            .upsert
            .iter()
            .map(|IdRecord { kind, id, text }| IdEntry {
                kind: kind_raw(*kind),
                id: *id,
                text: text.clone(),
            })
            .collect();
        let remove: Vec<(u32, u32)> = changes
            .remove
            .iter()
            .map(|(kind, id)| (kind_raw(*kind), *id))
            .collect();
        let result = self.datapath.write_ids(&upsert, &remove);
        if result.is_err() {
            self.compiler.ids_mut().restore_changes(changes);
        }
        result
    }
}

/// The id table pinned in `datapath`. A record that does not read is logged and skipped: its
/// counts lose their names, but the allocator still never hands its id out again.
fn load_ids(datapath: &Datapath) -> Result<IdTable, DatapathError> {
    let records: Vec<IdRecord> = datapath
        .id_entries()?
        .into_iter()
        .filter_map(|IdEntry { kind, id, text }| {
            let kind = match kind {
                id_kind::NEXT => IdKind::Next,
                id_kind::ENDPOINT => IdKind::Endpoint,
                id_kind::RULE => IdKind::Rule,
                other => {
                    tracing::warn!(kind = other, id, "id table: unknown record kind, ignored");
                    return None;
                }
            };
            Some(IdRecord { kind, id, text })
        })
        .collect();
    let (table, problems) = IdTable::from_records_lenient(&records);
    for problem in problems {
        tracing::warn!("{problem}; counts under that id lose their names");
    }
    Ok(table)
}

fn kind_raw(kind: IdKind) -> u32 {
    match kind {
        IdKind::Next => id_kind::NEXT,
        IdKind::Endpoint => id_kind::ENDPOINT,
        IdKind::Rule => id_kind::RULE,
    }
}
