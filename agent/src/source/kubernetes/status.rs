//! What the agent writes back to the API: each EgressPolicy's `Accepted` condition (the
//! Kubernetes way: `status.conditions`, `observedGeneration`, a transition time that moves only
//! when the status does) and an Event per rejected policy. Every node runs an agent, but one at a
//! time writes, elected through a `coordination.k8s.io` Lease in the agent's own namespace.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, ObjectMeta, Time},
    jiff::{SignedDuration, Timestamp},
};
use kube::{
    Api, Client, Resource as _, ResourceExt as _,
    api::{Patch, PatchParams, PostParams},
    runtime::events::{Event, EventType, Recorder, Reporter},
};

use crate::policy::crd::EgressPolicy;

/// The condition type egret writes.
pub const ACCEPTED: &str = "Accepted";
/// Name of the Lease that elects the status writer.
pub const LEASE_NAME: &str = "egret-status-writer";
/// How long a holder's claim lasts without a renewal.
pub const LEASE_SECONDS: i32 = 15;

/// Errors of writing status; each names the object.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("failed to read or write Lease {namespace}/{name}")]
    Lease {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("failed to write the status of EgressPolicy {name}")]
    Status {
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// What to do with the Lease, given what it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseAction {
    /// No Lease yet: create it, holding it.
    Create,
    /// We hold it: renew.
    Renew,
    /// Another holder's claim expired (or there is none): take it over.
    TakeOver,
    /// Another agent holds it: do not write.
    Follow { holder: String },
}

/// Decides from the Lease as read (pure, so it can be tested without an API).
pub fn lease_action(lease: Option<&Lease>, me: &str, now: Timestamp) -> LeaseAction {
    let Some(lease) = lease else {
        return LeaseAction::Create;
    };
    let spec = lease.spec.clone().unwrap_or_default();
    match spec.holder_identity.as_deref() {
        Some(holder) if holder == me => LeaseAction::Renew,
        Some(holder) if !holder.is_empty() => {
            let seconds = i64::from(spec.lease_duration_seconds.unwrap_or(LEASE_SECONDS));
            let expired = spec
                .renew_time
                .or(spec.acquire_time)
                .is_none_or(|renewed| renewed.0 + SignedDuration::from_secs(seconds) < now);
            if expired {
                LeaseAction::TakeOver
            } else {
                LeaseAction::Follow {
                    holder: holder.to_owned(),
                }
            }
        }
        _ => LeaseAction::TakeOver,
    }
}

/// The Lease election for the status writer.
pub struct Election {
    api: Api<Lease>,
    namespace: String,
    identity: String,
}

impl Election {
    /// Competes as `identity` (the agent's pod or node name) for the Lease in `namespace`.
    pub fn new(client: Client, namespace: &str, identity: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            identity: identity.to_owned(),
        }
    }

    /// Acquires or renews the Lease; true while this agent holds it. A write that loses a
    /// race (409 Conflict) is "not the holder", not an error.
    pub async fn hold(&self) -> Result<bool, StatusError> {
        let lease_err = |source| StatusError::Lease {
            namespace: self.namespace.clone(),
            name: LEASE_NAME.into(),
            source,
        };
        let current = self.api.get_opt(LEASE_NAME).await.map_err(lease_err)?;
        let now = Timestamp::now();
        let action = lease_action(current.as_ref(), &self.identity, now);
        let spec = |transitions: i32, acquired: Option<MicroTime>| LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(LEASE_SECONDS),
            acquire_time: acquired.or(Some(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        };
        let result = match (action, current) {
            (LeaseAction::Follow { holder }, _) => {
                tracing::debug!(%holder, "another agent writes policy status");
                return Ok(false);
            }
            (LeaseAction::Create, _) | (_, None) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(LEASE_NAME.into()),
                        namespace: Some(self.namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(spec(0, None)),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            (action, Some(mut lease)) => {
                let old = lease.spec.clone().unwrap_or_default();
                let transitions =
                    old.lease_transitions.unwrap_or(0) + i32::from(action == LeaseAction::TakeOver);
                let acquired = (action == LeaseAction::Renew)
                    .then_some(old.acquire_time)
                    .flatten();
                lease.spec = Some(spec(transitions, acquired));
                // `replace` sends the resourceVersion read: a concurrent writer makes it 409.
                self.api
                    .replace(LEASE_NAME, &PostParams::default(), &lease)
                    .await
            }
        };
        match result {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(source) => Err(lease_err(source)),
        }
    }
}

/// The `Accepted` condition a policy should carry: `True`, or `False` with reason `Invalid` and
/// the message naming the field. Keeps `lastTransitionTime` when the status is unchanged.
pub fn accepted_condition(
    policy: &EgressPolicy,
    problem: Option<&str>,
    now: Timestamp,
) -> Condition {
    let (status, reason, message) = match problem {
        None => (
            "True",
            "Valid",
            "the policy is valid and enforced".to_owned(),
        ),
        Some(problem) => ("False", "Invalid", problem.to_owned()),
    };
    let previous = policy
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == ACCEPTED));
    let last_transition_time = match previous {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => Time(now),
    };
    Condition {
        type_: ACCEPTED.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: policy.metadata.generation,
        last_transition_time,
    }
}

