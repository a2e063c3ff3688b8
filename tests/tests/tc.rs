//! End-to-end tests of the TC programs on a workload's node-side veth: what no socket hook sees
//! (raw sockets, unconnected ping sockets, `AF_PACKET` frames with and without qdisc bypass,
//! hand-built SCTP, fragments, forged source addresses) is decided at packet level, with the
//! same policy, and checked at the receiver: a packet socket on the denied host's interface.
//! They need root, like every test here.
#![expect(
    clippy::expect_used,
    reason = "a test fails by panicking with what it expected"
)]

use std::{
    collections::BTreeMap,
    fs::File,
    io::{self, Read as _},
    net::{IpAddr, SocketAddr, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
    time::{Duration, Instant},
};

use egret::{
    datapath::{
        Datapath, DatapathConfig, Decision, Verdict,
        lower::{L4, Rule},
        tc::{TcAttachments, TcDesired, TcEndpoint, resolve_interfaces},
    },
    rules_file::{EndpointSpec, RulesFile},
};
use egret_common::{RULE_MALFORMED, RULE_SOURCE_ROUTE};
use egret_tests::{
    probe::{Attempt, Outcome},
    sandbox::{Host, Pod, Sandbox},
};

/// Host A: denied, but for SCTP to port 9. Host B: allowed.
const A4: &str = "192.0.2.10";
const A6: &str = "2001:db8:2::a";
const B4: &str = "192.0.2.11";
const B6: &str = "2001:db8:2::b";

/// Rule ids of the test policy.
const RULE_ALLOW_B: u32 = 3;
const RULE_SCTP_A: u32 = 4;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

struct World {
    sandbox: Sandbox,
    pod: Pod,
    a: Host,
    b: Host,
    dp: Datapath,
    tc: TcAttachments,
    /// The pod's node-side interface index.
    ifindex: u32,
}

/// The policy: B allowed (all protocols), SCTP to A port 9 allowed, everything else denied by
/// the endpoint's default (rule 0).
fn rules(cgroup: &Path, allow_b: bool) -> RulesFile {
    let mut rules = vec![Rule {
        to: vec![format!("{A4}/32").parse().expect("prefix")],
        except: Vec::new(),
        l4: L4::Ports {
            protocol: 132,
            first: 9,
            last: 9,
        },
        action: Decision {
            verdict: Verdict::Allow,
            rule: RULE_SCTP_A,
        },
    }];
    if allow_b {
        rules.push(Rule {
            to: vec![
                format!("{B4}/32").parse().expect("prefix"),
                format!("{B6}/128").parse().expect("prefix"),
            ],
            except: Vec::new(),
            l4: L4::Any,
            action: Decision {
                verdict: Verdict::Allow,
                rule: RULE_ALLOW_B,
            },
        });
    }
    RulesFile {
        endpoints: vec![EndpointSpec {
            cgroup: cgroup.into(),
            id: 1,
            default: Verdict::Deny,
            rules,
        }],
    }
}

/// Moves the calling thread into `netns`: the pod's node-side interface lives in the sandbox's
/// node namespace, where interface indexes and TCX attachments are resolved, and processes
/// started from this thread (an agent) run there too.
fn enter(netns: &str) {
    let ns = File::open(Path::new("/run/netns").join(netns)).expect("netns");
    // SAFETY: setns on this thread only.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", io::Error::last_os_error());
}

impl World {
    fn new() -> Self {
        let mut sandbox = Sandbox::new().unwrap_or_else(|e| panic!("sandbox: {e}"));
        let pod = sandbox.add_pod("a").expect("pod");
        let a = sandbox
            .add_host("hosta", &[ip(A4), ip(A6)])
            .expect("host A");
        let b = sandbox
            .add_host("hostb", &[ip(B4), ip(B6)])
            .expect("host B");
        enter(&format!("{}-node", sandbox.id()));
        let dp = Datapath::open(&DatapathConfig {
            pin_dir: sandbox.pin_dir().into(),
            cgroup: Some(sandbox.cgroup().into()),
        })
        .unwrap_or_else(|e| panic!("open datapath: {e:?}"));
        let tc = TcAttachments::open(sandbox.pin_dir()).expect("TC attachments");
        // The pod's node end is `p<index>`, index 10 for the first pod.
        let ifindex = *resolve_interfaces(&["p10".into()])
            .get("p10")
            .expect("node-side veth p10");
        let mut world = Self {
            sandbox,
            pod,
            a,
            b,
            dp,
            tc,
            ifindex,
        };
        world.set_policy(true);
        world.attach();
        world
    }

    fn set_policy(&mut self, allow_b: bool) {
        let file = rules(&self.pod.cgroup, allow_b);
        self.dp
            .sync(&file.desired(), &file.cgroup_ids().expect("cgroup ids"))
            .unwrap_or_else(|e| panic!("sync: {e:?}"));
    }

    fn desired(&self) -> TcDesired {
        TcDesired::from([(
            self.ifindex,
            TcEndpoint {
                endpoint_id: 1,
                addresses: [IpAddr::V4(self.pod.ipv4), IpAddr::V6(self.pod.ipv6)].into(),
                pending: false,
            },
        )])
    }

    fn attach(&mut self) {
        let desired = self.desired();
        self.tc
            .reconcile_interfaces(&desired)
            .expect("attach TC programs");
        assert!(self.tc.interfaces().contains(&self.ifindex));
    }

    fn probe(&self, args: &[&str]) -> Vec<Attempt> {
        self.sandbox
            .probe(&self.pod, None, args)
            .expect("egret-probe")
    }

    /// Sends one hand-built packet of `kind` to `to` from the pod; the send itself succeeds
    /// (nothing refuses it at the socket), whatever happens to the packet after.
    fn raw(&self, kind: &str, to: &str, extra: &[&str]) {
        let mut args = vec!["raw", to, "--kind", kind];
        args.extend_from_slice(extra);
        let attempts = self.probe(&args);
        assert_eq!(attempts.len(), 1, "{attempts:?}");
        assert_eq!(attempts[0].outcome, Outcome::Sent, "{kind} to {to}");
    }

    /// Blocked counts for endpoint 1 by (destination, protocol, rule).
    fn blocked(&self) -> BTreeMap<(Option<IpAddr>, u8, u32), u64> {
        let mut out = BTreeMap::new();
        for s in self.dp.counters().expect("counters").samples {
            if s.endpoint == 1 && s.verdict == Verdict::Deny {
                *out.entry((s.destination, s.protocol, s.rule)).or_default() += s.attempts;
            }
        }
        out
    }
}

/// A packet socket in `host`'s namespace: it sees every IP packet that reaches the host's
/// interface, whatever the host's stack then does with it.
fn capture(host: &Host) -> OwnedFd {
    let ns = File::open(Path::new("/run/netns").join(&host.netns)).expect("netns");
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
    .expect("packet socket")
}

/// An IPv4 packet seen at a receiver: destination, protocol, destination port (the ICMP type
/// for ICMP; `None` for other protocols without ports and for later fragments).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Seen {
    to: IpAddr,
    protocol: u8,
    port: Option<u16>,
}

