//! The few host facts egret needs: where cgroup v2 is mounted, a cgroup's id, a bpffs to pin in
//! (mounted when missing) with directories nobody else can write, and the raw `bpf()` commands
//! aya does not expose (a link's attach point, pinning and detaching by file descriptor).

use std::{
    ffi::CString,
    fs, io,
    os::{
        fd::{AsFd, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::fs::{DirBuilderExt as _, MetadataExt as _},
    },
    path::{Path, PathBuf},
};

/// `BPF_FS_MAGIC` from the kernel's `include/uapi/linux/magic.h`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// `CGROUP2_SUPER_MAGIC`, same header.
pub const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

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
    #[error(
        "refusing pin path {path}: found {found}; required: {required} (remove it, or fix its owner and mode, and start again)"
    )]
    UnsafePinPath {
        path: PathBuf,
        found: String,
        required: &'static str,
    },
    #[error("failed to create pin directory {path}")]
    CreatePinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("bpf({command}) failed on {object}")]
    Bpf {
        command: &'static str,
        object: String,
        #[source]
        source: io::Error,
    },
}

/// Blocks until the process gets SIGTERM or SIGINT (the signals are taken, not delivered, so
/// the caller returns normally).
pub fn wait_for_termination() -> io::Result<()> {
    // SAFETY: `set` is plain data initialised by sigemptyset before use; the calls only read
    // and write it and the thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        let mut signal = 0;
        let rc = libc::sigwait(&set, &mut signal);
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
    }
    Ok(())
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
/// `/sys/fs/bpf`) holds none, mounts one there, with mode 0700: only root may pin there (the
/// kernel's default for a new bpffs is 1777, which lets anyone create directories egret would
/// later use).
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
                c"mode=0700".as_ptr().cast(),
            )
        };
        if rc != 0 {
            return Err(mount_err(io::Error::last_os_error()));
        }
        tracing::info!(path = %mount_point.display(), "mounted bpffs");
    }
    Ok(())
}

/// What a pin directory must be: see [`secure_pin_dir`].
const PIN_DIR_REQUIRED: &str =
    "a directory (not a symlink) owned by root, not writable by group or others";
/// What a directory above the pin directory must be.
const ANCESTOR_REQUIRED: &str = "a directory (not a symlink), owned by root, and not writable by group or others unless sticky (mode 1777)";
/// What a pinned file must be.
const PIN_FILE_REQUIRED: &str = "a pinned object (not a symlink) owned by root";

/// Makes sure each of `dirs` (a pin directory and the directories under it, parents first) is
/// a directory only root can change, creating the missing ones (mode 0700) once every existing
/// one has passed, so a refusal leaves nothing behind.
///
/// Checked without following symlinks: every existing component of each path is `lstat`ed, a
/// symlink anywhere is refused, each ancestor must be root's and not writable by others (a
/// sticky world-writable directory such as a default bpffs root is fine: others cannot rename
/// or remove what root created there), and each directory itself must be root's and not
/// writable by group or others. Otherwise an unprivileged user who created a directory first
/// could later remove egret's pins (detaching enforcement) or plant links for egret to adopt.
pub fn secure_pin_dirs(dirs: &[&Path]) -> Result<(), SysError> {
    let mut missing = Vec::new();
    for dir in dirs {
        if !check_pin_dir(dir)? {
            missing.push(*dir);
        }
    }
    for dir in missing {
        let create_err = |source| SysError::CreatePinDir {
            path: dir.into(),
            source,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(create_err)?;
        // The umask may have narrowed the mode, never widened it; check what was made.
        let meta = fs::symlink_metadata(dir).map_err(create_err)?;
        check_dir(dir, &meta, false)?;
    }
    Ok(())
}

/// Checks `dir` and its ancestors as [`secure_pin_dirs`] says; `Ok(false)` when `dir` does
/// not exist (its existing ancestors passed).
fn check_pin_dir(dir: &Path) -> Result<bool, SysError> {
    let ancestors: Vec<&Path> = dir.ancestors().skip(1).collect();
    for ancestor in ancestors.into_iter().rev() {
        if ancestor.as_os_str().is_empty() {
            continue;
        }
        match fs::symlink_metadata(ancestor) {
            Ok(meta) => check_dir(ancestor, &meta, true)?,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(source) => {
                return Err(SysError::Read {
                    path: ancestor.into(),
                    source,
                });
            }
        }
    }
    match fs::symlink_metadata(dir) {
        Ok(meta) => check_dir(dir, &meta, false).map(|()| true),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(SysError::Read {
            path: dir.into(),
            source,
        }),
    }
}

fn check_dir(path: &Path, meta: &fs::Metadata, ancestor: bool) -> Result<(), SysError> {
    let file_type = meta.file_type();
    let kind = if file_type.is_symlink() {
        Kind::Symlink
    } else if file_type.is_dir() {
        Kind::Dir
    } else {
        Kind::Other
    };
    match judge_dir(kind, meta.uid(), meta.gid(), meta.mode(), ancestor) {
        None => Ok(()),
        Some(found) => Err(SysError::UnsafePinPath {
            path: path.into(),
            found,
            required: if ancestor {
                ANCESTOR_REQUIRED
            } else {
                PIN_DIR_REQUIRED
            },
        }),
    }
}

/// What `lstat` found at a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Symlink,
    Dir,
    Other,
}

