//! What the host must offer before egret touches anything it enforces with: checked in one
//! place, before [`crate::datapath::Datapath::open`], so that an unsupported kernel or setup
//! costs one line naming what is missing and what to do, and nothing else: no pin directory
//! created, no pin changed, none of egret's programs loaded or attached.
//!
//! The kernel features are probed, not read off a version number (distributions backport):
//! a program that returns 1 is loaded, never attached, and a link to a target that cannot exist
//! is asked for; the error tells whether the kernel knows that kind of link. libbpf probes perf
//! links the same way (`probe_perf_link` in tools/lib/bpf/features.c).

use std::{
    fs::File,
    io,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use crate::sys::{self, SysError};

/// What the command about to run needs from the host.
#[derive(Clone, Debug)]
pub struct Needs<'a> {
    /// Where the programs and maps are pinned.
    pub pin_dir: &'a Path,
    /// Where bpffs is mounted when the pin directory lies on none.
    pub bpffs_mount: &'a Path,
    /// Directories given as cgroups, with the flag that named them (`--cgroup`,
    /// `--cgroup-root`); the cgroup2 mount stands in for the ones not given.
    pub cgroups: Vec<(&'static str, &'a Path)>,
    /// TC programs on interfaces: the agent (pods' veths) and local workloads with
    /// `interfaces:`.
    pub tcx: bool,
}

/// A kernel feature egret probes for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Feature {
    /// `BPF_LINK_CREATE` for cgroup programs: every socket hook is attached so.
    CgroupLinks,
    /// TCX links (`BPF_TCX_INGRESS`/`EGRESS`): the TC programs on workload interfaces.
    Tcx,
}

impl std::fmt::Display for Feature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::CgroupLinks => {
                "attach cgroup programs through bpf links (BPF_LINK_CREATE, Linux 5.7), which egret's socket hooks need"
            }
            Self::Tcx => {
                "attach TC programs through TCX links (Linux 6.6), which the TC programs on workload interfaces need (the agent's on every pod; in local mode, workloads with `interfaces:`)"
            }
        })
    }
}

/// What is missing; each names the path, flag or feature, and what to do.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error(
        "no cgroup2 filesystem is mounted (none in /proc/self/mountinfo): mount one (`mount -t cgroup2 none /sys/fs/cgroup/unified`, or boot with systemd.unified_cgroup_hierarchy=1)"
    )]
    NoCgroup2,
    #[error(
        "{flag} {path} is not a cgroup2 directory (found {found}): pass a directory under the cgroup2 mount {mount}"
    )]
    NotCgroup2 {
        flag: &'static str,
        path: PathBuf,
        found: String,
        mount: PathBuf,
    },
    #[error(
        "no bpffs for the pin directory {pin_dir}: mount one at {mount} on the host (`mount -t bpf bpf {mount}`; systemd does at boot), or pass --pin-dir under a mounted bpffs"
    )]
    NoBpffs {
        pin_dir: PathBuf,
        mount: PathBuf,
        #[source]
        source: SysError,
    },
    #[error("this kernel cannot {feature}: run egret on a newer kernel")]
    Unsupported {
        feature: Feature,
        #[source]
        source: SysError,
    },
    #[error(
        "the kernel refused to load a BPF program: egret needs root, or CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (docs/operations.md)"
    )]
    Refused {
        #[source]
        source: SysError,
    },
}

/// Checks what `needs` says, cheapest first: cgroup2, the cgroup directories, the kernel
/// features, and last bpffs (mounted at `needs.bpffs_mount` when missing: a mount point
/// with nothing of egret's in it yet).
///
/// The kernel's own BTF (`/sys/kernel/btf/vmlinux`) is not needed: egret's programs carry
/// their own BTF and have no CO-RE relocations to resolve against the kernel's (`preflight.rs`
/// in the tests runs egret with it hidden).
pub fn check(needs: &Needs<'_>) -> Result<(), PreflightError> {
    let Needs {
        pin_dir,
        bpffs_mount,
        cgroups,
        tcx,
    } = needs;
    let mount = sys::cgroup2_mount().map_err(|_| PreflightError::NoCgroup2)?;
    for (flag, path) in cgroups {
        if let Some(found) = not_cgroup2(path) {
            return Err(PreflightError::NotCgroup2 {
                flag,
                path: path.to_path_buf(),
                found,
                mount,
            });
        }
    }
    probe(Feature::CgroupLinks)?;
    if *tcx {
        probe(Feature::Tcx)?;
    }
    sys::ensure_bpffs(pin_dir, bpffs_mount).map_err(|source| PreflightError::NoBpffs {
        pin_dir: pin_dir.to_path_buf(),
        mount: bpffs_mount.to_path_buf(),
        source,
    })
}