/// The IPv4 packets `socket` reads within `within`.
fn seen(socket: &OwnedFd, within: Duration) -> Vec<Seen> {
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        // SAFETY: plain data, zero is valid.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: valid fd, buffer and address buffer.
        let n = unsafe {
            libc::recvfrom(
                socket.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&raw mut from).cast(),
                &mut len,
            )
        };
        if n < 20 {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        // Packets the host itself sends show up too: only what arrives counts.
        if from.sll_pkttype == libc::PACKET_OUTGOING {
            continue;
        }
        let packet = &buf[..n as usize];
        if let Some(seen) = parse_seen(packet) {
            out.push(seen);
        }
    }
    out
}

/// Destination, protocol and port (or ICMP type) of an IPv4 or IPv6 packet.
fn parse_seen(packet: &[u8]) -> Option<Seen> {
    let port_at = |protocol: u8, l4: usize| {
        if packet.len() < l4 + 4 {
            None
        } else if matches!(protocol, 6 | 17 | 132) {
            Some(u16::from_be_bytes([packet[l4 + 2], packet[l4 + 3]]))
        } else if protocol == 1 || protocol == 58 {
            Some(u16::from(packet[l4]))
        } else {
            None
        }
    };
    match packet.first()? >> 4 {
        4 => {
            let ihl = usize::from(packet[0] & 0xf) * 4;
            let offset = u16::from_be_bytes([packet[6], packet[7]]) & 0x1fff;
            let protocol = packet[9];
            Some(Seen {
                to: IpAddr::from([packet[16], packet[17], packet[18], packet[19]]),
                protocol,
                port: if offset == 0 {
                    port_at(protocol, ihl)
                } else {
                    None
                },
            })
        }
        6 if packet.len() >= 48 => {
            let to: [u8; 16] = packet[24..40].try_into().ok()?;
            let (protocol, offset, l4) = if packet[6] == 44 {
                (
                    packet[40],
                    u16::from_be_bytes([packet[42], packet[43]]) >> 3,
                    48,
                )
            } else {
                (packet[6], 0, 40)
            };
            Some(Seen {
                to: IpAddr::from(to),
                protocol,
                port: if offset == 0 {
                    port_at(protocol, l4)
                } else {
                    None
                },
            })
        }
        _ => None,
    }
}