/// Why a directory is not safe to pin in (what was found), or `None` when it is: see
/// [`secure_pin_dirs`].
fn judge_dir(kind: Kind, uid: u32, gid: u32, mode: u32, ancestor: bool) -> Option<String> {
    match kind {
        Kind::Symlink => return Some("a symlink".into()),
        Kind::Other => return Some(format!("not a directory (mode {:o})", mode & 0o7777)),
        Kind::Dir => {}
    }
    let writable_by_others = mode & 0o022 != 0;
    let sticky = mode & 0o1000 != 0;
    (uid != 0 || (writable_by_others && !(ancestor && sticky)))
        .then(|| format!("owner uid {uid} gid {gid}, mode {:o}", mode & 0o7777))
}

/// Checks a pinned file before egret opens it: not a symlink, owned by root. `Ok(false)` when
/// there is no file.
pub fn check_pin_file(path: &Path) -> Result<bool, SysError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(source) => {
            return Err(SysError::Read {
                path: path.into(),
                source,
            });
        }
    };
    let refuse = |found: String| SysError::UnsafePinPath {
        path: path.into(),
        found,
        required: PIN_FILE_REQUIRED,
    };
    if meta.file_type().is_symlink() {
        return Err(refuse("a symlink".into()));
    }
    if meta.uid() != 0 {
        return Err(refuse(format!(
            "owner uid {}, mode {:o}",
            meta.uid(),
            meta.mode() & 0o7777
        )));
    }
    Ok(true)
}

/// `enum bpf_cmd` values from include/uapi/linux/bpf.h.
mod bpf_cmd {
    pub const PROG_LOAD: libc::c_long = 5;
    pub const OBJ_PIN: libc::c_long = 6;
    pub const OBJ_GET: libc::c_long = 7;
    pub const OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    pub const LINK_CREATE: libc::c_long = 28;
    pub const LINK_DETACH: libc::c_long = 34;
}

/// `BPF_LINK_TYPE_CGROUP` from `enum bpf_link_type`.
pub const BPF_LINK_TYPE_CGROUP: u32 = 3;
/// `BPF_LINK_TYPE_TCX` from `enum bpf_link_type`.
pub const BPF_LINK_TYPE_TCX: u32 = 11;

/// The start of `struct bpf_link_info` (include/uapi/linux/bpf.h) with its `cgroup` union
/// member, which begins 8-byte aligned at offset 16; the kernel fills what fits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct RawLinkInfo {
    link_type: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    cgroup_id: u64,
    attach_type: u32,
    _rest: [u32; 9],
}
const _: () = assert!(std::mem::offset_of!(RawLinkInfo, cgroup_id) == 16);

/// What the kernel says about a link (`BPF_OBJ_GET_INFO_BY_FD`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkFacts {
    /// `enum bpf_link_type`; [`BPF_LINK_TYPE_CGROUP`] for egret's.
    pub link_type: u32,
    pub id: u32,
    pub prog_id: u32,
    /// For a cgroup link: the cgroup it is attached to, `0` once detached (`bpftool link
    /// detach`, `BPF_LINK_DETACH`, or the cgroup removed).
    pub cgroup_id: u64,
    /// For a cgroup link: `enum bpf_attach_type`.
    pub attach_type: u32,
}

impl LinkFacts {
    /// For a TCX link: (interface index, `enum bpf_attach_type`). The `tcx` member of the info
    /// union (`{ __u32 ifindex; __u32 attach_type; }`) sits where a cgroup link's `cgroup_id`
    /// does; the interface index is `0` once the link is detached or its device gone.
    pub fn tcx(&self) -> (u32, u32) {
        let bytes = self.cgroup_id.to_ne_bytes();
        (
            u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
            u32::from_ne_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
        )
    }
}

