//! Stable ids for endpoints (workloads) and rules: assigned once, never reused, and kept in a
//! table that the pipeline pins beside the counters, so that a count keeps the labels of the
//! workload and rule that made it across workload churn, policy edits and agent restarts.
//!
//! Ids are what the kernel keys policy and counters by. Were they positions (the n-th pod, the
//! n-th rule), adding one workload would renumber the others, and a cgroup would for a moment be
//! enforced with its neighbour's policy; a restart with one policy added would report old counts
//! under another policy's name. The table is pure data: [`IdTable::to_records`] and
//! [`IdTable::from_records`] are how the pipeline stores it; nothing here does I/O.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use egret_common::{RULE_DEFAULT, RULE_PENDING};
use serde::{Deserialize, Serialize};

use super::explain::Origin;
use crate::datapath::{EndpointId, RuleId};

/// First endpoint id handed out; 0 stands for "no endpoint" (pending denials).
const FIRST_ENDPOINT: EndpointId = 1;
/// First rule id handed out; 0 is the baseline.
const FIRST_RULE: RuleId = 1;

/// Errors of reading a stored table; each names the record.
#[derive(Debug, thiserror::Error)]
pub enum IdError {
    #[error("id table: {kind:?} id {id} is not valid JSON for its kind")]
    Record {
        kind: IdKind,
        id: u32,
        #[source]
        source: serde_json::Error,
    },
}

/// What a record names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IdKind {
    /// The allocator's next ids (record id 0: endpoints, 1: rules).
    Next,
    Endpoint,
    Rule,
}

/// One stored entry of the table.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct IdRecord {
    pub kind: IdKind,
    pub id: u32,
    /// JSON: an [`EndpointName`], an [`Origin`], or for [`IdKind::Next`] a number.
    pub text: String,
}

/// Who an endpoint id stands for.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EndpointName {
    pub namespace: String,
    /// The pod's (or local workload's) name: with the namespace, its identity.
    pub name: String,
    /// The owning workload, for metrics and logs.
    pub workload: String,
}

/// What changed in the table since the last [`IdTable::take_changes`]: the records to write
/// and the ids to forget.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdChanges {
    pub upsert: Vec<IdRecord>,
    pub remove: Vec<(IdKind, u32)>,
}

impl IdChanges {
    pub fn is_empty(&self) -> bool {
        self.upsert.is_empty() && self.remove.is_empty()
    }
}

/// The id table.
#[derive(Clone, Debug)]
pub struct IdTable {
    endpoints: HashMap<(String, String), EndpointId>,
    endpoint_names: BTreeMap<EndpointId, EndpointName>,
    rules: HashMap<Origin, RuleId>,
    origins: BTreeMap<RuleId, Origin>,
    next_endpoint: EndpointId,
    next_rule: RuleId,
    /// Written or removed since the last `take_changes`.
    dirty: BTreeSet<(IdKind, u32)>,
}

impl Default for IdTable {
    fn default() -> Self {
        Self {
            endpoints: HashMap::new(),
            endpoint_names: BTreeMap::new(),
            rules: HashMap::new(),
            origins: BTreeMap::new(),
            next_endpoint: FIRST_ENDPOINT,
            next_rule: FIRST_RULE,
            dirty: BTreeSet::new(),
        }
    }
}

impl IdTable {
    /// The id of the endpoint `namespace/name`, assigned now if it has none. A change of its
    /// owning workload renames the id (the identity stays).
    pub fn endpoint(&mut self, namespace: &str, name: &str, workload: &str) -> EndpointId {
        let key = (namespace.to_owned(), name.to_owned());
        let id = match self.endpoints.get(&key) {
            Some(id) => *id,
            None => {
                let id = self.next_endpoint;
                self.next_endpoint = self.next_endpoint.saturating_add(1);
                self.dirty.insert((IdKind::Next, 0));
                self.endpoints.insert(key, id);
                id
            }
        };
        let wanted = EndpointName {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            workload: workload.to_owned(),
        };
        if self.endpoint_names.get(&id) != Some(&wanted) {
            self.endpoint_names.insert(id, wanted);
            self.dirty.insert((IdKind::Endpoint, id));
        }
        id
    }

    /// The id of the rule `origin` stands for, assigned now if it has none. The baseline is
    /// always [`RULE_DEFAULT`].
    pub fn rule(&mut self, origin: &Origin) -> RuleId {
        match origin {
            Origin::Baseline => return RULE_DEFAULT,
            Origin::Pending => return RULE_PENDING,
            _ => {}
        }
        if let Some(id) = self.rules.get(origin) {
            return *id;
        }
        let id = self.next_rule;
        self.next_rule = self.next_rule.saturating_add(1);
        self.dirty.insert((IdKind::Next, 1));
        self.rules.insert(origin.clone(), id);
        self.origins.insert(id, origin.clone());
        self.dirty.insert((IdKind::Rule, id));
        id
    }