/// How many of `packets` went to `to` over `protocol` (and to `port`, when given).
fn count(packets: &[Seen], to: &str, protocol: u8, port: Option<u16>) -> usize {
    packets
        .iter()
        .filter(|p| p.to == ip(to) && p.protocol == protocol && (port.is_none() || p.port == port))
        .count()
}

/// Packets to `to` of `protocol` (and `port`) read from `socket` within `within`.
fn arrived(socket: &OwnedFd, to: &str, protocol: u8, port: Option<u16>, within: Duration) -> usize {
    count(&seen(socket, within), to, protocol, port)
}

const SETTLE: Duration = Duration::from_millis(500);

#[test]
fn raw_tcp_syn_udp_and_af_packet_to_a_denied_host_never_arrive_and_are_counted() {
    let w = World::new();
    let source = w.pod.ipv4.to_string();
    let at_a = capture(&w.a);
    let at_b = capture(&w.b);
    w.raw("tcp-syn", &format!("{A4}:80"), &[]);
    w.raw("udp", &format!("{A4}:53"), &[]);
    w.raw("packet", &format!("{A4}:54"), &["--source", &source]);
    w.raw("packet-bypass", &format!("{A4}:55"), &["--source", &source]);
    let at_a = seen(&at_a, SETTLE);
    assert_eq!(count(&at_a, A4, 6, None), 0, "raw TCP SYN reached A");
    assert_eq!(count(&at_a, A4, 17, None), 0, "a UDP packet reached A");
    let blocked = w.blocked();
    let a = Some(ip(A4));
    assert_eq!(blocked.get(&(a, 6, 0)), Some(&1), "{blocked:?}");
    // Raw UDP and two AF_PACKET frames, each counted once under A.
    assert_eq!(blocked.get(&(a, 17, 0)), Some(&3), "{blocked:?}");

    // The same to B arrives.
    w.raw("tcp-syn", &format!("{B4}:80"), &[]);
    w.raw("udp", &format!("{B4}:53"), &[]);
    w.raw("packet", &format!("{B4}:54"), &["--source", &source]);
    w.raw("packet-bypass", &format!("{B4}:55"), &["--source", &source]);
    let at_b = seen(&at_b, SETTLE);
    assert_eq!(count(&at_b, B4, 6, Some(80)), 1, "raw TCP SYN to B");
    assert_eq!(count(&at_b, B4, 17, Some(53)), 1, "raw UDP to B");
    assert_eq!(count(&at_b, B4, 17, Some(54)), 1, "AF_PACKET to B");
    assert_eq!(
        count(&at_b, B4, 17, Some(55)),
        1,
        "AF_PACKET, qdisc bypassed, to B"
    );
}

#[test]
fn unconnected_ping_to_a_denied_host_is_dropped_and_to_an_allowed_host_arrives() {
    let w = World::new();
    let at_a = capture(&w.a);
    let at_b = capture(&w.b);
    let attempts = w.probe(&["ping", &format!("{A4}:0")]);
    // The socket hooks never see an unconnected ping: the send succeeds.
    assert_eq!(attempts[0].outcome, Outcome::Sent, "{attempts:?}");
    // Type 8: an echo request (the router's redirects are ICMP too).
    assert_eq!(
        arrived(&at_a, A4, 1, Some(8), SETTLE),
        0,
        "echo request reached A"
    );
    assert_eq!(w.blocked().get(&(Some(ip(A4)), 1, 0)), Some(&1));
    let attempts = w.probe(&["ping", &format!("{B4}:0")]);
    assert_eq!(attempts[0].outcome, Outcome::Sent, "{attempts:?}");
    assert_eq!(
        arrived(&at_b, B4, 1, Some(8), SETTLE),
        1,
        "echo request to B"
    );
}

