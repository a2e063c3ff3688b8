//! End-to-end tests of the kernel's decision cache (`ebpf/src/cache.rs`): a repeated
//! destination skips the trie lookups, but no cached verdict outlives the policy generation
//! that made it, and every attempt is still counted. They need root.
#![expect(
    clippy::expect_used,
    reason = "a test fails by panicking with what it expected"
)]

use std::{
    net::{IpAddr, UdpSocket},
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData};
use egret::{
    datapath::{
        Counters, Datapath, DatapathConfig, Decision, PinLayout, Verdict,
        lower::{L4, Rule},
    },
    rules_file::{EndpointSpec, RulesFile},
};
use egret_common::{DecisionCacheKey, PolicyValue, family, map_names};
use egret_tests::{
    probe::Outcome,
    sandbox::{Pod, Sandbox},
};

const UDP: u8 = 17;
const TARGET: &str = "192.0.2.10:53";
const ALLOW_RULE: u32 = 41;
const DENY_RULE: u32 = 42;

struct World {
    sandbox: Sandbox,
    pod: Pod,
    /// Keeps the datagrams' destination bound, so an allowed send succeeds.
    _sink: UdpSocket,
}

impl World {
    fn new() -> Self {
        let mut sandbox = Sandbox::new().unwrap_or_else(|e| panic!("sandbox: {e}"));
        let pod = sandbox.add_pod("a").expect("pod");
        let host: IpAddr = "192.0.2.10".parse().expect("address");
        let host = sandbox.add_host("ext", &[host]).expect("host");
        let sink = sandbox
            .bind_udp(&host, TARGET.parse().expect("target"))
            .expect("bind");
        Self {
            sandbox,
            pod,
            _sink: sink,
        }
    }

    fn open(&self) -> Datapath {
        Datapath::open(&DatapathConfig {
            pin_dir: self.sandbox.pin_dir().into(),
            cgroup: Some(self.sandbox.cgroup().into()),
        })
        .unwrap_or_else(|e| panic!("open datapath: {e:?}"))
    }

    /// The pod's policy (endpoint 1, default allow): one rule for UDP to the target host.
    fn policy(&self, verdict: Verdict) -> RulesFile {
        let rule = if verdict == Verdict::Deny {
            DENY_RULE
        } else {
            ALLOW_RULE
        };
        RulesFile {
            endpoints: vec![EndpointSpec {
                cgroup: self.pod.cgroup.clone(),
                id: 1,
                default: Verdict::Allow,
                rules: vec![Rule {
                    to: vec!["192.0.2.10/32".parse().expect("prefix")],
                    except: Vec::new(),
                    l4: L4::Ports {
                        protocol: UDP,
                        first: 53,
                        last: 53,
                    },
                    action: Decision { verdict, rule },
                }],
            }],
        }
    }

    fn sync(&self, dp: &mut Datapath, verdict: Verdict) {
        let file = self.policy(verdict);
        dp.sync(&file.desired(), &file.cgroup_ids().expect("cgroup ids"))
            .unwrap_or_else(|e| panic!("sync: {e:?}"));
    }

    fn cache(&self) -> HashMap<MapData, DecisionCacheKey, PolicyValue> {
        let path = PinLayout::new(self.sandbox.pin_dir()).map(map_names::DECISION_CACHE);
        let data = MapData::from_pin(&path).expect("cache map");
        HashMap::try_from(Map::from_map_data(data).expect("map")).expect("hash map")
    }
}

/// Attempts to the target counted for endpoint 1 under `verdict` and `rule`.
fn counted(counters: &Counters, verdict: Verdict, rule: u32) -> u64 {
    let target: IpAddr = "192.0.2.10".parse().expect("address");
    counters
        .samples
        .iter()
        .filter(|s| {
            s.endpoint == 1
                && s.destination == Some(target)
                && s.verdict == verdict
                && s.rule == rule
        })
        .map(|s| s.attempts)
        .sum()
}

