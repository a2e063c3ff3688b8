//! Links of the calling thread's network namespace over rtnetlink: a dump of every link
//! ([`links`]) and a watch of their changes ([`watch_links`]). The Kubernetes source finds pods'
//! veths with them; local mode wakes the runtime on each change, so that a new interface a
//! workload names gets its TC programs at once.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

/// One network interface as rtnetlink lists it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `IFLA_LINK`: a veth's peer index (in the peer's namespace).
    pub peer: Option<u32>,
    /// `IFLA_INFO_KIND`: `veth`, `bridge`, ...
    pub kind: Option<String>,
    /// `IFLA_LINK_NETNSID`: the namespace of a veth's peer, when it is another namespace.
    pub peer_netns: Option<i32>,
}

impl Link {
    /// A veth whose other end is in another network namespace: the node side of a container's
    /// network, as CNI plugins make them.
    pub fn is_container_veth(&self) -> bool {
        self.kind.as_deref() == Some("veth") && self.peer_netns.is_some()
    }
}

const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINK: u16 = 5;
const IFLA_LINKINFO: u16 = 18;
const IFLA_LINK_NETNSID: u16 = 37;
/// `RTMGRP_LINK`: the multicast group of link changes.
const RTMGRP_LINK: u32 = 1;
const IFLA_INFO_KIND: u16 = 1;
/// Header of a netlink message, then `struct ifinfomsg`.
const NLMSG_HDRLEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;

fn route_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Calls `changed` whenever a link of the calling thread's network namespace is added, changed
/// or removed (`RTMGRP_LINK`), until `changed` returns false or the socket fails. Blocks: run it
/// on a thread of its own.
pub fn watch_links(mut changed: impl FnMut() -> bool) -> io::Result<()> {
    let fd = route_socket()?;
    // SAFETY: zeroed `sockaddr_nl` is valid; the fields are set below.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    addr.nl_groups = RTMGRP_LINK;
    // SAFETY: a valid address of the size given.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: valid buffer of `buf.len()` bytes.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let err = io::Error::last_os_error();
            // ENOBUFS: notifications were lost; a change happened all the same.
            if err.raw_os_error() != Some(libc::ENOBUFS) && err.kind() != io::ErrorKind::Interrupted
            {
                return Err(err);
            }
        }
        if !changed() {
            return Ok(());
        }
    }
}

/// Runs [`watch_links`] on a thread of its own (in the calling thread's network namespace),
/// calling `changed` at each change until it returns false. A watch that cannot start or that
/// fails is logged, with `otherwise`: what still catches the change.
pub fn spawn_watch(mut changed: impl FnMut() -> bool + Send + 'static, otherwise: &'static str) {
    let spawned = std::thread::Builder::new()
        .name("links".into())
        .spawn(move || {
            if let Err(err) = watch_links(&mut changed) {
                tracing::warn!("link watch ended ({err}); {otherwise}");
            }
        });
    if let Err(err) = spawned {
        tracing::warn!("no link watch ({err}); {otherwise}");
    }
}

/// Every link of the calling thread's network namespace (`RTM_GETLINK` dump).
pub fn links() -> io::Result<Vec<Link>> {
    let fd = route_socket()?;
    let mut request = [0u8; NLMSG_HDRLEN + IFINFOMSG_LEN];
    let len = request.len() as u32;
    request[0..4].copy_from_slice(&len.to_ne_bytes());
    request[4..6].copy_from_slice(&RTM_GETLINK.to_ne_bytes());
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    request[6..8].copy_from_slice(&flags.to_ne_bytes());
    request[8..12].copy_from_slice(&1u32.to_ne_bytes());
    // SAFETY: valid buffer of `request.len()` bytes; the kernel is the default destination.
    if unsafe { libc::send(fd.as_raw_fd(), request.as_ptr().cast(), request.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: valid buffer of `buf.len()` bytes.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
        let mut at = 0;
        while at + NLMSG_HDRLEN <= n {
            let msg_len = u32_at(&buf, at) as usize;
            let kind = u16_at(&buf, at + 4);
            if msg_len < NLMSG_HDRLEN || at + msg_len > n {
                return Err(io::Error::other("truncated netlink message"));
            }
            match kind {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    let errno =
                        i32::from_ne_bytes(buf[at + 16..at + 20].try_into().unwrap_or_default());
                    return Err(io::Error::from_raw_os_error(-errno));
                }
                RTM_NEWLINK => out.push(parse_link(&buf[at + NLMSG_HDRLEN..at + msg_len])),
                _ => {}
            }
            at += align(msg_len);
        }
        if n == 0 {
            return Ok(out);
        }
    }
}