#[test]
fn ipv6_raw_packets_ping_and_fragments_follow_the_same_policy() {
    let w = World::new();
    let source = w.pod.ipv6.to_string();
    let at_a = capture(&w.a);
    let at_b = capture(&w.b);
    for to in [A6, B6] {
        w.raw("tcp-syn", &format!("[{to}]:80"), &[]);
        w.raw("udp", &format!("[{to}]:53"), &[]);
        w.raw("sctp", &format!("[{to}]:10"), &[]);
        w.raw("frag-udp", &format!("[{to}]:54"), &["--source", &source]);
        let attempts = w.probe(&["ping", &format!("[{to}]:0")]);
        assert_eq!(attempts[0].outcome, Outcome::Sent, "{attempts:?}");
    }
    let at_a = seen(&at_a, SETTLE);
    for (protocol, what) in [(6, "TCP"), (17, "UDP"), (132, "SCTP"), (58, "ICMPv6 echo")] {
        let port = (protocol == 58).then_some(128);
        assert_eq!(
            count(&at_a, A6, protocol, port),
            0,
            "{what} reached A: {at_a:?}"
        );
    }
    let blocked = w.blocked();
    let a = Some(ip(A6));
    assert_eq!(blocked.get(&(a, 6, 0)), Some(&1), "{blocked:?}");
    // The raw datagram and the first fragment (its later fragment is dropped uncounted by
    // policy: it follows the first).
    assert!(
        blocked.get(&(a, 17, 0)).is_some_and(|n| *n >= 2),
        "{blocked:?}"
    );
    assert_eq!(blocked.get(&(a, 132, 0)), Some(&1), "{blocked:?}");
    assert_eq!(blocked.get(&(a, 58, 0)), Some(&1), "{blocked:?}");

    let at_b = seen(&at_b, SETTLE);
    assert_eq!(count(&at_b, B6, 6, Some(80)), 1, "TCP SYN to B: {at_b:?}");
    assert_eq!(count(&at_b, B6, 17, Some(53)), 1, "UDP to B: {at_b:?}");
    assert_eq!(count(&at_b, B6, 132, Some(10)), 1, "SCTP to B: {at_b:?}");
    assert_eq!(
        count(&at_b, B6, 58, Some(128)),
        1,
        "echo request to B: {at_b:?}"
    );
    // Both fragments: the first (with the port) and the later one (without).
    assert_eq!(
        count(&at_b, B6, 17, Some(54)),
        1,
        "first fragment to B: {at_b:?}"
    );
    assert!(
        at_b.iter()
            .any(|p| p.to == ip(B6) && p.protocol == 17 && p.port.is_none()),
        "later fragment to B: {at_b:?}"
    );
}

#[test]
fn sctp_is_decided_by_port() {
    let w = World::new();
    let at_a = capture(&w.a);
    w.raw("sctp", &format!("{A4}:9"), &[]);
    w.raw("sctp", &format!("{A4}:10"), &[]);
    let at_a = seen(&at_a, SETTLE);
    assert_eq!(count(&at_a, A4, 132, Some(9)), 1, "SCTP to A:9 is allowed");
    assert_eq!(count(&at_a, A4, 132, Some(10)), 0, "SCTP to A:10 is not");
    assert_eq!(w.blocked().get(&(Some(ip(A4)), 132, 0)), Some(&1));
}

#[test]
fn a_forged_source_address_is_dropped_and_counted() {
    let w = World::new();
    let at_b = capture(&w.b);
    // B is allowed: only the source decides.
    w.raw("udp", &format!("{B4}:53"), &["--source", "198.51.100.99"]);
    w.raw("packet", &format!("{B4}:54"), &["--source", "203.0.113.77"]);
    assert_eq!(
        arrived(&at_b, B4, 17, None, SETTLE),
        0,
        "forged packets reached B"
    );
    assert_eq!(
        w.blocked().get(&(Some(ip(B4)), 17, RULE_MALFORMED)),
        Some(&2)
    );
    // The pod's own address passes.
    w.raw(
        "udp",
        &format!("{B4}:53"),
        &["--source", &w.pod.ipv4.to_string()],
    );
    assert_eq!(arrived(&at_b, B4, 17, None, SETTLE), 1);
}

