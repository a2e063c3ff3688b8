//! Directory watches through inotify(7): the run loop wakes when a cgroup appears or goes, not
//! at its next poll. cgroupfs reports `mkdir` and `rmdir` (systemd's and the kubelet's alike) as
//! `IN_CREATE` and `IN_DELETE` on the parent directory.
//!
//! Only wake-ups come from here; what changed is read from the hierarchy itself, so a lost or
//! merged event (queue overflow) costs nothing but the next poll's latency.

use std::{
    collections::BTreeMap,
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
    time::Duration,
};

/// Errors of this module; each names the directory involved.
#[derive(Debug, thiserror::Error)]
pub enum InotifyError {
    #[error("failed to create an inotify instance")]
    Init {
        #[source]
        source: io::Error,
    },
}

/// An inotify instance watching directories for entries created, removed or moved.
pub struct DirWatch {
    fd: OwnedFd,
    /// Watched directory -> watch descriptor.
    watched: BTreeMap<PathBuf, i32>,
}

impl DirWatch {
    pub fn new() -> Result<Self, InotifyError> {
        // SAFETY: plain syscall.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(InotifyError::Init {
                source: io::Error::last_os_error(),
            });
        }
        Ok(Self {
            // SAFETY: the kernel just handed us this fd.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            watched: BTreeMap::new(),
        })
    }

    /// Watches exactly `dirs` from now on (adding new ones, dropping others). A directory that
    /// cannot be watched (gone, or not a directory) is skipped: the poll backstop covers it.
    pub fn watch_only(&mut self, dirs: &[PathBuf]) {
        let wanted: std::collections::BTreeSet<&PathBuf> = dirs.iter().collect();
        let stale: Vec<PathBuf> = self
            .watched
            .keys()
            .filter(|dir| !wanted.contains(dir))
            .cloned()
            .collect();
        for dir in stale {
            if let Some(wd) = self.watched.remove(&dir) {
                // SAFETY: plain syscall; a descriptor the kernel already dropped gives EINVAL.
                unsafe { libc::inotify_rm_watch(self.fd.as_raw_fd(), wd) };
            }
        }
        for dir in dirs {
            if self.watched.contains_key(dir) {
                continue;
            }
            if let Some(wd) = self.add(dir) {
                self.watched.insert(dir.clone(), wd);
            }
        }
    }

    fn add(&self, dir: &Path) -> Option<i32> {
        let path = CString::new(dir.as_os_str().as_bytes()).ok()?;
        let mask = libc::IN_CREATE
            | libc::IN_DELETE
            | libc::IN_MOVED_FROM
            | libc::IN_MOVED_TO
            | libc::IN_DELETE_SELF
            | libc::IN_ONLYDIR;
        // SAFETY: `path` is a valid C string for the duration of the call.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), path.as_ptr(), mask) };
        if wd < 0 {
            tracing::debug!(
                dir = %dir.display(),
                error = %io::Error::last_os_error(),
                "not watching directory"
            );
            return None;
        }
        Some(wd)
    }

    /// Waits up to `timeout` for an event; true if any came (all pending ones are consumed).
    pub fn wait(&mut self, timeout: Duration) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let millis = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd for the duration of the call.
        let ready = unsafe { libc::poll(&mut pfd, 1, millis) };
        if ready <= 0 {
            return false;
        }
        let mut any = false;
        let mut ignored = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: `buf` is valid for writes of its length.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            let Ok(n) = usize::try_from(n) else { break };
            if n == 0 {
                break;
            }
            any = true;
            // struct inotify_event { int wd; u32 mask; u32 cookie; u32 len; char name[len]; }
            let mut at = 0;
            while at + 16 <= n {
                let word = |i: usize| {
                    let mut b = [0u8; 4];
                    b.copy_from_slice(&buf[at + 4 * i..at + 4 * i + 4]);
                    u32::from_ne_bytes(b)
                };
                let (wd, mask, len) = (word(0) as i32, word(1), word(3) as usize);
                if mask & libc::IN_IGNORED != 0 {
                    ignored.push(wd);
                }
                at += 16 + len;
            }
        }
        // A watch the kernel dropped (its directory went) is forgotten, so that a directory
        // created again at the same path is watched again.
        self.watched.retain(|_, wd| !ignored.contains(wd));
        any
    }
}