fn align(len: usize) -> usize {
    (len + 3) & !3
}

fn u16_at(buf: &[u8], at: usize) -> u16 {
    buf.get(at..at + 2)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u16::from_ne_bytes)
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    buf.get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_ne_bytes)
}

/// The attributes of one `ifinfomsg` and what follows it.
fn parse_link(body: &[u8]) -> Link {
    let mut link = Link {
        index: u32_at(body, 4),
        ..Link::default()
    };
    for (kind, value) in attributes(body.get(IFINFOMSG_LEN..).unwrap_or_default()) {
        match kind {
            IFLA_IFNAME => link.name = c_string(value),
            IFLA_LINK => link.peer = Some(u32_at(value, 0)),
            IFLA_LINK_NETNSID => link.peer_netns = Some(u32_at(value, 0) as i32),
            IFLA_LINKINFO => {
                link.kind = attributes(value)
                    .find(|(k, _)| *k == IFLA_INFO_KIND)
                    .map(|(_, v)| c_string(v));
            }
            _ => {}
        }
    }
    link
}

/// `(type, value)` of each route attribute in `buf` (nesting flags masked off).
fn attributes(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut at = 0;
    std::iter::from_fn(move || {
        let len = usize::from(u16_at(buf, at));
        if len < 4 || at + len > buf.len() {
            return None;
        }
        let item = (u16_at(buf, at + 2) & 0x3fff, &buf[at + 4..at + len]);
        at += align(len);
        Some(item)
    })
}

fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_namespace_lists_its_loopback() {
        let links = links().unwrap();
        assert!(
            links.iter().any(|l| l.name == "lo" && l.index == 1),
            "{links:?}"
        );
    }

    #[test]
    fn link_attributes_parse() {
        // ifinfomsg (index 7), IFLA_IFNAME "veth0", IFLA_LINK 3, IFLA_LINKINFO { KIND "veth" }.
        let mut body = vec![0u8; IFINFOMSG_LEN];
        body[4..8].copy_from_slice(&7u32.to_ne_bytes());
        let attr = |kind: u16, value: &[u8], out: &mut Vec<u8>| {
            let len = 4 + value.len();
            out.extend_from_slice(&(len as u16).to_ne_bytes());
            out.extend_from_slice(&kind.to_ne_bytes());
            out.extend_from_slice(value);
            out.resize(align(out.len()), 0);
        };
        attr(IFLA_IFNAME, b"veth0\0", &mut body);
        attr(IFLA_LINK, &3u32.to_ne_bytes(), &mut body);
        let mut info = Vec::new();
        attr(IFLA_INFO_KIND, b"veth\0", &mut info);
        attr(IFLA_LINKINFO | 0x8000, &info, &mut body);
        assert_eq!(
            parse_link(&body),
            Link {
                index: 7,
                name: "veth0".into(),
                peer: Some(3),
                kind: Some("veth".into()),
                peer_netns: None,
            }
        );
        attr(IFLA_LINK_NETNSID, &2u32.to_ne_bytes(), &mut body);
        let link = parse_link(&body);
        assert_eq!(link.peer_netns, Some(2));
        assert!(link.is_container_veth());
    }
}