#[test]
fn a_cached_allow_never_outlives_a_flip_that_denies() {
    let w = World::new();
    let mut dp = w.open();
    w.sync(&mut dp, Verdict::Allow);

    let stop = std::env::temp_dir().join(format!("{}-fastpath-stop", w.sandbox.id()));
    let prober = w
        .sandbox
        .spawn_probe(
            &w.pod,
            &[
                "udp-loop",
                TARGET,
                "--until-file",
                stop.to_str().expect("utf-8"),
            ],
        )
        .expect("prober");
    let grows = |dp: &Datapath, verdict, rule, from: u64| {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let now = counted(&dp.counters().expect("counters"), verdict, rule);
            if now > from {
                return now;
            }
            assert!(Instant::now() < deadline, "the prober stopped sending");
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    grows(&dp, Verdict::Allow, ALLOW_RULE, 0);

    let flips = 100;
    for i in 0..flips {
        w.sync(&mut dp, Verdict::Deny);
        // Every program that could still use the allowing epoch has returned by now: the
        // allowed count is final, and must stay so while the prober keeps sending.
        let allowed = counted(
            &dp.counters().expect("counters"),
            Verdict::Allow,
            ALLOW_RULE,
        );
        let denied = counted(&dp.counters().expect("counters"), Verdict::Deny, DENY_RULE);
        grows(&dp, Verdict::Deny, DENY_RULE, denied + 16);
        let after = counted(
            &dp.counters().expect("counters"),
            Verdict::Allow,
            ALLOW_RULE,
        );
        assert_eq!(
            after,
            allowed,
            "flip {i}: {} datagrams were allowed after the flip to deny had returned",
            after - allowed
        );

        w.sync(&mut dp, Verdict::Allow);
        let denied = counted(&dp.counters().expect("counters"), Verdict::Deny, DENY_RULE);
        grows(&dp, Verdict::Allow, ALLOW_RULE, after + 16);
        let after = counted(&dp.counters().expect("counters"), Verdict::Deny, DENY_RULE);
        assert_eq!(
            after,
            denied,
            "flip {i}: {} datagrams were denied after the flip to allow had returned",
            after - denied
        );
    }
    std::fs::write(&stop, "").expect("stop");
    let output = w.sandbox.wait_probe_output(prober).expect("prober output");
    let _ = std::fs::remove_file(&stop);
    let summary: serde_json::Value =
        serde_json::from_str(output.trim()).expect("prober summary line");
    let outcomes = &summary["outcomes"];
    let sent = outcomes["sent"].as_u64().unwrap_or(0);
    let refused = outcomes["denied"].as_u64().unwrap_or(0);
    let counters = dp.counters().expect("counters");
    // Each datagram the prober saw pass or fail is one counted attempt, cache or not.
    assert_eq!(
        counted(&counters, Verdict::Allow, ALLOW_RULE),
        sent,
        "{summary}"
    );
    assert_eq!(
        counted(&counters, Verdict::Deny, DENY_RULE),
        refused,
        "{summary}"
    );
}

#[test]
fn every_datagram_is_counted_once_under_the_cache_and_the_cache_serves_them() {
    let w = World::new();
    let mut dp = w.open();
    for (verdict, rule, outcome) in [
        (Verdict::Allow, ALLOW_RULE, Outcome::Sent),
        (Verdict::Deny, DENY_RULE, Outcome::Denied),
    ] {
        w.sync(&mut dp, verdict);
        let before = counted(&dp.counters().expect("counters"), verdict, rule);
        let n = 3000;
        let outcomes = w
            .sandbox
            .probe(&w.pod, None, &["udp", TARGET, "--count", &n.to_string()])
            .expect("probe");
        assert_eq!(outcomes.len(), n);
        assert!(
            outcomes.iter().all(|a| a.outcome == outcome),
            "{verdict:?}: {:?}",
            outcomes.iter().find(|a| a.outcome != outcome)
        );
        let after = counted(&dp.counters().expect("counters"), verdict, rule);
        assert_eq!(after - before, n as u64, "{verdict:?}: counted once each");

        // The decision came from the cache after the first datagram: it holds this epoch's
        // entry for the destination, with the verdict and rule, and nothing of past epochs.
        let entries: Vec<(DecisionCacheKey, PolicyValue)> = w
            .cache()
            .iter()
            .collect::<Result<_, _>>()
            .expect("cache entries");
        let mine: Vec<_> = entries
            .iter()
            .filter(|(k, _)| k.endpoint_id == 1 && k.addr[..4] == [192, 0, 2, 10])
            .collect();
        assert_eq!(mine.len(), 1, "{entries:?}");
        let (key, value) = mine[0];
        assert_eq!(
            (key.family, key.protocol, key.port),
            (family::INET, UDP, 53)
        );
        assert_eq!(
            (value.verdict, value.rule_id),
            (verdict.to_raw(), rule),
            "{entries:?}"
        );
        assert!(
            entries.iter().all(|(k, _)| k.epoch == key.epoch),
            "entries of a past epoch survived the flip's purge: {entries:?}"
        );
    }
}