#[test]
fn an_ipv4_source_route_in_one_sendmsg_is_dropped() {
    // No socket hook sees ancillary data: `sendmsg(B)` with an `IP_RETOPTS` LSRR through A
    // passes them, and the packet's first hop is A.
    let w = World::new();
    let at_a = capture(&w.a);
    let attempts = w.probe(&[
        "srcroute",
        &format!("{A4}:0"),
        &format!("{B4}:9"),
        "--kind",
        "lsrr",
        "--cmsg",
    ]);
    assert_eq!(
        attempts.last().map(|a| a.outcome),
        Some(Outcome::Sent),
        "{attempts:?}"
    );
    assert_eq!(
        arrived(&at_a, A4, 17, None, SETTLE),
        0,
        "the routed datagram reached A"
    );
    assert_eq!(
        w.blocked().get(&(Some(ip(A4)), 17, RULE_SOURCE_ROUTE)),
        Some(&1),
        "{:?}",
        w.blocked()
    );
}

#[test]
fn fragments_of_a_denied_datagram_never_arrive() {
    let w = World::new();
    let at_a = capture(&w.a);
    let at_b = capture(&w.b);
    w.raw("frag-udp", &format!("{A4}:53"), &[]);
    assert_eq!(
        arrived(&at_a, A4, 17, None, SETTLE),
        0,
        "a fragment reached A"
    );
    w.raw("frag-udp", &format!("{B4}:53"), &[]);
    assert_eq!(
        arrived(&at_b, B4, 17, None, SETTLE),
        2,
        "both fragments to B"
    );
    // A later fragment whose first was never seen is dropped, also to an allowed host: it
    // carries no port to decide by.
    w.raw("frag-later", &format!("{B4}:53"), &[]);
    assert_eq!(
        arrived(&at_b, B4, 17, None, SETTLE),
        0,
        "an orphan fragment reached B"
    );
}

#[test]
fn allowed_flows_replies_and_icmp_errors_pass() {
    let w = World::new();
    // TCP to B: the handshake needs the pod's SYN and ACK out and B's SYN-ACK in.
    let listener = w
        .sandbox
        .listen_tcp(&w.b, SocketAddr::new(ip(B4), 80))
        .expect("listener on B");
    let attempts = w.probe(&["connect", &format!("{B4}:80")]);
    assert_eq!(attempts[0].outcome, Outcome::Connected, "{attempts:?}");
    drop(listener);

    // A connection A opens to the pod is answered, though the pod may not open one to A: the
    // SYN-ACK and the data go out as replies (no socket hook sees an accepted socket's sends).
    let pid = w
        .sandbox
        .spawn_probe(
            &w.pod,
            &["tcp-echo", "0.0.0.0:7000", "--timeout-ms", "3000"],
        )
        .expect("tcp-echo");
    let pod = SocketAddr::new(IpAddr::V4(w.pod.ipv4), 7000);
    let a = w.a.netns.clone();
    let echoed = std::thread::spawn(move || -> io::Result<Vec<u8>> {
        let ns = File::open(Path::new("/run/netns").join(a))?;
        // SAFETY: setns on this thread only; it exits right after.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut conn = loop {
            match std::net::TcpStream::connect_timeout(&pod, Duration::from_secs(1)) {
                Ok(conn) => break conn,
                // The echo server may not listen yet.
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(err) => return Err(err),
            }
        };
        conn.set_read_timeout(Some(Duration::from_secs(2)))?;
        io::Write::write_all(&mut conn, b"hello")?;
        let mut reply = vec![0u8; 5];
        conn.read_exact(&mut reply)?;
        Ok(reply)
    })
    .join()
    .expect("client thread");
    assert_eq!(
        echoed.expect("A's connection to the pod is answered"),
        b"hello"
    );
    let _ = w.sandbox.wait_probe(pid);
    let mut reply = [0u8; 64];

    // The pod's port unreachable error for A's datagram reaches A: a connected socket sees it.
    let socket: UdpSocket = w
        .sandbox
        .bind_udp(&w.a, SocketAddr::new(ip(A4), 0))
        .expect("socket on A");
    socket
        .connect(SocketAddr::new(IpAddr::V4(w.pod.ipv4), 7999))
        .expect("connect");
    socket
        .set_read_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    socket.send(b"anyone?").expect("send");
    let err = socket
        .recv(&mut reply)
        .expect_err("nothing listens on 7999");
    assert_eq!(
        err.kind(),
        io::ErrorKind::ConnectionRefused,
        "the pod's ICMP port unreachable did not reach A: {err}"
    );
}

