//! `egret-probe`: makes connection attempts the way an application would and prints one JSON
//! line per attempt with its outcome. The sandbox runs it inside a test pod's network namespace
//! and cgroup, so the kernel programs see an ordinary process of that pod.
//!
//! ```text
//! egret-probe connect 192.0.2.10:80 [--count N] [--interval-ms MS] [--timeout-ms MS] [--v6only=false]
//! egret-probe udp 192.0.2.10:53 [--count N] [--payload TEXT]
//! egret-probe sendmmsg 192.0.2.10:53 192.0.2.11:53 ... [--payload TEXT]
//! egret-probe loop 192.0.2.10:80 --until-file PATH [--interval-ms MS]
//! egret-probe udp-loop 192.0.2.10:53 --until-file PATH   # datagrams as fast as it can on one
//!                                                     # socket; prints one summary line
//! egret-probe scan [2001:db8:2::1:0]:9 --count N   # one UDP datagram to each of N addresses
//!                                                 # from the first up; prints one summary line
//! egret-probe srcroute VIA:0 TARGET --kind rthdr|rthdr2|lsrr|rthdr-clear|record-route --send sendto|connect|connected-udp
//!     # sets a source route through VIA (an IPv6 segment routing header, or an IPv4 LSRR
//!     # option), then sends to TARGET; prints the setsockopt outcome ("sent" when accepted),
//!     # then the send's. `connected-udp` connects first and sets the route after.
//!     # `--cmsg` passes the route as ancillary data of one `sendmsg` instead (IP_RETOPTS or
//!     # IPV6_RTHDR), which no cgroup hook sees; prints the sendmsg's outcome only.
//! egret-probe raw 192.0.2.10:9 --kind tcp-syn|udp|sctp|frag-udp|frag-later|packet|packet-bypass [--source ADDR]
//!     # one hand-built IPv4 packet, sent the way no socket hook sees: a raw socket
//!     # (IP_HDRINCL), or an AF_PACKET frame to the broadcast MAC on eth0 (`packet-bypass`
//!     # with PACKET_QDISC_BYPASS); `frag-udp` sends a UDP datagram as two fragments,
//!     # `frag-later` its second fragment alone; `--source` writes that source address.
//!     # An IPv6 target: tcp-syn, udp, sctp from a raw socket of that protocol (the kernel
//!     # writes the IPv6 header), or frag-udp (needs --source): two fragments with a
//!     # fragment header, written whole
//! egret-probe ping 192.0.2.10:0      # one echo request from an unconnected ping socket (sendto)
//! egret-probe tcp-echo 0.0.0.0:7000  # accepts one connection, echoes one read, then exits
//! egret-probe stream 192.0.2.11:80 --until-file PATH  # one TCP connection, a byte every 20 ms
//!     # until PATH exists or a write fails; prints the connect outcome and bytes written
//! ```
//! `[::ffff:192.0.2.10]:80` uses an AF_INET6 socket with an IPv4-mapped destination.

use std::{
    io,
    mem::size_of,
    net::{SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::PathBuf,
    time::{Duration, Instant},
};

use egret_tests::probe::Outcome;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(err) = run(&args) {
        eprintln!("egret-probe: {err}");
        std::process::exit(2);
    }
}

struct Options {
    count: u32,
    interval: Duration,
    timeout: Duration,
    payload: String,
    until_file: Option<PathBuf>,
    targets: Vec<SocketAddr>,
    /// `srcroute`: `rthdr` or `lsrr`.
    kind: String,
    /// `srcroute`: `sendto`, `connect` or `connected-udp`.
    send: String,
    /// `srcroute`: pass the route as ancillary data of one `sendmsg`.
    cmsg: bool,
    /// `raw`: the source address written into the packet.
    source: Option<std::net::IpAddr>,
}