/// What `path` is when it is not a cgroup2 directory; `None` when it is one.
fn not_cgroup2(path: &Path) -> Option<String> {
    match std::fs::metadata(path) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            return Some("no such directory".into());
        }
        Err(err) => return Some(format!("unreadable: {err}")),
        Ok(meta) if !meta.is_dir() => return Some("a file, not a directory".into()),
        Ok(_) => {}
    }
    match sys::fs_magic(path) {
        Ok(sys::CGROUP2_SUPER_MAGIC) => None,
        Ok(magic) => Some(filesystem_name(magic)),
        Err(err) => Some(format!("unreadable: {err}")),
    }
}

/// A filesystem's name from its magic number (include/uapi/linux/magic.h), for the message.
fn filesystem_name(magic: i64) -> String {
    match magic {
        0x0102_1994 => "a tmpfs directory".into(),
        0xef53 => "an ext2/3/4 directory".into(),
        0x0027_e0eb => "a cgroup v1 directory".into(),
        0x9123_683e => "a btrfs directory".into(),
        0x5846_5342 => "an xfs directory".into(),
        0x794c_7630 => "an overlayfs directory".into(),
        0x6265_6572 => "a sysfs directory".into(),
        0x9fa0 => "a procfs directory".into(),
        0xcafe_4a11 => "a bpffs directory".into(),
        other => format!("a directory on filesystem type {other:#x}"),
    }
}

/// `enum bpf_prog_type` and `enum bpf_attach_type` values of the probes
/// (include/uapi/linux/bpf.h).
const PROG_TYPE_SCHED_CLS: u32 = 3;
const PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const ATTACH_CGROUP_INET4_CONNECT: u32 = 10;
const ATTACH_TCX_INGRESS: u32 = 46;

/// Probes `feature`: loads a program that returns 1, then asks for a link to a target that
/// cannot be one (a directory that is no cgroup; interface index 0), which a kernel that knows
/// the link refuses for its target (`EBADF`, `ENODEV`) and an older one for its kind.
fn probe(feature: Feature) -> Result<(), PreflightError> {
    let (prog_type, attach_type) = match feature {
        Feature::CgroupLinks => (PROG_TYPE_CGROUP_SOCK_ADDR, ATTACH_CGROUP_INET4_CONNECT),
        Feature::Tcx => (PROG_TYPE_SCHED_CLS, ATTACH_TCX_INGRESS),
    };
    let prog = match sys::bpf_prog_load_probe(prog_type, attach_type) {
        Ok(prog) => prog,
        Err(source) => return failed(feature, Stage::Load, source).map_or(Ok(()), Err),
    };
    let linked = match feature {
        Feature::CgroupLinks => {
            // Any directory that is not a cgroup; `/` is always there.
            let not_a_cgroup = File::open("/").map_err(|source| PreflightError::Unsupported {
                feature,
                source: SysError::Read {
                    path: "/".into(),
                    source,
                },
            })?;
            sys::bpf_link_create_cgroup(prog.as_fd(), not_a_cgroup.as_fd(), attach_type)
        }
        Feature::Tcx => sys::bpf_link_create_tcx(prog.as_fd(), 0, attach_type),
    };
    match linked {
        // Cannot happen (there is no such target); the link would go with its descriptor.
        Ok(_link) => Ok(()),
        Err(source) => failed(feature, Stage::Link, source).map_or(Ok(()), Err),
    }
}

/// Which step of a probe failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Loading the probe program.
    Load,
    /// Asking for the link.
    Link,
}

/// What a probe step's failure says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Probed {
    /// The kernel knows the link: it refused the target only.
    Present,
    /// The kernel does not know the program type or the link.
    Missing,
    /// egret may not use `bpf()` for this (no capability, or a LSM said no).
    Refused,
}

/// Reads a failed step's errno.
fn classify(feature: Feature, stage: Stage, errno: Option<i32>) -> Probed {
    match (feature, stage, errno) {
        (_, _, Some(libc::EPERM | libc::EACCES)) => Probed::Refused,
        (Feature::CgroupLinks, Stage::Link, Some(libc::EBADF))
        | (Feature::Tcx, Stage::Link, Some(libc::ENODEV)) => Probed::Present,
        _ => Probed::Missing,
    }
}