#[test]
fn revoking_a_policy_stops_an_established_tcp_flow() {
    let mut w = World::new();
    let listener = w
        .sandbox
        .listen_tcp(&w.b, SocketAddr::new(ip(B4), 80))
        .expect("listener on B");
    let stop = std::env::temp_dir().join(format!("{}-stream-stop", w.sandbox.id()));
    let _ = std::fs::remove_file(&stop);
    let pid = w
        .sandbox
        .spawn_probe(
            &w.pod,
            &[
                "stream",
                &format!("{B4}:80"),
                "--until-file",
                &stop.display().to_string(),
            ],
        )
        .expect("stream");
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut conn = loop {
        match listener.accept() {
            Ok((conn, _)) => break conn,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(err) => panic!("the pod never connected to B: {err}"),
        }
    };
    conn.set_nonblocking(false).expect("blocking");
    conn.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let mut buf = [0u8; 256];
    let before = conn.read(&mut buf).expect("bytes while allowed");
    assert!(before > 0);

    w.set_policy(false);
    // What was in flight before the flip may still come; after that, nothing.
    std::thread::sleep(Duration::from_millis(300));
    while conn.read(&mut buf).is_ok_and(|n| n > 0) {}
    let mut after = 0;
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        if let Ok(n) = conn.read(&mut buf) {
            after += n;
        }
    }
    assert_eq!(
        after, 0,
        "bytes of the open flow reached B after revocation"
    );
    assert!(
        w.blocked()
            .get(&(Some(ip(B4)), 6, 0))
            .is_some_and(|n| *n > 0),
        "{:?}",
        w.blocked()
    );
    std::fs::write(&stop, b"").expect("stop file");
    let _ = w.sandbox.wait_probe_output(pid);
    let _ = std::fs::remove_file(&stop);
}