fn parse(args: &[String]) -> Result<Options, String> {
    let mut o = Options {
        count: 1,
        interval: Duration::from_millis(0),
        timeout: Duration::from_millis(1000),
        payload: "egret".into(),
        until_file: None,
        targets: Vec::new(),
        kind: "rthdr".into(),
        send: "sendto".into(),
        cmsg: false,
        source: None,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--count" => o.count = value()?.parse().map_err(|e| format!("--count: {e}"))?,
            "--interval-ms" => {
                o.interval = Duration::from_millis(
                    value()?
                        .parse()
                        .map_err(|e| format!("--interval-ms: {e}"))?,
                )
            }
            "--timeout-ms" => {
                o.timeout = Duration::from_millis(
                    value()?.parse().map_err(|e| format!("--timeout-ms: {e}"))?,
                )
            }
            "--payload" => o.payload = value()?.clone(),
            "--until-file" => o.until_file = Some(value()?.into()),
            "--kind" => o.kind = value()?.clone(),
            "--send" => o.send = value()?.clone(),
            "--cmsg" => o.cmsg = true,
            "--source" => o.source = Some(value()?.parse().map_err(|e| format!("--source: {e}"))?),
            target => o.targets.push(
                target
                    .parse()
                    .map_err(|e| format!("target {target}: {e}"))?,
            ),
        }
    }
    if o.targets.is_empty() {
        return Err("no target address".into());
    }
    Ok(o)
}

fn run(args: &[String]) -> Result<(), String> {
    let (mode, rest) = args
        .split_first()
        .ok_or("usage: egret-probe connect|udp|sendmmsg|loop TARGET...")?;
    let o = parse(rest)?;
    match mode.as_str() {
        "connect" => {
            for i in 0..o.count {
                if i > 0 {
                    std::thread::sleep(o.interval);
                }
                report("tcp", o.targets[0], tcp_connect(o.targets[0], o.timeout));
            }
        }
        "udp" => {
            for i in 0..o.count {
                if i > 0 {
                    std::thread::sleep(o.interval);
                }
                report(
                    "udp",
                    o.targets[0],
                    udp_send(o.targets[0], o.payload.as_bytes()),
                );
            }
        }
        "sendmmsg" => {
            for (target, outcome) in send_mmsg(&o.targets, o.payload.as_bytes())? {
                report("udp", target, outcome);
            }
        }
        "scan" => {
            // One socket, as a scanner would; only the address changes between datagrams.
            let first = o.targets[0];
            let fd = socket(first, libc::SOCK_DGRAM).map_err(|e| format!("socket: {e}"))?;
            let mut outcomes = std::collections::BTreeMap::<String, u64>::new();
            for i in 0..o.count {
                let target = match first {
                    SocketAddr::V4(v4) => SocketAddr::from((
                        std::net::Ipv4Addr::from(u32::from(*v4.ip()).wrapping_add(i)),
                        v4.port(),
                    )),
                    SocketAddr::V6(v6) => SocketAddr::from((
                        std::net::Ipv6Addr::from(u128::from(*v6.ip()).wrapping_add(u128::from(i))),
                        v6.port(),
                    )),
                };
                tally(&mut outcomes, send_on(&fd, target, o.payload.as_bytes()));
            }
            println!(
                "{}",
                serde_json::json!({"protocol": "udp", "target": first.to_string(), "count": o.count, "outcomes": outcomes})
            );
        }
        "udp-loop" => {
            // Tens of thousands of decisions a second: races that last microseconds show.
            let stop = o.until_file.as_ref().ok_or("udp-loop needs --until-file")?;
            let target = o.targets[0];
            let fd = socket(target, libc::SOCK_DGRAM).map_err(|e| format!("socket: {e}"))?;
            let mut outcomes = std::collections::BTreeMap::<String, u64>::new();
            let mut count = 0u64;
            while !count.is_multiple_of(1024) || !stop.exists() {
                tally(&mut outcomes, send_on(&fd, target, o.payload.as_bytes()));
                count += 1;
            }
            println!(
                "{}",
                serde_json::json!({"protocol": "udp", "target": target.to_string(), "count": count, "outcomes": outcomes})
            );
        }
        "loop" => {
            let stop = o.until_file.as_ref().ok_or("loop needs --until-file")?;
            while !stop.exists() {
                report("tcp", o.targets[0], tcp_connect(o.targets[0], o.timeout));
                std::thread::sleep(o.interval);
            }
        }
        "srcroute" => {
            let (&via, &target) = match o.targets.as_slice() {
                [via, target, ..] => (via, target),
                _ => return Err("srcroute needs VIA and TARGET".into()),
            };
            source_route(&o, via, target)?;
        }
        "raw" => {
            let outcome = match (o.targets[0], o.source) {
                (SocketAddr::V4(target), None) => raw::send(&o.kind, target, None),
                (SocketAddr::V4(target), Some(std::net::IpAddr::V4(source))) => {
                    raw::send(&o.kind, target, Some(source))
                }
                (SocketAddr::V6(target), source) => raw::send6(&o.kind, target, source),
                _ => return Err("--source and the target differ in family".into()),
            };
            report(&o.kind, o.targets[0], outcome);
        }
        "ping" => report("icmp", o.targets[0], raw::ping(o.targets[0])),
        "tcp-echo" => {
            let listener =
                std::net::TcpListener::bind(o.targets[0]).map_err(|e| format!("bind: {e}"))?;
            let (mut conn, from) = listener.accept().map_err(|e| format!("accept: {e}"))?;
            conn.set_read_timeout(Some(o.timeout))
                .map_err(|e| format!("timeout: {e}"))?;
            let mut buf = [0u8; 1500];
            let n = std::io::Read::read(&mut conn, &mut buf).map_err(|e| format!("read: {e}"))?;
            let outcome = match std::io::Write::write_all(&mut conn, &buf[..n]) {
                Ok(()) => Outcome::Sent,
                Err(err) => Outcome::from_error(&err),
            };
            report("tcp", from, outcome);
        }
        "stream" => {
            let stop = o.until_file.as_ref().ok_or("stream needs --until-file")?;
            raw::stream(o.targets[0], stop, o.timeout);
        }
        other => return Err(format!("unknown mode {other}")),
    }
    Ok(())
}