/// Whether `policy` already shows `condition` (everything but the transition time).
fn shows(policy: &EgressPolicy, condition: &Condition) -> bool {
    policy.status.as_ref().is_some_and(|s| {
        s.conditions.iter().any(|c| {
            c.type_ == condition.type_
                && c.status == condition.status
                && c.reason == condition.reason
                && c.message == condition.message
                && c.observed_generation == condition.observed_generation
        })
    })
}

/// Writes status and Events for the elected agent.
pub struct StatusWriter {
    api: Api<EgressPolicy>,
    recorder: Recorder,
    /// Policy name -> the generation an Event was already published for.
    evented: BTreeMap<String, Option<i64>>,
}

impl StatusWriter {
    pub fn new(client: Client, node: &str) -> Self {
        let reporter = Reporter {
            controller: "egret".into(),
            instance: Some(node.to_owned()),
        };
        Self {
            api: Api::all(client.clone()),
            recorder: Recorder::new(client, reporter),
            evented: BTreeMap::new(),
        }
    }

    /// Brings every policy's `Accepted` condition up to date (`problems`: name -> message for
    /// the rejected ones); publishes one Warning Event per rejected policy generation. Returns
    /// how many statuses were written; the first error stops nothing but is returned.
    pub async fn write(
        &mut self,
        policies: &[EgressPolicy],
        problems: &BTreeMap<String, String>,
    ) -> Result<usize, StatusError> {
        let now = Timestamp::now();
        let mut written = 0;
        let mut first_error = None;
        for policy in policies {
            let name = policy.name_any();
            let problem = problems.get(&name).map(String::as_str);
            let condition = accepted_condition(policy, problem, now);
            if !shows(policy, &condition) {
                let patch = serde_json::json!({"status": {"conditions": [condition]}});
                match self
                    .api
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    Ok(_) => written += 1,
                    Err(source) => {
                        first_error.get_or_insert(StatusError::Status {
                            name: name.clone(),
                            source,
                        });
                    }
                }
            }
            let generation = policy.metadata.generation;
            if let Some(problem) = problem
                && self.evented.get(&name) != Some(&generation)
            {
                let event = Event {
                    type_: EventType::Warning,
                    reason: "Invalid".into(),
                    note: Some(problem.chars().take(1000).collect()),
                    action: "Validate".into(),
                    secondary: None,
                };
                let reference = policy.object_ref(&());
                match self.recorder.publish(&event, &reference).await {
                    Ok(()) => {
                        self.evented.insert(name.clone(), generation);
                    }
                    Err(err) => {
                        tracing::warn!(policy = %name, error = %err, "failed to publish an Event");
                    }
                }
            }
        }
        self.evented
            .retain(|name, _| policies.iter().any(|p| &p.name_any() == name));
        first_error.map_or(Ok(written), Err)
    }
}

#[cfg(test)]
mod tests {
    use http::{Request, Response};
    use kube::client::Body;

    use super::*;

    fn lease(holder: &str, renewed_secs_ago: i64) -> Lease {
        let now = Timestamp::now();
        Lease {
            metadata: ObjectMeta {
                name: Some(LEASE_NAME.into()),
                namespace: Some("egret-system".into()),
                resource_version: Some("7".into()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                lease_duration_seconds: Some(LEASE_SECONDS),
                renew_time: Some(MicroTime(now - SignedDuration::from_secs(renewed_secs_ago))),
                ..LeaseSpec::default()
            }),
        }
    }

    #[test]
    fn one_holder_at_a_time_until_its_claim_expires() {
        let now = Timestamp::now();
        assert_eq!(lease_action(None, "node-a", now), LeaseAction::Create);
        assert_eq!(
            lease_action(Some(&lease("node-a", 3)), "node-a", now),
            LeaseAction::Renew
        );
        assert_eq!(
            lease_action(Some(&lease("node-b", 3)), "node-a", now),
            LeaseAction::Follow {
                holder: "node-b".into()
            }
        );
        assert_eq!(
            lease_action(Some(&lease("node-b", 60)), "node-a", now),
            LeaseAction::TakeOver
        );
    }

