//! The few host facts egret needs: where cgroup v2 is mounted, a cgroup's id, and a bpffs to pin
//! in (mounted when missing).

use std::{
    ffi::CString,
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// `BPF_FS_MAGIC` from the kernel's `include/uapi/linux/magic.h`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// `CGROUP2_SUPER_MAGIC`, same header.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Errors of this module; each names the path involved.
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    #[error("no cgroup2 filesystem is mounted (looked in /proc/self/mountinfo)")]
    NoCgroup2,
    #[error("failed to read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a directory on a cgroup2 filesystem")]
    NotCgroup2 { path: PathBuf },
    #[error("failed to mount bpffs at {path}")]
    MountBpffs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not on a bpffs, and is not a directory egret may mount one on")]
    NotBpffs { path: PathBuf },
}

/// The mount point of the cgroup v2 hierarchy (`/sys/fs/cgroup` on most hosts, elsewhere on
/// hybrid setups such as `/sys/fs/cgroup/unified`).
pub fn cgroup2_mount() -> Result<PathBuf, SysError> {
    let path = Path::new("/proc/self/mountinfo");
    let mountinfo = fs::read_to_string(path).map_err(|source| SysError::Read {
        path: path.into(),
        source,
    })?;
    parse_cgroup2_mount(&mountinfo).ok_or(SysError::NoCgroup2)
}

/// Finds the first cgroup2 mount in `/proc/self/mountinfo` text (see proc(5): fields, then
/// ` - `, then the filesystem type).
fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (fields, rest) = line.split_once(" - ")?;
        let fstype = rest.split_whitespace().next()?;
        let mount_point = fields.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_octal(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The id the kernel reports for a cgroup (`bpf_get_current_cgroup_id()`): the inode number of
/// its directory on the cgroup2 filesystem.
pub fn cgroup_id(path: &Path) -> Result<u64, SysError> {
    if fs_magic(path).map_err(|source| SysError::Read {
        path: path.into(),
        source,
    })? != CGROUP2_SUPER_MAGIC
    {
        return Err(SysError::NotCgroup2 { path: path.into() });
    }
    let meta = fs::metadata(path).map_err(|source| SysError::Read {
        path: path.into(),
        source,
    })?;
    Ok(meta.ino())
}

/// Makes sure `pin_dir` lies on a bpffs. When it does not, and `mount_point` (normally
/// `/sys/fs/bpf`) holds none, mounts one there.
pub fn ensure_bpffs(pin_dir: &Path, mount_point: &Path) -> Result<(), SysError> {
    if on_bpffs(pin_dir) {
        return Ok(());
    }
    if !pin_dir.starts_with(mount_point) {
        return Err(SysError::NotBpffs {
            path: pin_dir.into(),
        });
    }
    if !on_bpffs(mount_point) {
        let mount_err = |source| SysError::MountBpffs {
            path: mount_point.into(),
            source,
        };
        fs::create_dir_all(mount_point).map_err(mount_err)?;
        let target = CString::new(mount_point.as_os_str().as_encoded_bytes())
            .map_err(|e| mount_err(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
        // SAFETY: NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                target.as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(mount_err(io::Error::last_os_error()));
        }
        tracing::info!(path = %mount_point.display(), "mounted bpffs");
    }
    Ok(())
}

fn on_bpffs(path: &Path) -> bool {
    // The pin directory may not exist yet: its nearest existing ancestor decides.
    let existing = path.ancestors().find(|p| p.exists());
    existing.is_some_and(|p| fs_magic(p).is_ok_and(|m| m == BPF_FS_MAGIC))
}

fn fs_magic(path: &Path) -> io::Result<i64> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `statfs` is plain data, fully written on success.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid NUL-terminated path and out pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut buf) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // Not `expect`: the conversion is only useless on targets where `f_type` is already i64.
    #[allow(
        clippy::useless_conversion,
        reason = "f_type is i64 on x86_64 glibc, narrower on other libc targets"
    )]
    Ok(i64::from(buf.f_type))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_mount_on_hybrid_hosts() {
        let mountinfo = "\
25 30 0:23 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs rw,mode=755
26 25 0:24 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
27 25 0:25 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
";
        assert_eq!(
            parse_cgroup2_mount(mountinfo),
            Some("/sys/fs/cgroup/unified".into())
        );
        assert_eq!(
            parse_cgroup2_mount("26 25 0:24 / /x rw - cgroup cgroup rw"),
            None
        );
        assert_eq!(
            parse_cgroup2_mount("1 2 0:1 / /my\\040cgroups rw - cgroup2 none rw"),
            Some("/my cgroups".into())
        );
    }
}