/// Sets a source route through `via` on a socket to `target` and sends, as `o.send` says.
fn source_route(o: &Options, via: SocketAddr, target: SocketAddr) -> Result<(), String> {
    let option = match (o.kind.as_str(), via, target) {
        ("rthdr", SocketAddr::V6(via), SocketAddr::V6(_)) => SourceRoute::Rthdr(srh(via)),
        ("lsrr", SocketAddr::V4(via), SocketAddr::V4(_)) => SourceRoute::Lsrr(lsrr(via)),
        // Controls: clearing the routing header (length 0), and IPv4 options without a
        // source route (record route).
        ("rthdr-clear", SocketAddr::V6(_), SocketAddr::V6(_)) => SourceRoute::Rthdr(Vec::new()),
        // A type 2 routing header (Mobile IPv6, RFC 6275): one address, `via`.
        ("rthdr2", SocketAddr::V6(via), SocketAddr::V6(_)) => {
            let mut bytes = vec![0, 2, 2, 1, 0, 0, 0, 0];
            bytes.extend_from_slice(&via.ip().octets());
            SourceRoute::Rthdr(bytes)
        }
        ("record-route", SocketAddr::V4(_), SocketAddr::V4(_)) => {
            SourceRoute::Lsrr(vec![7, 7, 4, 0, 0, 0, 0, 0])
        }
        (kind, ..) => return Err(format!("--kind {kind} does not fit {via} and {target}")),
    };
    let tcp = o.send == "connect";
    let kind = if tcp {
        libc::SOCK_STREAM | libc::SOCK_NONBLOCK
    } else {
        libc::SOCK_DGRAM
    };
    let fd = socket(target, kind).map_err(|e| format!("socket: {e}"))?;
    let (storage, len) = sockaddr(target);
    if o.cmsg {
        report(
            "udp",
            target,
            send_with_route(&fd, target, &option, o.payload.as_bytes()),
        );
        return Ok(());
    }
    if o.send == "connected-udp" {
        // SAFETY: valid fd and address buffer.
        let rc = unsafe { libc::connect(fd.as_raw_fd(), (&raw const storage).cast(), len) };
        if rc != 0 {
            report(
                "udp",
                target,
                Outcome::from_error(&io::Error::last_os_error()),
            );
            return Ok(());
        }
    }
    let (level, name, bytes) = match &option {
        SourceRoute::Rthdr(bytes) => (libc::IPPROTO_IPV6, libc::IPV6_RTHDR, bytes),
        SourceRoute::Lsrr(bytes) => (libc::IPPROTO_IP, libc::IP_OPTIONS, bytes),
    };
    // SAFETY: valid fd and option buffer.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            bytes.as_ptr().cast(),
            bytes.len() as libc::socklen_t,
        )
    };
    let set = if rc == 0 {
        Outcome::Sent
    } else {
        Outcome::from_error(&io::Error::last_os_error())
    };
    report("setsockopt", via, set);
    let payload = o.payload.as_bytes();
    let outcome = match o.send.as_str() {
        "sendto" => send_on(&fd, target, payload),
        "connected-udp" => {
            // SAFETY: valid fd and payload buffer.
            let rc =
                unsafe { libc::send(fd.as_raw_fd(), payload.as_ptr().cast(), payload.len(), 0) };
            if rc < 0 {
                Outcome::from_error(&io::Error::last_os_error())
            } else {
                Outcome::Sent
            }
        }
        "connect" => connect_on(&fd, target, o.timeout),
        other => return Err(format!("--send {other}: sendto, connect or connected-udp")),
    };
    report(if tcp { "tcp" } else { "udp" }, target, outcome);
    Ok(())
}