    fn policy(generation: i64, status: Option<serde_json::Value>) -> EgressPolicy {
        let mut value = serde_json::json!({
            "apiVersion": "egret.dev/v1alpha1", "kind": "EgressPolicy",
            "metadata": {"name": "p", "generation": generation},
            "spec": {"priority": 1, "subject": {"podSelector": {}}, "rules": []}
        });
        if let Some(status) = status {
            value["status"] = status;
        }
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn conditions_say_why_and_keep_their_transition_time() {
        let now = Timestamp::now();
        let rejected = accepted_condition(&policy(3, None), Some("spec.rules[0].to: empty"), now);
        assert_eq!(
            (rejected.status.as_str(), rejected.reason.as_str()),
            ("False", "Invalid")
        );
        assert_eq!(rejected.observed_generation, Some(3));
        assert!(rejected.message.contains("spec.rules[0].to"));
        let shown = policy(
            3,
            Some(serde_json::json!({"conditions": [serde_json::to_value(&rejected).unwrap()]})),
        );
        assert!(shows(&shown, &rejected), "no write when nothing changed");
        let later = now + SignedDuration::from_secs(60);
        let again = accepted_condition(&shown, Some("spec.rules[0].to: empty"), later);
        let stored = &shown.status.as_ref().unwrap().conditions[0].last_transition_time;
        assert_eq!(
            &again.last_transition_time, stored,
            "unchanged status, unchanged time"
        );
        let fixed = accepted_condition(&shown, None, later);
        assert_eq!(fixed.status, "True");
        assert_eq!(fixed.last_transition_time, Time(later));
    }

    /// The async path against kube's client over a mocked API: a Lease held by another agent
    /// that expired is taken over with a `replace` carrying the resourceVersion read.
    #[tokio::test]
    async fn an_expired_lease_is_taken_over_with_the_version_read() {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "egret-system");
        let server = tokio::spawn(async move {
            let (request, send) = handle.next_request().await.expect("GET lease");
            assert_eq!(request.method(), http::Method::GET);
            assert_eq!(
                request.uri().path(),
                "/apis/coordination.k8s.io/v1/namespaces/egret-system/leases/egret-status-writer"
            );
            let body = serde_json::to_vec(&lease("node-b", 60)).unwrap();
            send.send_response(Response::builder().body(Body::from(body)).unwrap());

            let (request, send) = handle.next_request().await.expect("PUT lease");
            assert_eq!(request.method(), http::Method::PUT);
            let bytes = request.into_body().collect_bytes().await.unwrap();
            let sent: Lease = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(sent.metadata.resource_version.as_deref(), Some("7"));
            let spec = sent.spec.clone().unwrap();
            assert_eq!(spec.holder_identity.as_deref(), Some("node-a"));
            assert_eq!(spec.lease_transitions, Some(1));
            send.send_response(
                Response::builder()
                    .body(Body::from(bytes.to_vec()))
                    .unwrap(),
            );
        });
        let election = Election::new(client, "egret-system", "node-a");
        assert!(election.hold().await.expect("hold"));
        server.await.expect("mock API");
    }

    #[tokio::test]
    async fn losing_the_race_is_not_holding_and_not_an_error() {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "egret-system");
        let server = tokio::spawn(async move {
            let (_, send) = handle.next_request().await.expect("GET");
            send.send_response(
                Response::builder()
                    .status(404)
                    .body(Body::from(
                        serde_json::to_vec(&serde_json::json!({
                            "kind": "Status", "apiVersion": "v1", "status": "Failure",
                            "reason": "NotFound", "code": 404, "message": "not found"
                        }))
                        .unwrap(),
                    ))
                    .unwrap(),
            );
            let (request, send) = handle.next_request().await.expect("POST");
            assert_eq!(request.method(), http::Method::POST);
            send.send_response(
                Response::builder()
                    .status(409)
                    .body(Body::from(
                        serde_json::to_vec(&serde_json::json!({
                            "kind": "Status", "apiVersion": "v1", "status": "Failure",
                            "reason": "AlreadyExists", "code": 409, "message": "exists"
                        }))
                        .unwrap(),
                    ))
                    .unwrap(),
            );
        });
        let election = Election::new(client, "egret-system", "node-a");
        assert!(!election.hold().await.expect("a lost race is no error"));
        server.await.expect("mock API");
    }
}
