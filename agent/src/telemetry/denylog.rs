//! The deny log: one JSON line per blocked or audit connection, with the process that made it
//! and the policy that decided, rate-limited so that a scanning workload cannot flood it.
//!
//! Two token buckets gate each line: one per (source, destination), so a retry loop logs a few
//! lines and then one every so often, and one per source, so that scanning many destinations
//! cannot flood either. Lines held back are counted, per key (the next line for that key says
//! how many) and in total (`egret_deny_log_suppressed_total`).

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Instant,
};

use egret_common::{DecisionEvent, family};
use serde_json::{Value, json};

use crate::datapath::{EndpointId, Verdict};

/// Lines per (source, destination): burst, then per second.
const PER_DESTINATION: (f64, f64) = (5.0, 1.0);
/// Lines per source across all destinations: burst, then per second.
const PER_SOURCE: (f64, f64) = (50.0, 10.0);

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn take(&mut self, now: Instant, (burst, rate): (f64, f64)) -> bool {
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * rate).min(burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Rate-limiter state.
#[derive(Default)]
pub struct DenyLog {
    destinations: HashMap<(EndpointId, IpAddr), Bucket>,
    sources: HashMap<EndpointId, Bucket>,
    held_back: HashMap<(EndpointId, IpAddr), u64>,
    /// Lines held back in total.
    pub suppressed: u64,
}

/// Names for a line: the source workload and the deciding policy.
pub struct Names {
    pub namespace: String,
    pub workload: String,
    pub policy: String,
    pub rule: Option<String>,
}

impl DenyLog {
    /// The JSON line for `event` at `now` (RFC 3339 `time`), or `None` when rate-limited.
    pub fn line(
        &mut self,
        event: &DecisionEvent,
        now: Instant,
        time: &str,
        names: &Names,
    ) -> Option<Value> {
        let destination = destination(event);
        let key = (event.endpoint_id, destination);
        let fresh = |now| Bucket {
            tokens: 0.0,
            at: now,
        };
        let source_ok = {
            let b = self.sources.entry(event.endpoint_id).or_insert(Bucket {
                tokens: PER_SOURCE.0,
                ..fresh(now)
            });
            b.take(now, PER_SOURCE)
        };
        let destination_ok = source_ok && {
            let b = self.destinations.entry(key).or_insert(Bucket {
                tokens: PER_DESTINATION.0,
                ..fresh(now)
            });
            b.take(now, PER_DESTINATION)
        };
        if !destination_ok {
            *self.held_back.entry(key).or_default() += 1;
            self.suppressed += 1;
            return None;
        }
        let suppressed = self.held_back.remove(&key).unwrap_or(0);
        let verdict = Verdict::from_raw(event.verdict).map_or("unknown", Verdict::counter_label);
        let comm_len = event
            .comm
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(event.comm.len());
        let protocol = crate::policy::model::Protocol::from_number(event.protocol)
            .map_or_else(|| event.protocol.to_string(), |p| p.to_string());
        Some(json!({
            "time": time,
            "verdict": verdict,
            "source_namespace": names.namespace,
            "source_workload": names.workload,
            "pid": event.pid,
            "comm": String::from_utf8_lossy(&event.comm[..comm_len]),
            "destination_ip": destination.to_string(),
            "port": event.port,
            "protocol": protocol,
            "policy": names.policy,
            "rule": names.rule,
            "suppressed_before": suppressed,
        }))
    }
}

fn destination(event: &DecisionEvent) -> IpAddr {
    if event.family == family::INET {
        let [a, b, c, d, ..] = event.addr;
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    } else {
        IpAddr::V6(Ipv6Addr::from(event.addr))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn event(endpoint: u32, last_octet: u8) -> DecisionEvent {
        let mut e = DecisionEvent {
            pid: 42,
            endpoint_id: endpoint,
            family: family::INET,
            protocol: 6,
            port: 80,
            verdict: egret_common::verdict::DENY,
            ..Default::default()
        };
        e.addr[..4].copy_from_slice(&[192, 0, 2, last_octet]);
        e.comm[..4].copy_from_slice(b"curl");
        e
    }

    fn names() -> Names {
        Names {
            namespace: "shop".into(),
            workload: "web".into(),
            policy: "EgressPolicy block".into(),
            rule: Some("r".into()),
        }
    }

    #[test]
    fn lines_name_process_and_policy() {
        let mut log = DenyLog::default();
        let line = log
            .line(&event(1, 10), Instant::now(), "t", &names())
            .unwrap();
        assert_eq!(line["comm"], "curl");
        assert_eq!(line["pid"], 42);
        assert_eq!(line["destination_ip"], "192.0.2.10");
        assert_eq!(line["verdict"], "blocked");
        assert_eq!(line["policy"], "EgressPolicy block");
    }

    #[test]
    fn a_retry_loop_and_a_scan_are_both_held_back_and_counted() {
        let mut log = DenyLog::default();
        let t0 = Instant::now();
        let retries = (0..100)
            .filter(|_| log.line(&event(1, 10), t0, "t", &names()).is_some())
            .count();
        assert_eq!(retries, 5, "burst per destination");
        // A second later, one more line, saying how many were held back.
        let line = log
            .line(&event(1, 10), t0 + Duration::from_secs(1), "t", &names())
            .unwrap();
        assert_eq!(line["suppressed_before"], 95);
        // A scan of distinct destinations from another source is capped by the per-source bucket.
        let scanned = (0..=255u8)
            .filter(|i| log.line(&event(2, *i), t0, "t", &names()).is_some())
            .count();
        assert_eq!(scanned, 50);
        assert_eq!(log.suppressed, 95 + 206);
    }
}
