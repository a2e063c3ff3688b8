//! The node-side veth of a pod: the TC programs attach there. A pod's processes are found in its
//! cgroup, their network namespace through `/proc`, the pod's veths there (rtnetlink, from a
//! thread that entered the namespace), and each one's peer on this side by its index, checked to
//! be a veth whose own peer is the pod's interface. A pod in the host's network namespace
//! (hostNetwork) has none and keeps the socket hooks only.

use std::{
    fs::File,
    io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
};

/// Errors of looking up a pod's network; each names the pod cgroup or process it was about.
#[derive(Debug, thiserror::Error)]
pub enum VethError {
    #[error(
        "the processes of pod cgroup {} are in another pid namespace: the agent needs hostPID to find pods' veths",
        cgroup.display()
    )]
    OtherPidNamespace { cgroup: PathBuf },
    #[error(
        "not permitted to enter the network namespace of process {pid}: the agent needs CAP_SYS_ADMIN and CAP_SYS_PTRACE to find pods' veths"
    )]
    NotPermitted {
        pid: u32,
        #[source]
        source: io::Error,
    },
    #[error("failed to read the processes of pod cgroup {}", cgroup.display())]
    Cgroup {
        cgroup: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to open the network namespace of process {pid}")]
    Namespace {
        pid: u32,
        #[source]
        source: io::Error,
    },
    #[error("failed to list the links in the network namespace of process {pid}")]
    Links {
        pid: u32,
        #[source]
        source: io::Error,
    },
}

impl VethError {
    /// Whether the lookup cannot work for any pod while the agent runs as it does (its pod
    /// spec or capabilities), rather than failing for this pod now: such an error does not go
    /// away by looking again.
    pub fn is_setup(&self) -> bool {
        matches!(
            self,
            Self::OtherPidNamespace { .. } | Self::NotPermitted { .. }
        )
    }
}

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

/// Where a pod's packets leave it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodNetwork {
    /// No process in its cgroup yet: nothing to look at.
    NotStarted,
    /// It shares this namespace (hostNetwork): no veth.
    Host,
    /// The node-side ends of its veths: (index, name).
    Veths(Vec<(u32, String)>),
}

/// Finds the network of the pod whose cgroup is `cgroup`, given this namespace's links.
pub fn pod_network(cgroup: &Path, ours: &[Link]) -> Result<PodNetwork, VethError> {
    let pid = match first_pid(cgroup).map_err(|source| VethError::Cgroup {
        cgroup: cgroup.into(),
        source,
    })? {
        Procs::Empty => return Ok(PodNetwork::NotStarted),
        Procs::Hidden => {
            return Err(VethError::OtherPidNamespace {
                cgroup: cgroup.into(),
            });
        }
        Procs::Visible(pid) => pid,
    };
    let theirs = match File::open(format!("/proc/{pid}/ns/net")) {
        Ok(file) => file,
        // The process ended between the two reads: as if not started; the next look finds
        // another.
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(PodNetwork::NotStarted),
        // Opening another process's namespace needs ptrace access to it (`proc_ns_get_link`).
        Err(source) if source.kind() == io::ErrorKind::PermissionDenied => {
            return Err(VethError::NotPermitted { pid, source });
        }
        Err(source) => return Err(VethError::Namespace { pid, source }),
    };
    let namespace = |source| VethError::Namespace { pid, source };
    let mine = std::fs::metadata("/proc/thread-self/ns/net").map_err(namespace)?;
    let their_meta = theirs.metadata().map_err(namespace)?;
    if (mine.dev(), mine.ino()) == (their_meta.dev(), their_meta.ino()) {
        return Ok(PodNetwork::Host);
    }
    let pod_links = links_in(theirs, pid)?;
    let mut veths = Vec::new();
    for link in pod_links
        .iter()
        .filter(|l| l.kind.as_deref() == Some("veth"))
    {
        let Some(peer) = link.peer else { continue };
        // The peer index is in the peer's namespace: it is ours only if our interface of that
        // index is a veth whose peer is this one.
        if let Some(node_end) = ours.iter().find(|o| {
            o.index == peer && o.kind.as_deref() == Some("veth") && o.peer == Some(link.index)
        }) {
            veths.push((node_end.index, node_end.name.clone()));
        }
    }
    Ok(PodNetwork::Veths(veths))
}

/// Whether `pid` runs in `cgroup` or below it.
pub fn holds_pid(cgroup: &Path, pid: u32) -> bool {
    let here = std::fs::read_to_string(cgroup.join("cgroup.procs"))
        .is_ok_and(|procs| procs.lines().any(|l| l.trim().parse() == Ok(pid)));
    here || std::fs::read_dir(cgroup).is_ok_and(|entries| {
        entries.flatten().any(|entry| {
            entry.file_type().is_ok_and(|t| t.is_dir()) && holds_pid(&entry.path(), pid)
        })
    })
}

