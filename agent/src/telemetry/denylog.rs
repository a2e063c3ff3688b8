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

/// A token bucket's size: lines at once, then lines per second.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    pub burst: f64,
    pub per_second: f64,
}

impl std::str::FromStr for Rate {
    type Err = String;

    /// `BURST/PER_SECOND`, as `5/1`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (burst, per_second) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: expected BURST/PER_SECOND, as 5/1"))?;
        let number = |v: &str| {
            v.trim()
                .parse::<f64>()
                .ok()
                .filter(|n| n.is_finite() && *n >= 0.0)
                .ok_or_else(|| format!("{s:?}: {v:?} is not a non-negative number"))
        };
        Ok(Self {
            burst: number(burst)?,
            per_second: number(per_second)?,
        })
    }
}

/// The deny log's limits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    /// Lines per (source, destination).
    pub per_destination: Rate,
    /// Lines per source across all destinations.
    pub per_source: Rate,
    /// (source, destination) pairs with state of their own; past it, the idle ones are
    /// forgotten first, then all (a scan of millions of addresses must not grow the agent).
    pub max_tracked: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            per_destination: Rate {
                burst: 5.0,
                per_second: 1.0,
            },
            per_source: Rate {
                burst: 50.0,
                per_second: 10.0,
            },
            max_tracked: 65_536,
        }
    }
}

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn take(&mut self, now: Instant, rate: Rate) -> bool {
        self.refill(now, rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn refill(&mut self, now: Instant, Rate { burst, per_second }: Rate) {
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * per_second).min(burst);
        self.at = now;
    }
}

/// Rate-limiter state, bounded by `Limits::max_tracked`.
#[derive(Default)]
pub struct DenyLog {
    limits: Limits,
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
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            ..Self::default()
        }
    }

    /// (source, destination) pairs with state now.
    pub fn tracked(&self) -> usize {
        self.destinations.len().max(self.held_back.len())
    }

    /// Keeps the per-destination state within `max_tracked`: first forgets pairs whose bucket
    /// has refilled (idle: a fresh bucket would say the same) and that hold nothing back, then,
    /// if a scan keeps it full, every pair (their held-back lines stay in `suppressed`).
    fn bound(&mut self, now: Instant) {
        if self.destinations.len() < self.limits.max_tracked
            && self.held_back.len() < self.limits.max_tracked
        {
            return;
        }
        let rate = self.limits.per_destination;
        let held_back = &self.held_back;
        self.destinations.retain(|key, bucket| {
            let mut b = *bucket;
            b.refill(now, rate);
            b.tokens < rate.burst || held_back.contains_key(key)
        });
        if self.destinations.len() >= self.limits.max_tracked / 2
            || self.held_back.len() >= self.limits.max_tracked / 2
        {
            self.destinations.clear();
            self.held_back.clear();
        }
    }

    /// The JSON line for `event` at `now` (RFC 3339 `time`), or `None` when rate-limited.
    pub fn line(
        &mut self,
        event: &DecisionEvent,
        now: Instant,
        time: &str,
        names: &Names,
    ) -> Option<Value> {
        self.bound(now);
        let Limits {
            per_destination,
            per_source,
            ..
        } = self.limits;
        let destination = destination(event);
        let key = (event.endpoint_id, destination);
        let fresh = |now| Bucket {
            tokens: 0.0,
            at: now,
        };
        let source_ok = {
            let b = self.sources.entry(event.endpoint_id).or_insert(Bucket {
                tokens: per_source.burst,
                ..fresh(now)
            });
            b.take(now, per_source)
        };
        let destination_ok = source_ok && {
            let b = self.destinations.entry(key).or_insert(Bucket {
                tokens: per_destination.burst,
                ..fresh(now)
            });
            b.take(now, per_destination)
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
    fn a_scan_of_a_million_addresses_keeps_the_state_bounded_and_every_line_counted() {
        let limits = Limits {
            max_tracked: 1024,
            ..Limits::default()
        };
        let mut log = DenyLog::new(limits);
        let t0 = Instant::now();
        let mut logged = 0u64;
        for i in 0..1_000_000u32 {
            let mut e = event(1, 0);
            e.family = family::INET6;
            e.addr = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            e.addr[12..].copy_from_slice(&i.to_be_bytes());
            // A millisecond apart: the source bucket refills ten lines a second.
            let now = t0 + Duration::from_millis(u64::from(i));
            if log.line(&e, now, "t", &names()).is_some() {
                logged += 1;
            }
            assert!(
                log.tracked() <= limits.max_tracked,
                "at {i}: {}",
                log.tracked()
            );
        }
        assert_eq!(
            logged + log.suppressed,
            1_000_000,
            "every attempt logged or counted"
        );
        assert!(logged < 11_000, "the per-source limit held: {logged}");
    }

    #[test]
    fn rates_parse_as_burst_per_second() {
        assert_eq!(
            "5/1".parse::<Rate>(),
            Ok(Rate {
                burst: 5.0,
                per_second: 1.0
            })
        );
        assert!("5".parse::<Rate>().is_err());
        assert!("-1/1".parse::<Rate>().is_err());
        assert!("x/1".parse::<Rate>().is_err());
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