/// One `sendmsg` to `target` whose ancillary data carries `route` (`IP_RETOPTS` for IPv4
/// options, `IPV6_RTHDR` for a routing header).
fn send_with_route(
    fd: &OwnedFd,
    target: SocketAddr,
    route: &SourceRoute,
    payload: &[u8],
) -> Outcome {
    let (level, kind, bytes) = match route {
        SourceRoute::Rthdr(bytes) => (libc::IPPROTO_IPV6, libc::IPV6_RTHDR, bytes),
        SourceRoute::Lsrr(bytes) => (libc::IPPROTO_IP, libc::IP_RETOPTS, bytes),
    };
    let (mut storage, len) = sockaddr(target);
    let mut payload = payload.to_vec();
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: payload.len(),
    };
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(bytes.len() as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    // SAFETY: msghdr is plain data; every pointer set below outlives the syscall.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&raw mut storage).cast();
    msg.msg_namelen = len;
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: the control buffer holds one header and `bytes` (CMSG_SPACE above).
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = level;
        (*cmsg).cmsg_type = kind;
        (*cmsg).cmsg_len = libc::CMSG_LEN(bytes.len() as u32) as usize;
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), libc::CMSG_DATA(cmsg), bytes.len());
    }
    // SAFETY: valid fd and message.
    if unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, 0) } < 0 {
        Outcome::from_error(&io::Error::last_os_error())
    } else {
        Outcome::Sent
    }
}

enum SourceRoute {
    Rthdr(Vec<u8>),
    Lsrr(Vec<u8>),
}

/// A segment routing header (RFC 8754, `struct ipv6_sr_hdr`) with two segments: the kernel
/// puts the destination passed to `sendto`/`connect` in segment 0 and sends the packet to
/// segment 1, `via`, first.
fn srh(via: SocketAddrV6) -> Vec<u8> {
    let segments = 2u8;
    let mut out = vec![
        0,            // next header, filled by the kernel
        2 * segments, // header length in 8-byte units, not counting the first 8 bytes
        4,            // routing type 4: segment routing
        segments - 1, // segments left
        segments - 1, // last entry
        0,            // flags
        0,
        0, // tag
    ];
    out.extend_from_slice(&[0; 16]);
    out.extend_from_slice(&via.ip().octets());
    out
}

/// IPv4 options holding a loose source route through `via` (RFC 791), padded to 4 bytes.
fn lsrr(via: SocketAddrV4) -> Vec<u8> {
    let mut out = vec![1, 0x83, 7, 4];
    out.extend_from_slice(&via.ip().octets());
    out
}

/// Counts one outcome under its JSON name, for the summary modes.
fn tally(outcomes: &mut std::collections::BTreeMap<String, u64>, outcome: Outcome) {
    let name = serde_json::to_value(outcome)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| "?".into());
    *outcomes.entry(name).or_default() += 1;
}

fn report(protocol: &str, target: SocketAddr, outcome: Outcome) {
    println!(
        "{}",
        serde_json::json!({"protocol": protocol, "target": target.to_string(), "outcome": outcome})
    );
}

