//! End-to-end tests of the `setsockopt` program: a workload process cannot send to a denied host
//! by setting a source route (an IPv6 segment routing header or an IPv4 LSRR option) and then
//! addressing an allowed host. Each test watches the denied host's interface for the packet the
//! route would send it. They need root, like every test here.
#![expect(
    clippy::expect_used,
    reason = "a test fails by panicking with what it expected"
)]

use std::{
    fs::File,
    io,
    net::IpAddr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
    time::{Duration, Instant},
};

use egret::{
    datapath::{
        CgroupRole, Datapath, DatapathConfig, Decision, EventReader, Verdict,
        lower::{L4, Rule},
    },
    rules_file::{EndpointSpec, RulesFile},
};
use egret_common::{RULE_SOURCE_ROUTE, verdict};
use egret_tests::{
    probe::{Attempt, Outcome},
    sandbox::{Host, Pod, Sandbox},
};

/// Denied host A and allowed host B, each with an IPv4 and an IPv6 address.
const A4: &str = "192.0.2.10";
const A6: &str = "2001:db8:2::a";
const B4: &str = "192.0.2.11";
const B6: &str = "2001:db8:2::b";

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

struct World {
    sandbox: Sandbox,
    pod: Pod,
    a: Host,
    dp: Datapath,
}

impl World {
    /// One pod (endpoint 1, default allow) whose policy denies every address of host A.
    fn new() -> Self {
        let mut sandbox = Sandbox::new().unwrap_or_else(|e| panic!("sandbox: {e}"));
        let pod = sandbox.add_pod("a").expect("pod");
        let a = sandbox
            .add_host("hosta", &[ip(A4), ip(A6)])
            .expect("host A");
        let _b = sandbox
            .add_host("hostb", &[ip(B4), ip(B6)])
            .expect("host B");
        let mut dp = Datapath::open(&DatapathConfig {
            pin_dir: sandbox.pin_dir().into(),
            cgroup: Some(sandbox.cgroup().into()),
        })
        .unwrap_or_else(|e| panic!("open datapath: {e:?}"));
        let file = RulesFile {
            endpoints: vec![EndpointSpec {
                cgroup: pod.cgroup.clone(),
                id: 1,
                default: Verdict::Allow,
                rules: vec![Rule {
                    to: vec![
                        format!("{A4}/32").parse().expect("prefix"),
                        format!("{A6}/128").parse().expect("prefix"),
                    ],
                    except: Vec::new(),
                    l4: L4::Any,
                    action: Decision {
                        verdict: Verdict::Deny,
                        rule: 7,
                    },
                }],
            }],
        };
        dp.sync(&file.desired(), &file.cgroup_ids().expect("cgroup ids"))
            .unwrap_or_else(|e| panic!("sync: {e:?}"));
        Self {
            sandbox,
            pod,
            a,
            dp,
        }
    }

    fn probe(&self, args: &[&str]) -> Vec<Attempt> {
        self.sandbox
            .probe(&self.pod, None, args)
            .expect("egret-probe")
    }

    /// Blocked attempts counted under the source-route rule for the pod, by destination (all
    /// protocols).
    fn source_route_counts(&self) -> Vec<(Option<IpAddr>, u64)> {
        let mut by_destination = std::collections::BTreeMap::new();
        for s in self.dp.counters().expect("counters").samples {
            if s.endpoint == 1 && s.rule == RULE_SOURCE_ROUTE {
                assert_eq!(s.verdict, Verdict::Deny);
                *by_destination.entry(s.destination).or_default() += s.attempts;
            }
        }
        by_destination.into_iter().collect()
    }

    /// Lets the sandbox's router forward IPv4 source-routed packets, as a router that honours
    /// LSRR would (Linux drops them by default, `accept_source_route`, at every hop).
    fn route_lsrr(&self) {
        let node = Path::new("/run/netns").join(format!("{}-node", self.sandbox.id()));
        let ns = File::open(&node).expect("node netns");
        std::thread::spawn(move || -> io::Result<()> {
            // SAFETY: setns on this thread only; it exits right after.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            for dev in ["all", "br0"] {
                std::fs::write(
                    format!("/proc/sys/net/ipv4/conf/{dev}/accept_source_route"),
                    "1",
                )?;
            }
            Ok(())
        })
        .join()
        .expect("sysctl thread")
        .expect("accept_source_route in the node namespace");
    }
}

/// A packet socket in `host`'s namespace: it sees every IP packet that reaches the host's
/// interfaces, whatever the host's stack then does with it (a source-routed packet is dropped
/// by a host that does not do source routing, after it arrived).
fn capture(host: &Host) -> OwnedFd {
    let ns_path = Path::new("/run/netns").join(&host.netns);
    let ns = File::open(&ns_path).expect("netns");
    std::thread::spawn(move || -> io::Result<OwnedFd> {
        // SAFETY: setns on this thread only; it exits right after.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: plain syscall; the fd is owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                i32::from((libc::ETH_P_ALL as u16).to_be()),
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd we own.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    })
    .join()
    .expect("capture thread")
    .expect("packet socket in host A")
}

