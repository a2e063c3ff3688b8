//! The node-side veth of a pod: the TC programs attach there. A pod's processes are found in its
//! cgroup, their network namespace through `/proc`, the pod's veths there (rtnetlink, from a
//! thread that entered the namespace), and each one's peer on this side by its index, checked to
//! be a veth whose own peer is the pod's interface. A pod in the host's network namespace
//! (hostNetwork) has none and keeps the socket hooks only.

use std::{
    fs::File,
    io,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use crate::netlink::{Link, links};

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