/// The error for a failed step, `None` when it shows the feature is present.
fn failed(feature: Feature, stage: Stage, source: SysError) -> Option<PreflightError> {
    let errno = match &source {
        SysError::Bpf { source, .. } => source.raw_os_error(),
        _ => None,
    };
    match classify(feature, stage, errno) {
        Probed::Present => None,
        Probed::Missing => Some(PreflightError::Unsupported { feature, source }),
        Probed::Refused => Some(PreflightError::Refused { source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed `bpf()` call as `sys` reports it.
    fn bpf_error(command: &'static str, errno: i32) -> SysError {
        SysError::Bpf {
            command,
            object: "a probe".into(),
            source: io::Error::from_raw_os_error(errno),
        }
    }

    /// The line `main` prints: the error and its causes.
    fn line(err: PreflightError) -> String {
        format!("{:#}", anyhow::Error::from(err))
    }

    #[test]
    fn a_link_refused_for_its_target_only_means_the_kernel_has_it() {
        use Feature::{CgroupLinks, Tcx};
        use Stage::{Link, Load};
        assert_eq!(
            classify(CgroupLinks, Link, Some(libc::EBADF)),
            Probed::Present
        );
        assert_eq!(classify(Tcx, Link, Some(libc::ENODEV)), Probed::Present);
        // What kernels before 5.7 (no BPF_LINK_CREATE) and before 6.6 (no TCX) answer.
        assert_eq!(
            classify(CgroupLinks, Link, Some(libc::EINVAL)),
            Probed::Missing
        );
        assert_eq!(classify(Tcx, Link, Some(libc::EINVAL)), Probed::Missing);
        // A kernel without the program type, or without bpf() at all.
        assert_eq!(classify(Tcx, Load, Some(libc::EINVAL)), Probed::Missing);
        assert_eq!(
            classify(CgroupLinks, Load, Some(libc::ENOSYS)),
            Probed::Missing
        );
        // The other feature's "present" answer is no answer for this one.
        assert_eq!(classify(Tcx, Link, Some(libc::EBADF)), Probed::Missing);
        // Capabilities, or a security module, not the kernel's age.
        for stage in [Load, Link] {
            assert_eq!(
                classify(CgroupLinks, stage, Some(libc::EPERM)),
                Probed::Refused
            );
            assert_eq!(classify(Tcx, stage, Some(libc::EACCES)), Probed::Refused);
        }
    }

    #[test]
    fn a_missing_feature_is_one_line_naming_it_and_the_kernel_that_has_it() {
        let missing = |feature, errno| {
            failed(feature, Stage::Link, bpf_error("BPF_LINK_CREATE", errno)).map(line)
        };
        assert_eq!(
            missing(Feature::Tcx, libc::EINVAL).as_deref(),
            Some(
                "this kernel cannot attach TC programs through TCX links (Linux 6.6), which the TC programs on workload interfaces need (the agent's on every pod; in local mode, workloads with `interfaces:`): run egret on a newer kernel: bpf(BPF_LINK_CREATE) failed on a probe: Invalid argument (os error 22)"
            )
        );
        let cgroup = missing(Feature::CgroupLinks, libc::EINVAL).unwrap_or_default();
        assert!(
            cgroup.starts_with("this kernel cannot attach cgroup programs through bpf links (BPF_LINK_CREATE, Linux 5.7)"),
            "{cgroup}"
        );
        assert_eq!(missing(Feature::Tcx, libc::ENODEV).as_deref(), None);
        let refused = failed(
            Feature::CgroupLinks,
            Stage::Load,
            bpf_error("BPF_PROG_LOAD", libc::EPERM),
        )
        .map(line)
        .unwrap_or_default();
        assert!(
            refused.contains("CAP_BPF") && refused.contains("Operation not permitted"),
            "{refused}"
        );
        for text in [cgroup, refused] {
            assert!(!text.contains('\n'), "{text}");
        }
    }

    #[test]
    fn a_cgroup_flag_on_another_filesystem_names_what_it_found() {
        let dir = std::env::temp_dir().join(format!("egret-preflight-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("file");
        std::fs::write(&file, "").unwrap();
        let found = not_cgroup2(&dir).unwrap_or_default();
        assert!(found.ends_with("directory"), "{found}");
        assert_eq!(
            not_cgroup2(&file).as_deref(),
            Some("a file, not a directory")
        );
        assert_eq!(
            not_cgroup2(&dir.join("missing")).as_deref(),
            Some("no such directory")
        );
        assert_eq!(filesystem_name(0x0102_1994), "a tmpfs directory");
        assert_eq!(
            filesystem_name(0x1234),
            "a directory on filesystem type 0x1234"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