    /// What rule id `id` stands for, live or retired.
    pub fn origin(&self, id: RuleId) -> Option<&Origin> {
        match id {
            RULE_DEFAULT => Some(&Origin::Baseline),
            RULE_PENDING => Some(&Origin::Pending),
            _ => self.origins.get(&id),
        }
    }

    /// Who endpoint id `id` stands for, live or retired.
    pub fn endpoint_name(&self, id: EndpointId) -> Option<&EndpointName> {
        self.endpoint_names.get(&id)
    }

    /// Every rule id and what it stands for.
    pub fn origins(&self) -> &BTreeMap<RuleId, Origin> {
        &self.origins
    }

    /// Every endpoint id and who it stands for.
    pub fn endpoint_names(&self) -> &BTreeMap<EndpointId, EndpointName> {
        &self.endpoint_names
    }

    /// Forgets the endpoint and rule ids for which `keep` is false. Call it only for ids that
    /// nothing refers to any more (no live object, no counter): forgotten ids are never handed
    /// out again, but their names are gone.
    pub fn retain(&mut self, mut keep: impl FnMut(IdKind, u32) -> bool) {
        let gone_endpoints: Vec<EndpointId> = self
            .endpoint_names
            .keys()
            .copied()
            .filter(|id| !keep(IdKind::Endpoint, *id))
            .collect();
        for id in gone_endpoints {
            if let Some(name) = self.endpoint_names.remove(&id) {
                self.endpoints.remove(&(name.namespace, name.name));
            }
            self.dirty.insert((IdKind::Endpoint, id));
        }
        let gone_rules: Vec<RuleId> = self
            .origins
            .keys()
            .copied()
            .filter(|id| !keep(IdKind::Rule, *id))
            .collect();
        for id in gone_rules {
            if let Some(origin) = self.origins.remove(&id) {
                self.rules.remove(&origin);
            }
            self.dirty.insert((IdKind::Rule, id));
        }
    }

    /// The records written or removed since the last call.
    pub fn take_changes(&mut self) -> IdChanges {
        let mut changes = IdChanges::default();
        for (kind, id) in std::mem::take(&mut self.dirty) {
            match self.record(kind, id) {
                Some(record) => changes.upsert.push(record),
                None => changes.remove.push((kind, id)),
            }
        }
        changes
    }

    /// Marks `changes` (taken but not stored) as still to write.
    pub fn restore_changes(&mut self, changes: IdChanges) {
        let IdChanges { upsert, remove } = changes;
        self.dirty
            .extend(upsert.into_iter().map(|record| (record.kind, record.id)));
        self.dirty.extend(remove);
    }

    /// Every record, as the pipeline stores them.
    pub fn to_records(&self) -> Vec<IdRecord> {
        let mut out: Vec<IdRecord> = [(IdKind::Next, 0), (IdKind::Next, 1)]
            .into_iter()
            .chain(self.endpoint_names.keys().map(|id| (IdKind::Endpoint, *id)))
            .chain(self.origins.keys().map(|id| (IdKind::Rule, *id)))
            .filter_map(|(kind, id)| self.record(kind, id))
            .collect();
        out.sort();
        out
    }

    /// A table from stored records. Nothing is dirty afterwards.
    pub fn from_records(records: &[IdRecord]) -> Result<Self, IdError> {
        let (table, mut problems) = Self::from_records_lenient(records);
        match problems.drain(..).next() {
            Some(problem) => Err(problem),
            None => Ok(table),
        }
    }

    /// A table from stored records, leaving out those that do not read (returned). Their ids
    /// are still never handed out again.
    pub fn from_records_lenient(records: &[IdRecord]) -> (Self, Vec<IdError>) {
        let mut table = Self::default();
        let mut problems = Vec::new();
        for record in records {
            if let Err(problem) = table.add_record(record) {
                problems.push(problem);
            }
            match record.kind {
                IdKind::Endpoint => {
                    table.next_endpoint = table.next_endpoint.max(record.id.saturating_add(1));
                }
                IdKind::Rule => {
                    table.next_rule = table.next_rule.max(record.id.saturating_add(1));
                }
                IdKind::Next => {}
            }
        }
        (table, problems)
    }