/// A socket of the target's family; a mapped IPv4 target gets a dual-stack AF_INET6 socket.
fn socket(target: SocketAddr, kind: i32) -> io::Result<OwnedFd> {
    let family = match target {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    // SAFETY: plain syscall; the fd is owned right away.
    let fd = unsafe { libc::socket(family, kind | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    if family == libc::AF_INET6 {
        let off: libc::c_int = 0;
        // SAFETY: valid fd and option buffer.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::IPPROTO_IPV6,
                libc::IPV6_V6ONLY,
                (&raw const off).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
    }
    Ok(fd)
}

fn tcp_connect(target: SocketAddr, timeout: Duration) -> Outcome {
    // std's connect_timeout cannot make the dual-stack socket a mapped target needs.
    let fd = match socket(target, libc::SOCK_STREAM | libc::SOCK_NONBLOCK) {
        Ok(fd) => fd,
        Err(err) => return Outcome::from_error(&err),
    };
    connect_on(&fd, target, timeout)
}

/// A TCP connect on a non-blocking socket, waiting up to `timeout` for the handshake.
fn connect_on(fd: &OwnedFd, target: SocketAddr, timeout: Duration) -> Outcome {
    let (storage, len) = sockaddr(target);
    // SAFETY: valid fd and address buffer.
    let rc = unsafe { libc::connect(fd.as_raw_fd(), (&raw const storage).cast(), len) };
    if rc == 0 {
        return Outcome::Connected;
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EINPROGRESS) {
        return Outcome::from_error(&err);
    }
    let deadline = Instant::now() + timeout;
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    let left = deadline
        .saturating_duration_since(Instant::now())
        .as_millis() as i32;
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, left) };
    if n == 0 {
        return Outcome::Timeout;
    }
    let mut so_error: libc::c_int = 0;
    let mut optlen = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: valid fd and out buffers.
    unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&raw mut so_error).cast(),
            &mut optlen,
        )
    };
    if so_error == 0 {
        Outcome::Connected
    } else {
        Outcome::from_error(&io::Error::from_raw_os_error(so_error))
    }
}

fn udp_send(target: SocketAddr, payload: &[u8]) -> Outcome {
    match socket(target, libc::SOCK_DGRAM) {
        Ok(fd) => send_on(&fd, target, payload),
        Err(err) => Outcome::from_error(&err),
    }
}

/// One `sendto` of `payload` to `target` on an unconnected datagram socket.
fn send_on(fd: &OwnedFd, target: SocketAddr, payload: &[u8]) -> Outcome {
    let (storage, len) = sockaddr(target);
    // SAFETY: valid fd, payload and address buffers.
    let rc = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            payload.as_ptr().cast(),
            payload.len(),
            0,
            (&raw const storage).cast(),
            len,
        )
    };
    if rc < 0 {
        Outcome::from_error(&io::Error::last_os_error())
    } else {
        Outcome::Sent
    }
}

/// Sends one datagram to each target with `sendmmsg` from one unconnected socket, as a batching
/// application would: when a message fails, the rest are retried from the one after it.
fn send_mmsg(targets: &[SocketAddr], payload: &[u8]) -> Result<Vec<(SocketAddr, Outcome)>, String> {
    let fd = socket(targets[0], libc::SOCK_DGRAM).map_err(|e| format!("socket: {e}"))?;
    let addrs: Vec<(libc::sockaddr_storage, libc::socklen_t)> =
        targets.iter().map(|t| sockaddr(*t)).collect();
    let mut payloads: Vec<Vec<u8>> = targets
        .iter()
        .enumerate()
        .map(|(i, _)| format!("{}-{i}", String::from_utf8_lossy(payload)).into_bytes())
        .collect();
    let mut iovs: Vec<libc::iovec> = payloads
        .iter_mut()
        .map(|p| libc::iovec {
            iov_base: p.as_mut_ptr().cast(),
            iov_len: p.len(),
        })
        .collect();
    // SAFETY: mmsghdr is plain data; every pointer set below outlives the syscalls.
    let mut msgs: Vec<libc::mmsghdr> = (0..targets.len())
        .map(|_| unsafe { std::mem::zeroed() })
        .collect();
    for (i, msg) in msgs.iter_mut().enumerate() {
        msg.msg_hdr.msg_name = (&raw const addrs[i].0).cast_mut().cast();
        msg.msg_hdr.msg_namelen = addrs[i].1;
        msg.msg_hdr.msg_iov = &raw mut iovs[i];
        msg.msg_hdr.msg_iovlen = 1;
    }
    let mut out = Vec::new();
    let mut start = 0;
    while start < msgs.len() {
        // SAFETY: valid fd and a vector of initialised headers.
        let n = unsafe {
            libc::sendmmsg(
                fd.as_raw_fd(),
                msgs[start..].as_mut_ptr(),
                (msgs.len() - start) as u32,
                0,
            )
        };
        if n < 0 {
            out.push((
                targets[start],
                Outcome::from_error(&io::Error::last_os_error()),
            ));
            start += 1;
        } else {
            for t in &targets[start..start + n as usize] {
                out.push((*t, Outcome::Sent));
            }
            start += n as usize;
        }
    }
    Ok(out)
}