/// Packets addressed to `to` with a source route (an IPv6 routing header, or IPv4 options
/// holding LSRR/SSRR) read from `socket` within `within`.
fn source_routed_to(socket: &OwnedFd, to: IpAddr, within: Duration) -> usize {
    let deadline = Instant::now() + within;
    let mut found = 0;
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        // SAFETY: valid fd and buffer.
        let n = unsafe { libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        let packet = &buf[..n as usize];
        let routed = match to {
            IpAddr::V6(to) => {
                packet.len() >= 40
                    && packet[0] >> 4 == 6
                    && packet[6] == 43
                    && packet[24..40] == to.octets()
            }
            IpAddr::V4(to) => {
                let ihl = usize::from(packet.first().map_or(0, |b| b & 0xf)) * 4;
                packet.len() >= ihl.max(20)
                    && packet[0] >> 4 == 4
                    && packet[16..20] == to.octets()
                    && packet[20..ihl].iter().any(|b| *b == 0x83 || *b == 0x89)
            }
        };
        found += usize::from(routed);
    }
    found
}

fn outcomes(attempts: &[Attempt]) -> Vec<(&str, Outcome)> {
    attempts
        .iter()
        .map(|a| (a.protocol.as_str(), a.outcome))
        .collect()
}

/// Waits for a deny-log event under the source-route rule; returns its destination family.
fn source_route_event(reader: &mut EventReader) -> Option<egret_common::DecisionEvent> {
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if let Some(event) = reader
            .wait(Duration::from_millis(100))
            .into_iter()
            .find(|e| e.rule_id == RULE_SOURCE_ROUTE)
        {
            return Some(event);
        }
    }
    None
}

#[test]
fn ipv6_routing_header_through_a_denied_host_is_refused_for_sendto_and_connect() {
    let w = World::new();
    let mut reader = EventReader::open(w.sandbox.pin_dir()).expect("deny log");
    let at_a = capture(&w.a);
    let via = format!("[{A6}]:0");

    // UDP: the header names A, sendto names B (allowed).
    let udp = w.probe(&[
        "srcroute",
        &via,
        &format!("[{B6}]:9"),
        "--kind",
        "rthdr",
        "--send",
        "sendto",
    ]);
    // TCP: the SYN would go to A.
    let tcp = w.probe(&[
        "srcroute",
        &via,
        &format!("[{B6}]:80"),
        "--kind",
        "rthdr",
        "--send",
        "connect",
        "--timeout-ms",
        "300",
    ]);
    assert_eq!(
        outcomes(&udp),
        [("setsockopt", Outcome::Denied), ("udp", Outcome::Sent)],
        "the routing header must be refused with EPERM; the plain datagram to B goes"
    );
    assert_eq!(outcomes(&tcp)[0], ("setsockopt", Outcome::Denied));
    assert_eq!(
        source_routed_to(&at_a, ip(A6), Duration::from_millis(500)),
        0,
        "a source-routed packet reached the denied host"
    );
    // Unconnected sockets: counted without destination, once per refused option.
    assert_eq!(w.source_route_counts(), [(None, 2)]);
    let event = source_route_event(&mut reader).expect("a deny-log event for the refusal");
    assert_eq!(event.verdict, verdict::DENY);
    assert_eq!(event.endpoint_id, 1);
    assert_eq!(event.family, 0, "no destination on an unconnected socket");

    // Clearing a routing header stays allowed.
    let clear = w.probe(&[
        "srcroute",
        &via,
        &format!("[{B6}]:9"),
        "--kind",
        "rthdr-clear",
    ]);
    assert_eq!(
        outcomes(&clear),
        [("setsockopt", Outcome::Sent), ("udp", Outcome::Sent)]
    );
    // Without egret's program (a process outside every endpoint), the same header does take the
    // datagram to A: what the refusal prevents.
    let outside = w
        .sandbox
        .add_unmanaged_cgroup("outside")
        .expect("unmanaged cgroup");
    let unenforced = w
        .sandbox
        .probe(
            &w.pod,
            Some(&outside),
            &["srcroute", &via, &format!("[{B6}]:9"), "--kind", "rthdr"],
        )
        .expect("probe");
    assert_eq!(
        outcomes(&unenforced),
        [("setsockopt", Outcome::Sent), ("udp", Outcome::Sent)]
    );
    assert!(
        source_routed_to(&at_a, ip(A6), Duration::from_millis(500)) >= 1,
        "the capture at A must see the source-routed datagram of an unenforced process"
    );
    assert_eq!(w.source_route_counts(), [(None, 2)], "uncounted");
}