#[test]
fn pinned_tc_links_survive_an_agent_restart() {
    let w = World::new();
    let World {
        sandbox,
        pod,
        a,
        b,
        dp,
        tc,
        ifindex,
    } = w;
    // The agent goes: every descriptor it held is closed; the pins keep the programs attached.
    drop(tc);
    let w = World {
        tc: TcAttachments::open(sandbox.pin_dir()).expect("reopen"),
        sandbox,
        pod,
        a,
        b,
        dp,
        ifindex,
    };
    assert!(w.tc.interfaces().contains(&w.ifindex), "links not adopted");
    let at_a = capture(&w.a);
    w.raw("udp", &format!("{A4}:53"), &[]);
    assert_eq!(
        arrived(&at_a, A4, 17, None, SETTLE),
        0,
        "UDP reached A after restart"
    );
    let links: Vec<String> = std::fs::read_dir(w.sandbox.pin_dir().join("links"))
        .expect("links dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("tc_"))
        .collect();
    assert_eq!(links.len(), 2, "{links:?}");

    // A workload that goes takes its links along.
    let mut w = w;
    w.tc.reconcile_interfaces(&TcDesired::new())
        .expect("detach");
    assert!(w.tc.interfaces().is_empty());
    let remaining = std::fs::read_dir(w.sandbox.pin_dir().join("links"))
        .expect("links dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("tc_"))
        .count();
    assert_eq!(remaining, 0);
    let at_a = capture(&w.a);
    w.raw("udp", &format!("{A4}:53"), &[]);
    assert_eq!(
        arrived(&at_a, A4, 17, None, SETTLE),
        1,
        "without the TC programs, raw UDP reaches A (the gap they close)"
    );
}

#[test]
fn ipv6_neighbour_discovery_keeps_working_under_a_deny_all_policy() {
    // A pod whose policy denies everything still resolves its neighbours: B allowed over IPv6
    // needs neighbour discovery with the gateway first.
    let w = World::new();
    let listener = w
        .sandbox
        .listen_tcp(&w.b, SocketAddr::new(ip(B6), 80))
        .expect("listener on B");
    let attempts = w.probe(&["connect", &format!("[{B6}]:80")]);
    assert_eq!(attempts[0].outcome, Outcome::Connected, "{attempts:?}");
    drop(listener);
}

#[test]
fn egret_run_attaches_to_configured_interfaces_keeps_them_across_restarts_and_detaches_on_removal()
{
    let mut sandbox = Sandbox::new().unwrap_or_else(|e| panic!("sandbox: {e}"));
    let pod = sandbox.add_pod("web").expect("pod");
    let host = sandbox
        .add_host("meta", &[ip("192.0.2.254"), ip("192.0.2.10")])
        .expect("host");
    enter(&format!("{}-node", sandbox.id()));
    let dir = std::env::temp_dir().join(format!("{}-tc-local", sandbox.id()));
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).expect("policies dir");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../manifests/examples/local/policies/block-metadata.yaml"),
        policies.join("block-metadata.yaml"),
    )
    .expect("copy policy");
    let config = |interfaces: &str| {
        format!(
            "baseline: allow\npolicies: [policies]\nmetrics: {{address: 127.0.0.1:0}}\nworkloads:\n\
             - {{name: web, namespace: shop, cgroup: {}, ips: [{}, {}]{interfaces}}}\n",
            pod.cgroup.display(),
            pod.ipv4,
            pod.ipv6,
        )
    };
    // The pod's node end is `p10`; a glob names it as a container host's naming scheme would.
    std::fs::write(dir.join("egret.yaml"), config(", interfaces: [\"p1?\"]")).expect("config");
    let raw_udp = |to: &str| {
        let attempts = sandbox
            .probe(&pod, None, &["raw", to, "--kind", "udp"])
            .expect("probe");
        assert_eq!(attempts[0].outcome, Outcome::Sent);
    };
    let meta_reached = |at: &OwnedFd| {
        raw_udp("192.0.2.254:53");
        raw_udp("192.0.2.10:53");
        let packets = seen(at, SETTLE);
        // The allowed address tells that packets flow at all.
        assert_eq!(
            count(&packets, "192.0.2.10", 17, Some(53)),
            1,
            "{packets:?}"
        );
        count(&packets, "192.0.2.254", 17, Some(53)) > 0
    };
    let at = capture(&host);

    let agent = egret_tests::agent::EgretRun::start(&dir, sandbox.pin_dir(), sandbox.cgroup(), "0")
        .expect("egret run");
    agent.wait_log("TC programs attached", 1, Duration::from_secs(20));
    assert!(!meta_reached(&at), "raw UDP reached the denied address");

    // Stopped: the pinned links keep enforcing.
    drop(agent);
    assert!(
        !meta_reached(&at),
        "raw UDP reached the denied address without an agent"
    );

    // Restarted: the links are adopted, not attached again.
    let agent = egret_tests::agent::EgretRun::start_with(
        &dir,
        sandbox.pin_dir(),
        sandbox.cgroup(),
        "0",
        &[],
        "-2",
    )
    .expect("egret run");
    agent.wait_log("adopted pinned TC links", 1, Duration::from_secs(20));
    agent.wait_log("policy enforced", 1, Duration::from_secs(20));
    assert!(
        !agent.log().contains("TC programs attached"),
        "{}",
        agent.log()
    );
    assert!(
        !meta_reached(&at),
        "raw UDP reached the denied address after a restart"
    );

    // Someone detaches the from-pod link (`bpftool link detach`) and removes the to-pod link's
    // pin: within the link check's second, the program is attached again, the pin is back,
    // and each is counted.
    let links = sandbox.pin_dir().join("links");
    let pinned = |program: &str| {
        std::fs::read_dir(&links)
            .expect("links dir")
            .flatten()
            .map(|entry| entry.path())
            .find(|path| {
                path.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{program}@")))
            })
            .unwrap_or_else(|| panic!("no pinned {program} link"))
    };
    let from_pod = pinned("tc_from_pod");
    let to_pod = pinned("tc_to_pod");
    let link = egret::sys::bpf_obj_get(&from_pod).expect("pinned link");
    egret::sys::bpf_link_detach(&link).expect("BPF_LINK_DETACH");
    std::fs::remove_file(&to_pod).expect("remove pin");
    agent.wait_log(
        "TC programs were detached from their interface: attached again",
        1,
        Duration::from_secs(5),
    );
    agent.wait_log(
        "TC link pin was removed: pinned again",
        1,
        Duration::from_secs(5),
    );
    assert!(to_pod.exists(), "the removed pin is back");
    assert!(
        !meta_reached(&at),
        "raw UDP reached the denied address after the TC link was detached"
    );
    let address = agent.metrics_address().expect("metrics address in the log");
    let metrics = egret_tests::agent::http_get(&address, "/metrics").expect("scrape");
    for (what, program) in [("reattached", "tc_from_pod"), ("repinned", "tc_to_pod")] {
        let line = format!("egret_links_restored_total{{program=\"{program}\",what=\"{what}\"}} 1");
        assert!(metrics.contains(&line), "no `{line}` in:\n{metrics}");
    }

    // The workload no longer names the interface: its programs go, and as a workload no TC
    // program covers (as one in the host's network namespace), its processes may not create
    // raw, ping or SCTP sockets at all.
    std::fs::write(dir.join("egret.yaml"), config("")).expect("config");
    agent.wait_log("TC programs detached", 1, Duration::from_secs(20));
    for args in [
        &["raw", "192.0.2.254:53", "--kind", "udp"][..],
        &["raw", "192.0.2.10:9", "--kind", "sctp"],
        &["ping", "192.0.2.254:0"],
    ] {
        let attempts = sandbox.probe(&pod, None, args).expect("probe");
        assert_eq!(
            attempts[0].outcome,
            Outcome::Denied,
            "{args:?}: {attempts:?}"
        );
    }
    assert_eq!(
        count(&seen(&at, SETTLE), "192.0.2.254", 17, None),
        0,
        "a packet reached the denied address"
    );
    // An ordinary UDP socket is still decided by the socket hooks, not refused.
    let attempts = sandbox
        .probe(&pod, None, &["udp", "192.0.2.10:53"])
        .expect("probe");
    assert_eq!(attempts[0].outcome, Outcome::Sent);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn egret_run_attaches_to_a_new_interface_when_it_appears_not_at_the_next_poll() {
    let mut sandbox = Sandbox::new().unwrap_or_else(|e| panic!("sandbox: {e}"));
    // The workload's cgroup and namespace exist; its veth does not yet (no CNI ADD so far).
    let pod = sandbox.add_unwired_pod("web").expect("pod");
    let host = sandbox
        .add_host("meta", &[ip("192.0.2.254"), ip("192.0.2.10")])
        .expect("host");
    enter(&format!("{}-node", sandbox.id()));
    let dir = std::env::temp_dir().join(format!("{}-tc-new-link", sandbox.id()));
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).expect("policies dir");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../manifests/examples/local/policies/block-metadata.yaml"),
        policies.join("block-metadata.yaml"),
    )
    .expect("copy policy");
    std::fs::write(
        dir.join("egret.yaml"),
        format!(
            "baseline: allow\npolicies: [policies]\nworkloads:\n\
             - {{name: web, namespace: shop, cgroup: {}, ips: [{}, {}], interfaces: [\"p1?\"]}}\n",
            pod.cgroup.display(),
            pod.ipv4,
            pod.ipv6,
        ),
    )
    .expect("config");
    let at = capture(&host);
    // An hour between polls (the runtime's tick): within this test only the link event can
    // have the runtime resolve the workload's interfaces again.
    let agent = egret_tests::agent::EgretRun::start_with(
        &dir,
        sandbox.pin_dir(),
        sandbox.cgroup(),
        "0",
        &["--poll-interval", "3600"],
        "",
    )
    .expect("egret run");
    agent.wait_log("policy enforced", 1, Duration::from_secs(20));
    assert!(
        !agent.log().contains("TC programs attached"),
        "no interface to attach to yet:\n{}",
        agent.log()
    );

    // The CNI makes the veth (`p10` on the node), moves its peer into the pod and sets both up.
    sandbox.wire_pod(&pod).expect("wire the pod");
    let ifindex = *resolve_interfaces(&["p10".into()])
        .get("p10")
        .expect("node-side veth p10");
    agent.wait_log("TC programs attached", 1, Duration::from_secs(20));
    assert!(
        sandbox
            .pin_dir()
            .join("links")
            .join(format!("tc_from_pod@{ifindex}"))
            .exists(),
        "the new interface's link is pinned"
    );
    for to in ["192.0.2.254:53", "192.0.2.10:53"] {
        let attempts = sandbox
            .probe(&pod, None, &["raw", to, "--kind", "udp"])
            .expect("probe");
        assert_eq!(attempts[0].outcome, Outcome::Sent, "{to}: {attempts:?}");
    }
    let packets = seen(&at, SETTLE);
    assert_eq!(
        count(&packets, "192.0.2.10", 17, Some(53)),
        1,
        "the allowed address tells that packets flow: {packets:?}"
    );
    assert_eq!(
        count(&packets, "192.0.2.254", 17, Some(53)),
        0,
        "raw UDP from the new interface reached the denied address: {packets:?}"
    );
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
}