fn sockaddr(target: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match target {
        SocketAddr::V4(v4) => {
            let sin = sockaddr_in(v4);
            // SAFETY: sockaddr_storage is large enough and aligned for sockaddr_in.
            unsafe { (&raw mut storage).cast::<libc::sockaddr_in>().write(sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = sockaddr_in6(v6);
            // SAFETY: as above, for sockaddr_in6.
            unsafe { (&raw mut storage).cast::<libc::sockaddr_in6>().write(sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

fn sockaddr_in(v4: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(v4.ip().octets()),
        },
        sin_zero: [0; 8],
    }
}

fn sockaddr_in6(v6: SocketAddrV6) -> libc::sockaddr_in6 {
    libc::sockaddr_in6 {
        sin6_family: libc::AF_INET6 as libc::sa_family_t,
        sin6_port: v6.port().to_be(),
        sin6_flowinfo: 0,
        sin6_addr: libc::in6_addr {
            s6_addr: v6.ip().octets(),
        },
        sin6_scope_id: 0,
    }
}

/// Packets built by hand: what an attacker with `CAP_NET_RAW` in a pod sends past every socket
/// hook.
mod raw {
    use std::{
        io::Write as _,
        net::{Ipv4Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpStream},
        os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        path::Path,
        time::Duration,
    };

    use egret_tests::probe::Outcome;

    /// Identification of the fragmented datagram.
    const FRAGMENT_ID: u16 = 0x4242;
    /// Identification of the orphan later fragment (`frag-later`): never seen before.
    const ORPHAN_ID: u16 = 0x4343;

    fn checksum(bytes: &[u8]) -> u16 {
        let mut sum = 0u32;
        for pair in bytes.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    /// An IPv4 packet: `frag` is the flags and offset field.
    fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, frag: u16, payload: &[u8]) -> Vec<u8> {
        ipv4_with_id(src, dst, protocol, frag, FRAGMENT_ID, payload)
    }

    fn ipv4_with_id(
        src: Ipv4Addr,
        dst: Ipv4Addr,
        protocol: u8,
        frag: u16,
        id: u16,
        payload: &[u8],
    ) -> Vec<u8> {
        let len = (20 + payload.len()) as u16;
        let mut packet = vec![0x45, 0];
        packet.extend_from_slice(&len.to_be_bytes());
        packet.extend_from_slice(&id.to_be_bytes());
        packet.extend_from_slice(&frag.to_be_bytes());
        packet.extend_from_slice(&[64, protocol, 0, 0]);
        packet.extend_from_slice(&src.octets());
        packet.extend_from_slice(&dst.octets());
        let sum = checksum(&packet);
        packet[10..12].copy_from_slice(&sum.to_be_bytes());
        packet.extend_from_slice(payload);
        packet
    }

    fn udp(port: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&40000u16.to_be_bytes());
        out.extend_from_slice(&port.to_be_bytes());
        out.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        // Checksum 0: none (RFC 768).
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(payload);
        out
    }

    fn tcp_syn(port: u16) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&40001u16.to_be_bytes());
        out.extend_from_slice(&port.to_be_bytes());
        out.extend_from_slice(&1u32.to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
        // Data offset 5 words, SYN.
        out.extend_from_slice(&[0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
        out
    }

    /// An SCTP INIT chunk in a common header (RFC 9260 3.1, 3.3.2); the CRC32c is left zero,
    /// the receiver's stack would drop it but its interface sees it.
    fn sctp_init(port: u16) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&40002u16.to_be_bytes());
        out.extend_from_slice(&port.to_be_bytes());
        out.extend_from_slice(&[0; 8]);
        // INIT: type 1, flags 0, length 20, initiate tag, a_rwnd, streams, initial TSN.
        out.extend_from_slice(&[1, 0, 0, 20]);
        out.extend_from_slice(&[0, 0, 0, 1, 0, 1, 0, 0, 0, 1, 0, 1, 0, 0, 0, 1]);
        out
    }

    fn fd(domain: i32, kind: i32, protocol: i32) -> std::io::Result<OwnedFd> {
        // SAFETY: plain syscall; the fd is owned right away.
        let fd = unsafe { libc::socket(domain, kind | libc::SOCK_CLOEXEC, protocol) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh fd we own.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    fn outcome(rc: isize) -> Outcome {
        if rc < 0 {
            Outcome::from_error(&std::io::Error::last_os_error())
        } else {
            Outcome::Sent
        }
    }

    /// Sends `packets` through a raw IPv4 socket that writes its own headers.
    fn send_raw(target: SocketAddrV4, packets: &[Vec<u8>]) -> Outcome {
        let socket = match fd(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) {
            Ok(socket) => socket,
            Err(err) => return Outcome::from_error(&err),
        };
        let addr = super::sockaddr_in(target);
        let mut result = Outcome::Sent;
        for packet in packets {
            // SAFETY: valid fd, buffer and address.
            let rc = unsafe {
                libc::sendto(
                    socket.as_raw_fd(),
                    packet.as_ptr().cast(),
                    packet.len(),
                    0,
                    (&raw const addr).cast(),
                    size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            result = outcome(rc);
        }
        result
    }

    /// Sends `packet` as the payload of an Ethernet frame to the broadcast address on `eth0`,
    /// the way an `AF_PACKET` socket can: past IP routing, and with `bypass` past the qdisc.
    fn send_frame(packet: &[u8], bypass: bool) -> Outcome {
        let socket = match fd(libc::AF_PACKET, libc::SOCK_RAW, 0) {
            Ok(socket) => socket,
            Err(err) => return Outcome::from_error(&err),
        };
        if bypass {
            let on: libc::c_int = 1;
            // SAFETY: valid fd and option buffer. PACKET_QDISC_BYPASS is 20.
            let rc = unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::SOL_PACKET,
                    20,
                    (&raw const on).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return outcome(-1);
            }
        }
        // SAFETY: NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(c"eth0".as_ptr()) };
        // SAFETY: plain data, zero is valid.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = (libc::ETH_P_IP as u16).to_be();
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        let mut frame = vec![0xff; 6];
        frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
        frame.extend_from_slice(&(libc::ETH_P_IP as u16).to_be_bytes());
        frame.extend_from_slice(packet);
        // SAFETY: valid fd, buffer and address.
        let rc = unsafe {
            libc::sendto(
                socket.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        outcome(rc)
    }

    pub fn send(kind: &str, target: SocketAddrV4, source: Option<Ipv4Addr>) -> Outcome {
        // A zero source is filled in by the kernel for raw sockets.
        let src = source.unwrap_or(Ipv4Addr::UNSPECIFIED);
        let (dst, port) = (*target.ip(), target.port());
        let payload = b"egret-raw-payload-0123456789abcdef";
        match kind {
            "tcp-syn" => send_raw(target, &[ipv4(src, dst, 6, 0, &tcp_syn(port))]),
            "udp" => send_raw(target, &[ipv4(src, dst, 17, 0, &udp(port, payload))]),
            "sctp" => send_raw(target, &[ipv4(src, dst, 132, 0, &sctp_init(port))]),
            "frag-udp" | "frag-later" => {
                let datagram = udp(port, payload);
                // First fragment: 16 bytes (MF set); the rest at offset 2 (units of 8 bytes).
                let first = ipv4(src, dst, 17, 0x2000, &datagram[..16]);
                let later = ipv4(src, dst, 17, 2, &datagram[16..]);
                if kind == "frag-udp" {
                    send_raw(target, &[first, later])
                } else {
                    let orphan = ipv4_with_id(src, dst, 17, 2, ORPHAN_ID, &datagram[16..]);
                    send_raw(target, &[orphan])
                }
            }
            "packet" | "packet-bypass" => {
                let packet = ipv4(src, dst, 17, 0, &udp(port, payload));
                send_frame(&packet, kind == "packet-bypass")
            }
            _ => Outcome::Error,
        }
    }

    /// One echo request from an unconnected ping socket (`sendto`, which runs no cgroup hook).
    pub fn ping(target: SocketAddr) -> Outcome {
        // Ping sockets are open to the groups in this sysctl (per network namespace; it covers
        // ICMPv6 ping sockets too).
        let _ = std::fs::write("/proc/sys/net/ipv4/ping_group_range", "0 2147483647");
        let (domain, protocol, kind) = match target {
            SocketAddr::V4(_) => (libc::AF_INET, libc::IPPROTO_ICMP, 8u8),
            SocketAddr::V6(_) => (libc::AF_INET6, libc::IPPROTO_ICMPV6, 128u8),
        };
        let socket = match fd(domain, libc::SOCK_DGRAM, protocol) {
            Ok(socket) => socket,
            Err(err) => return Outcome::from_error(&err),
        };
        // An echo request; the kernel writes identifier and checksum.
        let request = [kind, 0, 0, 0, 0, 0, 0, 1, b'e', b'g', b'r', b'e', b't'];
        let (addr, len) = super::sockaddr(target);
        // SAFETY: valid fd, buffer and address.
        let rc = unsafe {
            libc::sendto(
                socket.as_raw_fd(),
                request.as_ptr().cast(),
                request.len(),
                0,
                (&raw const addr).cast(),
                len,
            )
        };
        outcome(rc)
    }

    /// Sends one IPv6 packet of `kind` to `target` from a raw socket.
    pub fn send6(kind: &str, target: SocketAddrV6, source: Option<std::net::IpAddr>) -> Outcome {
        let port = target.port();
        let payload = b"egret-raw-payload-0123456789abcdef";
        let (protocol, packet) = match kind {
            "tcp-syn" => (libc::IPPROTO_TCP, tcp_syn(port)),
            "udp" => (libc::IPPROTO_UDP, udp(port, payload)),
            "sctp" => (libc::IPPROTO_SCTP, sctp_init(port)),
            "frag-udp" => {
                let Some(std::net::IpAddr::V6(src)) = source else {
                    return Outcome::Error;
                };
                let datagram = udp(port, payload);
                let first = ipv6_fragment(src, *target.ip(), 0, true, &datagram[..16]);
                let later = ipv6_fragment(src, *target.ip(), 2, false, &datagram[16..]);
                return send_packets6(libc::IPPROTO_RAW, target, &[first, later]);
            }
            _ => return Outcome::Error,
        };
        // The kernel's port field of a raw IPv6 socket address must be 0 (or the protocol).
        send_packets6(
            protocol,
            SocketAddrV6::new(*target.ip(), 0, 0, 0),
            &[packet],
        )
    }

    /// An IPv6 packet holding a fragment header (next header UDP) and `payload` at `offset`
    /// (units of 8 bytes).
    fn ipv6_fragment(
        src: std::net::Ipv6Addr,
        dst: std::net::Ipv6Addr,
        offset: u16,
        more: bool,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut packet = vec![0x60, 0, 0, 0];
        packet.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        packet.extend_from_slice(&[44, 64]);
        packet.extend_from_slice(&src.octets());
        packet.extend_from_slice(&dst.octets());
        let field = (offset << 3) | u16::from(more);
        packet.extend_from_slice(&[17, 0]);
        packet.extend_from_slice(&field.to_be_bytes());
        packet.extend_from_slice(&0x4242_4242u32.to_be_bytes());
        packet.extend_from_slice(payload);
        packet
    }

    fn send_packets6(protocol: i32, target: SocketAddrV6, packets: &[Vec<u8>]) -> Outcome {
        let socket = match fd(libc::AF_INET6, libc::SOCK_RAW, protocol) {
            Ok(socket) => socket,
            Err(err) => return Outcome::from_error(&err),
        };
        let (addr, len) = super::sockaddr(SocketAddr::V6(SocketAddrV6::new(*target.ip(), 0, 0, 0)));
        let mut result = Outcome::Sent;
        for packet in packets {
            // SAFETY: valid fd, buffer and address.
            let rc = unsafe {
                libc::sendto(
                    socket.as_raw_fd(),
                    packet.as_ptr().cast(),
                    packet.len(),
                    0,
                    (&raw const addr).cast(),
                    len,
                )
            };
            result = outcome(rc);
        }
        result
    }

    /// One TCP connection writing a byte every 20 ms until `stop` exists or a write fails.
    pub fn stream(target: SocketAddr, stop: &Path, timeout: Duration) {
        let mut stream = match TcpStream::connect_timeout(&target, timeout) {
            Ok(stream) => stream,
            Err(err) => {
                super::report("tcp", target, Outcome::from_error(&err));
                return;
            }
        };
        super::report("tcp", target, Outcome::Connected);
        let _ = stream.set_write_timeout(Some(timeout));
        let mut written = 0u64;
        while !stop.exists() {
            if stream.write_all(b"x").is_err() {
                break;
            }
            written += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("egret-probe: stream wrote {written} bytes");
    }
}