#[test]
fn routing_header_set_after_connect_on_udp_is_refused_and_logged_with_the_peer() {
    let w = World::new();
    let mut reader = EventReader::open(w.sandbox.pin_dir()).expect("deny log");
    let at_a = capture(&w.a);
    let attempts = w.probe(&[
        "srcroute",
        &format!("[{A6}]:0"),
        &format!("[{B6}]:9"),
        "--kind",
        "rthdr",
        "--send",
        "connected-udp",
    ]);
    assert_eq!(
        outcomes(&attempts),
        [("setsockopt", Outcome::Denied), ("udp", Outcome::Sent)]
    );
    assert_eq!(
        source_routed_to(&at_a, ip(A6), Duration::from_millis(500)),
        0
    );
    assert_eq!(w.source_route_counts(), [(Some(ip(B6)), 1)]);
    let event = source_route_event(&mut reader).expect("a deny-log event for the refusal");
    assert_eq!(event.family, egret_common::family::INET6);
    assert_eq!(IpAddr::from(event.addr), ip(B6));
    assert_eq!(event.port, 9);
    assert_eq!(event.protocol, 17);
}

#[test]
fn ipv4_loose_source_route_is_refused_and_other_options_and_clearing_pass() {
    let w = World::new();
    w.route_lsrr();
    let at_a = capture(&w.a);
    let attempts = w.probe(&[
        "srcroute",
        &format!("{A4}:0"),
        &format!("{B4}:9"),
        "--kind",
        "lsrr",
        "--send",
        "sendto",
    ]);
    assert_eq!(
        outcomes(&attempts),
        [("setsockopt", Outcome::Denied), ("udp", Outcome::Sent)]
    );
    assert_eq!(
        source_routed_to(&at_a, ip(A4), Duration::from_millis(500)),
        0
    );
    assert_eq!(w.source_route_counts(), [(None, 1)]);
    let other = w.probe(&[
        "srcroute",
        &format!("{A4}:0"),
        &format!("{B4}:9"),
        "--kind",
        "record-route",
    ]);
    assert_eq!(
        outcomes(&other),
        [("setsockopt", Outcome::Sent), ("udp", Outcome::Sent)],
        "IP options without a source route pass"
    );

    // A process outside every endpoint is not egret's: its source route is not refused (and
    // shows that the capture would see one).
    let outside = w
        .sandbox
        .add_unmanaged_cgroup("outside")
        .expect("unmanaged cgroup");
    let attempts = w
        .sandbox
        .probe(
            &w.pod,
            Some(&outside),
            &[
                "srcroute",
                &format!("{A4}:0"),
                &format!("{B4}:9"),
                "--kind",
                "lsrr",
                "--send",
                "sendto",
            ],
        )
        .expect("probe");
    assert_eq!(
        outcomes(&attempts),
        [("setsockopt", Outcome::Sent), ("udp", Outcome::Sent)]
    );
    assert!(
        source_routed_to(&at_a, ip(A4), Duration::from_millis(500)) >= 1,
        "the capture at A must see a source-routed packet from outside egret's endpoints"
    );
    assert_eq!(w.source_route_counts(), [(None, 1)], "uncounted");
}

#[test]
fn below_a_guard_source_routes_are_refused_and_unmanaged_cgroups_are_left_alone() {
    let mut w = World::new();
    let guarded = w
        .sandbox
        .add_unmanaged_cgroup("guarded")
        .expect("guarded cgroup");
    let newcomer = w
        .sandbox
        .add_cgroup_below(&guarded, "new")
        .expect("cgroup below the guard");
    let known = w
        .sandbox
        .add_cgroup_below(&guarded, "known")
        .expect("unmanaged cgroup below the guard");
    let id = |path: &Path| egret::sys::cgroup_id(path).expect("cgroup id");
    w.dp.set_role(id(&guarded), CgroupRole::Guard)
        .expect("guard");
    w.dp.set_role(id(&known), CgroupRole::Unmanaged)
        .expect("unmanaged");
    let args = [
        "srcroute",
        &format!("[{A6}]:0"),
        &format!("[{B6}]:9"),
        "--kind",
        "rthdr",
    ]
    .map(String::from);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let in_cgroup = |cgroup: &Path| {
        outcomes(&w.sandbox.probe(&w.pod, Some(cgroup), &args).expect("probe"))
            .first()
            .map(|(_, outcome)| *outcome)
    };
    assert_eq!(
        in_cgroup(&newcomer),
        Some(Outcome::Denied),
        "a cgroup egret has not written yet is refused the route too"
    );
    assert_eq!(
        in_cgroup(&known),
        Some(Outcome::Sent),
        "unmanaged: not egret's"
    );
    // Counted under the pending endpoint (0), like the guard's other denials.
    let pending: u64 =
        w.dp.counters()
            .expect("counters")
            .samples
            .iter()
            .filter(|s| s.endpoint == 0 && s.rule == RULE_SOURCE_ROUTE)
            .map(|s| s.attempts)
            .sum();
    assert_eq!(pending, 1);
}