fn bpf(
    cmd: libc::c_long,
    attr: &mut [u64],
    command: &'static str,
    object: &dyn Fn() -> String,
) -> Result<i64, SysError> {
    // SAFETY: `attr` is a zero-initialised buffer at least as large as the command's part of
    // `union bpf_attr`, and every pointer in it outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr) as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(SysError::Bpf {
            command,
            object: object(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(rc)
}

fn c_path(path: &Path) -> Result<CString, SysError> {
    CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| SysError::Read {
        path: path.into(),
        source: io::Error::new(io::ErrorKind::InvalidInput, e),
    })
}

/// Opens a pinned object (`BPF_OBJ_GET`).
pub fn bpf_obj_get(path: &Path) -> Result<OwnedFd, SysError> {
    let c = c_path(path)?;
    // struct { __aligned_u64 pathname; __u32 bpf_fd; __u32 file_flags; __s32 path_fd; }
    let mut attr = [0u64; 3];
    attr[0] = c.as_ptr() as u64;
    let fd = bpf(bpf_cmd::OBJ_GET, &mut attr, "BPF_OBJ_GET", &|| {
        path.display().to_string()
    })?;
    // SAFETY: the kernel returned a new file descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Pins `fd` at `path` (`BPF_OBJ_PIN`); fails when something is pinned there already.
pub fn bpf_obj_pin(fd: BorrowedFd<'_>, path: &Path) -> Result<(), SysError> {
    let c = c_path(path)?;
    let mut attr = [0u64; 3];
    attr[0] = c.as_ptr() as u64;
    attr[1] = fd.as_raw_fd() as u32 as u64;
    bpf(bpf_cmd::OBJ_PIN, &mut attr, "BPF_OBJ_PIN", &|| {
        path.display().to_string()
    })?;
    Ok(())
}

/// What the kernel reports for the link behind `fd`.
pub fn bpf_link_info(fd: impl AsFd) -> Result<LinkFacts, SysError> {
    let fd = fd.as_fd();
    let mut info = RawLinkInfo::default();
    // struct { __u32 bpf_fd; __u32 info_len; __aligned_u64 info; }
    let mut attr = [0u64; 2];
    attr[0] =
        u64::from(fd.as_raw_fd() as u32) | ((std::mem::size_of::<RawLinkInfo>() as u64) << 32);
    attr[1] = (&raw mut info) as u64;
    bpf(
        bpf_cmd::OBJ_GET_INFO_BY_FD,
        &mut attr,
        "BPF_OBJ_GET_INFO_BY_FD",
        &|| format!("link fd {}", fd.as_raw_fd()),
    )?;
    let RawLinkInfo {
        link_type,
        id,
        prog_id,
        cgroup_id,
        attach_type,
        ..
    } = info;
    Ok(LinkFacts {
        link_type,
        id,
        prog_id,
        cgroup_id,
        attach_type,
    })
}

/// Attaches the program `prog` to the cgroup directory `cgroup` as `attach_type` through a new
/// bpf_link (`BPF_LINK_CREATE`, no flags: cgroup links always coexist with other programs).
pub fn bpf_link_create_cgroup(
    prog: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach_type: u32,
) -> Result<OwnedFd, SysError> {
    // struct { __u32 prog_fd; __u32 target_fd; __u32 attach_type; __u32 flags; }
    let mut attr = [0u64; 2];
    attr[0] = u64::from(prog.as_raw_fd() as u32) | (u64::from(cgroup.as_raw_fd() as u32) << 32);
    attr[1] = u64::from(attach_type);
    let fd = bpf(bpf_cmd::LINK_CREATE, &mut attr, "BPF_LINK_CREATE", &|| {
        format!("attach type {attach_type}")
    })?;
    // SAFETY: the kernel returned a new file descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Attaches the `BPF_PROG_TYPE_SCHED_CLS` program `prog` to interface `ifindex` as
/// `attach_type` (`BPF_TCX_INGRESS` or `BPF_TCX_EGRESS`) through a new TCX link, appended after
/// the programs already there (no flags, no relative program).
pub fn bpf_link_create_tcx(
    prog: BorrowedFd<'_>,
    ifindex: u32,
    attach_type: u32,
) -> Result<OwnedFd, SysError> {
    // struct { __u32 prog_fd; __u32 target_ifindex; __u32 attach_type; __u32 flags;
    //          union { struct { __u32 relative_fd; __u64 expected_revision; } tcx; } }
    let mut attr = [0u64; 4];
    attr[0] = u64::from(prog.as_raw_fd() as u32) | (u64::from(ifindex) << 32);
    attr[1] = u64::from(attach_type);
    let fd = bpf(bpf_cmd::LINK_CREATE, &mut attr, "BPF_LINK_CREATE", &|| {
        format!("TCX attach type {attach_type} on interface {ifindex}")
    })?;
    // SAFETY: the kernel returned a new file descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Loads a program of `prog_type` (for `expected_attach_type`) that returns 1 and does nothing
/// else, for feature probes: it is never attached, and goes when the descriptor is dropped.
pub fn bpf_prog_load_probe(prog_type: u32, expected_attach_type: u32) -> Result<OwnedFd, SysError> {
    // `r0 = 1; exit`: BPF_ALU64 | BPF_MOV | BPF_K into r0, then BPF_JMP | BPF_EXIT.
    let insns: [u64; 2] = [0x0000_0001_0000_00b7, 0x0000_0000_0000_0095];
    let license = c"GPL";
    // struct { __u32 prog_type; __u32 insn_cnt; __aligned_u64 insns; __aligned_u64 license;
    //          __u32 log_level; __u32 log_size; __aligned_u64 log_buf; __u32 kern_version;
    //          __u32 prog_flags; char prog_name[16]; __u32 prog_ifindex;
    //          __u32 expected_attach_type; }
    let mut attr = [0u64; 9];
    attr[0] = u64::from(prog_type) | ((insns.len() as u64) << 32);
    attr[1] = insns.as_ptr() as u64;
    attr[2] = license.as_ptr() as u64;
    let name = *b"egret_probe\0\0\0\0\0";
    attr[6] = u64::from_ne_bytes([
        name[0], name[1], name[2], name[3], name[4], name[5], name[6], name[7],
    ]);
    attr[7] = u64::from_ne_bytes([
        name[8], name[9], name[10], name[11], name[12], name[13], name[14], name[15],
    ]);
    attr[8] = u64::from(expected_attach_type) << 32;
    let fd = bpf(bpf_cmd::PROG_LOAD, &mut attr, "BPF_PROG_LOAD", &|| {
        format!("a probe program of type {prog_type}")
    })?;
    // SAFETY: the kernel returned a new file descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Detaches a link from its attach point while it stays pinned (`BPF_LINK_DETACH`, what
/// `bpftool link detach` does). Tests use it to stand in for an attacker with root.
pub fn bpf_link_detach(fd: impl AsFd) -> Result<(), SysError> {
    let fd = fd.as_fd();
    let mut attr = [0u64; 1];
    attr[0] = u64::from(fd.as_raw_fd() as u32);
    bpf(bpf_cmd::LINK_DETACH, &mut attr, "BPF_LINK_DETACH", &|| {
        format!("link fd {}", fd.as_raw_fd())
    })?;
    Ok(())
}

fn on_bpffs(path: &Path) -> bool {
    // The pin directory may not exist yet: its nearest existing ancestor decides.
    let existing = path.ancestors().find(|p| p.exists());
    existing.is_some_and(|p| fs_magic(p).is_ok_and(|m| m == BPF_FS_MAGIC))
}

/// The filesystem magic number of `path` (`statfs(2)`'s `f_type`).
pub fn fs_magic(path: &Path) -> io::Result<i64> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `statfs` is plain data, fully written on success.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid NUL-terminated path and out pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut buf) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // `f_type` is i64 on glibc and u64 on musl (the image's static build); every filesystem
    // magic number fits both.
    let magic: i128 = buf.f_type.into();
    Ok(i64::try_from(magic).unwrap_or(-1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_dirs_only_root_can_change_pass() {
        // egret's own directories, and a default bpffs root above them.
        assert_eq!(judge_dir(Kind::Dir, 0, 0, 0o40700, false), None);
        assert_eq!(judge_dir(Kind::Dir, 0, 0, 0o40755, false), None);
        assert_eq!(judge_dir(Kind::Dir, 0, 0, 0o41777, true), None);
        // Another user's directory, whatever its mode.
        assert_eq!(
            judge_dir(Kind::Dir, 65534, 65534, 0o40700, false).as_deref(),
            Some("owner uid 65534 gid 65534, mode 700")
        );
        // Writable by group or others: someone else could remove or plant pins.
        assert!(judge_dir(Kind::Dir, 0, 0, 0o40777, false).is_some());
        assert!(judge_dir(Kind::Dir, 0, 0, 0o40770, false).is_some());
        // Sticky helps an ancestor (others cannot rename what root made), not the pin dir.
        assert!(judge_dir(Kind::Dir, 0, 0, 0o41777, false).is_some());
        assert!(judge_dir(Kind::Dir, 0, 0, 0o40777, true).is_some());
        // Never through a symlink, nor into a file.
        assert_eq!(
            judge_dir(Kind::Symlink, 0, 0, 0o120777, false).as_deref(),
            Some("a symlink")
        );
        assert!(judge_dir(Kind::Other, 0, 0, 0o100600, true).is_some());
    }

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