/// What the `cgroup.procs` files of a cgroup and its descendants show.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Procs {
    /// No process.
    Empty,
    /// A process of this pid namespace, the first found.
    Visible(u32),
    /// Only processes of other pid namespaces: the kernel lists them as pid 0
    /// (`cgroup_procs_show()` prints `task_pid_vnr()`, 0 for a task the reader cannot see).
    Hidden,
}

/// The first process found in `cgroup` or below it.
fn first_pid(cgroup: &Path) -> io::Result<Procs> {
    let procs = match std::fs::read_to_string(cgroup.join("cgroup.procs")) {
        Ok(text) => text,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Procs::Empty),
        Err(err) => return Err(err),
    };
    let mut hidden = false;
    for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
        if pid != 0 {
            return Ok(Procs::Visible(pid));
        }
        hidden = true;
    }
    for entry in std::fs::read_dir(cgroup)?.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            match first_pid(&entry.path())? {
                Procs::Visible(pid) => return Ok(Procs::Visible(pid)),
                Procs::Hidden => hidden = true,
                Procs::Empty => {}
            }
        }
    }
    Ok(if hidden { Procs::Hidden } else { Procs::Empty })
}

/// The links of the namespace `netns` (process `pid`'s), listed from a thread that enters it (a
/// namespace change is per thread: the rest of the process stays where it is).
fn links_in(netns: File, pid: u32) -> Result<Vec<Link>, VethError> {
    std::thread::Builder::new()
        .name("netns-links".into())
        .spawn(move || {
            // SAFETY: a valid namespace fd; only this thread moves.
            if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                let source = io::Error::last_os_error();
                // `setns` needs CAP_SYS_ADMIN over the namespace's user namespace.
                return Err(if source.kind() == io::ErrorKind::PermissionDenied {
                    VethError::NotPermitted { pid, source }
                } else {
                    VethError::Namespace { pid, source }
                });
            }
            links().map_err(|source| VethError::Links { pid, source })
        })
        .map_err(|source| VethError::Links { pid, source })?
        .join()
        .map_err(|_| VethError::Links {
            pid,
            source: io::Error::other("the netns thread panicked"),
        })?
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
    fn a_cgroup_without_processes_is_not_started() {
        let dir = std::env::temp_dir().join(format!("egret-veth-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("child")).unwrap();
        std::fs::write(dir.join("cgroup.procs"), "").unwrap();
        assert_eq!(pod_network(&dir, &[]).unwrap(), PodNetwork::NotStarted);
        // A process of this test's own namespace: the host's network.
        std::fs::write(
            dir.join("child/cgroup.procs"),
            format!("{}\n", std::process::id()),
        )
        .unwrap();
        assert_eq!(pod_network(&dir, &[]).unwrap(), PodNetwork::Host);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn processes_of_another_pid_namespace_cannot_be_looked_up() {
        let dir = std::env::temp_dir().join(format!("egret-veth-hidden-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("child")).unwrap();
        // What an agent without hostPID reads: the pod's processes as pid 0.
        std::fs::write(dir.join("cgroup.procs"), "0\n0\n").unwrap();
        std::fs::write(dir.join("child/cgroup.procs"), "").unwrap();
        let err = pod_network(&dir, &[]).unwrap_err();
        assert!(
            matches!(&err, VethError::OtherPidNamespace { cgroup } if *cgroup == dir),
            "{err:?}"
        );
        assert!(
            err.is_setup() && err.to_string().contains("hostPID"),
            "{err}"
        );
        // A process this namespace sees wins over hidden ones (one that is exiting reads as 0
        // too).
        std::fs::write(
            dir.join("child/cgroup.procs"),
            format!("{}\n", std::process::id()),
        )
        .unwrap();
        assert_eq!(pod_network(&dir, &[]).unwrap(), PodNetwork::Host);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn only_a_refusal_to_enter_is_a_setup_error() {
        let refused = VethError::NotPermitted {
            pid: 7,
            source: io::Error::from_raw_os_error(libc::EPERM),
        };
        assert!(refused.is_setup());
        assert!(refused.to_string().contains("CAP_SYS_ADMIN"), "{refused}");
        let listed = VethError::Links {
            pid: 7,
            source: io::Error::from_raw_os_error(libc::ENOBUFS),
        };
        assert!(!listed.is_setup());
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