    fn add_record(&mut self, record: &IdRecord) -> Result<(), IdError> {
        let IdRecord { kind, id, text } = record;
        let (kind, id) = (*kind, *id);
        let err = |source| IdError::Record { kind, id, source };
        match kind {
            IdKind::Next => {
                let next: u32 = serde_json::from_str(text).map_err(err)?;
                match id {
                    0 => self.next_endpoint = self.next_endpoint.max(next),
                    1 => self.next_rule = self.next_rule.max(next),
                    _ => {}
                }
            }
            IdKind::Endpoint => {
                let name: EndpointName = serde_json::from_str(text).map_err(err)?;
                self.endpoints
                    .insert((name.namespace.clone(), name.name.clone()), id);
                self.endpoint_names.insert(id, name);
            }
            IdKind::Rule => {
                let origin: Origin = serde_json::from_str(text).map_err(err)?;
                self.rules.insert(origin.clone(), id);
                self.origins.insert(id, origin);
            }
        }
        Ok(())
    }

    fn record(&self, kind: IdKind, id: u32) -> Option<IdRecord> {
        let text = match kind {
            IdKind::Next => match id {
                0 => Some(self.next_endpoint.to_string()),
                1 => Some(self.next_rule.to_string()),
                _ => None,
            },
            IdKind::Endpoint => self
                .endpoint_names
                .get(&id)
                .and_then(|name| serde_json::to_string(name).ok()),
            IdKind::Rule => self
                .origins
                .get(&id)
                .and_then(|origin| serde_json::to_string(origin).ok()),
        }?;
        Some(IdRecord { kind, id, text })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::crd::RuleAction;

    fn np(name: &str, rule: usize) -> Origin {
        Origin::NetworkPolicyRule {
            namespace: "ns".into(),
            name: name.into(),
            rule,
        }
    }

    #[test]
    fn ids_do_not_depend_on_order_or_on_other_objects() {
        let mut table = IdTable::default();
        let web = table.endpoint("shop", "web", "web");
        let rule = table.rule(&np("only-twenty", 0));
        // Something that sorts first arrives later: nobody is renumbered.
        let first = table.endpoint("aaa", "first", "first");
        let first_rule = table.rule(&np("aaa-first", 0));
        assert_eq!(table.endpoint("shop", "web", "web"), web);
        assert_eq!(table.rule(&np("only-twenty", 0)), rule);
        assert_ne!(first, web);
        assert_ne!(first_rule, rule);
        assert_eq!(table.rule(&Origin::Baseline), RULE_DEFAULT);
    }

    #[test]
    fn a_stored_table_keeps_every_id_and_never_reuses_one() {
        let mut table = IdTable::default();
        let a = table.endpoint("x", "a", "a");
        let b = table.endpoint("x", "b", "deploy-b");
        let egress = Origin::EgressRule {
            policy: "block".into(),
            rule: "metadata".into(),
            action: RuleAction::Deny,
        };
        let r = table.rule(&egress);
        // b and its rule go away and are forgotten.
        table.retain(|kind, id| !(kind == IdKind::Endpoint && id == b));
        let records = table.to_records();
        let mut restored = IdTable::from_records(&records).expect("records");
        assert_eq!(restored.endpoint("x", "a", "a"), a);
        assert_eq!(restored.rule(&egress), r);
        assert_eq!(restored.origin(r), Some(&egress));
        assert_eq!(restored.endpoint_name(b), None);
        // A new pod named like the forgotten one gets a fresh id: old counts of `b` can never
        // be attributed to it.
        let b2 = restored.endpoint("x", "b", "deploy-b");
        assert!(b2 > b, "{b2} reuses an id at or below {b}");
    }

    #[test]
    fn changes_name_exactly_what_to_write_and_forget() {
        let mut table = IdTable::default();
        let a = table.endpoint("x", "a", "a");
        let first = table.take_changes();
        assert!(
            first
                .upsert
                .iter()
                .any(|r| r.kind == IdKind::Endpoint && r.id == a)
        );
        assert!(first.upsert.iter().any(|r| r.kind == IdKind::Next));
        // Asking again changes nothing.
        table.endpoint("x", "a", "a");
        assert!(table.take_changes().is_empty());
        // A new owning workload renames the id.
        table.endpoint("x", "a", "deploy-a");
        let renamed = table.take_changes();
        assert_eq!(renamed.upsert.len(), 1);
        assert!(renamed.upsert[0].text.contains("deploy-a"));
        table.retain(|_, _| false);
        assert_eq!(
            table.take_changes().remove,
            vec![(IdKind::Endpoint, a)],
            "a forgotten id is removed from the store"
        );
    }

    #[test]
    fn a_corrupt_record_is_an_error_naming_it() {
        let err = IdTable::from_records(&[IdRecord {
            kind: IdKind::Rule,
            id: 7,
            text: "{not json".into(),
        }])
        .expect_err("corrupt");
        assert!(err.to_string().contains("Rule id 7"), "{err}");
    }
}
