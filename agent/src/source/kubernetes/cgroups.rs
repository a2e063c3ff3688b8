//! Where the kubelet puts each pod's cgroup on cgroup v2, for both of its cgroup drivers:
//!
//! ```text
//! systemd:  kubepods.slice/kubepods-pod<uid>.slice                                (Guaranteed)
//!           kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice
//!           kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice
//! cgroupfs: kubepods/pod<uid>, kubepods/burstable/pod<uid>, kubepods/besteffort/pod<uid>
//! ```
//!
//! The systemd driver writes the uid's dashes as underscores (a dash separates slice levels).
//! Container runtimes nest their scopes below the pod's cgroup (`cri-containerd-<id>.scope`,
//! `crio-<id>.scope`, or plain container ids); egret enforces on the pod's cgroup, so they need no
//! entry of their own. Pure directory reads, no kubelet API: a fake tree tests it.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

/// The kubelet's cgroup driver, as recognised from the tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Driver {
    Systemd,
    Cgroupfs,
}

/// The kubelet's part of the hierarchy on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kubepods {
    pub driver: Driver,
    /// `kubepods.slice` or `kubepods`.
    pub root: PathBuf,
}

impl Kubepods {
    /// Finds the kubelet's root under the cgroup2 mount, `None` while the kubelet has made none.
    pub fn find(cgroup2: &Path) -> Option<Self> {
        let systemd = cgroup2.join("kubepods.slice");
        if is_dir(&systemd) {
            return Some(Self {
                driver: Driver::Systemd,
                root: systemd,
            });
        }
        let cgroupfs = cgroup2.join("kubepods");
        is_dir(&cgroupfs).then_some(Self {
            driver: Driver::Cgroupfs,
            root: cgroupfs,
        })
    }

    /// The directories pod cgroups are created in: the root (Guaranteed pods) and the
    /// Burstable and BestEffort QoS directories that exist.
    pub fn parents(&self) -> Vec<PathBuf> {
        let mut out = vec![self.root.clone()];
        for qos in ["burstable", "besteffort"] {
            let dir = match self.driver {
                Driver::Systemd => self.root.join(format!("kubepods-{qos}.slice")),
                Driver::Cgroupfs => self.root.join(qos),
            };
            if is_dir(&dir) {
                out.push(dir);
            }
        }
        out
    }

    /// Every pod cgroup there is now: pod uid (with dashes) -> its directory.
    pub fn pods(&self) -> BTreeMap<String, PathBuf> {
        let mut out = BTreeMap::new();
        for parent in self.parents() {
            let Ok(entries) = std::fs::read_dir(&parent) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if !is_dir(&path) {
                    continue;
                }
                if let Some(uid) = pod_uid(self.driver, &entry.file_name().to_string_lossy()) {
                    out.insert(uid, path);
                }
            }
        }
        out
    }

    /// The directories that are the kubelet's own (the root and the QoS directories): below a
    /// guard, they are guards too, so a new pod cgroup in them is pending.
    pub fn is_qos_dir(&self, dir: &Path) -> bool {
        self.parents().iter().any(|p| p == dir)
    }
}

/// The pod uid a pod cgroup's directory name stands for; `None` for anything else (a QoS
/// directory, a container scope, a file).
pub fn pod_uid(driver: Driver, name: &str) -> Option<String> {
    let uid = match driver {
        Driver::Systemd => {
            let stem = name.strip_suffix(".slice")?;
            let (_, uid) = stem.rsplit_once("-pod")?;
            // `kubepods-pod<uid>` or `kubepods-<qos>-pod<uid>`.
            let prefix = &stem[..stem.len() - uid.len() - "-pod".len()];
            if !matches!(
                prefix,
                "kubepods" | "kubepods-burstable" | "kubepods-besteffort"
            ) {
                return None;
            }
            uid.replace('_', "-")
        }
        Driver::Cgroupfs => name.strip_prefix("pod")?.to_owned(),
    };
    is_uid(&uid).then_some(uid)
}

/// An RFC 4122 textual UUID, as the API server assigns pod uids.
fn is_uid(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, len)| g.len() == len && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn is_dir(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir())
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "6f0c7c9e-2d3b-4b53-9a52-2c1d9b3e8a01";
    const B: &str = "0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9";
    const C: &str = "11111111-2222-3333-4444-555555555555";

    fn tree(name: &str, dirs: &[String]) -> PathBuf {
        let root =
            std::env::temp_dir().join(format!("egret-kubepods-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for d in dirs {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        root
    }

    #[test]
    fn systemd_driver_all_three_qos_classes_with_containerd_and_crio_scopes() {
        let u = |uid: &str| uid.replace('-', "_");
        let root = tree(
            "systemd",
            &[
                // Guaranteed: directly in kubepods.slice; containerd scopes below.
                format!(
                    "kubepods.slice/kubepods-pod{}.slice/cri-containerd-abc.scope",
                    u(A)
                ),
                format!(
                    "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/crio-def.scope",
                    u(B)
                ),
                format!(
                    "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
                    u(C)
                ),
                // Not pods.
                "kubepods.slice/kubepods-burstable.slice/other.slice".into(),
                "kubepods.slice/kubepods-podnot-a-uid.slice".into(),
                "system.slice/kubepods-pod0.slice".into(),
            ],
        );
        let kubepods = Kubepods::find(&root).unwrap();
        assert_eq!(kubepods.driver, Driver::Systemd);
        let pods = kubepods.pods();
        let mut want = vec![A, B, C];
        want.sort_unstable();
        assert_eq!(pods.keys().map(String::as_str).collect::<Vec<_>>(), want);
        assert!(pods[A].ends_with(format!("kubepods-pod{}.slice", u(A))));
        assert!(pods[B].ends_with(format!("kubepods-burstable-pod{}.slice", u(B))));
        assert!(pods[C].ends_with(format!("kubepods-besteffort-pod{}.slice", u(C))));
        assert_eq!(kubepods.parents().len(), 3);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn cgroupfs_driver_all_three_qos_classes() {
        let root = tree(
            "cgroupfs",
            &[
                format!("kubepods/pod{A}/0123456789abcdef"),
                format!("kubepods/burstable/pod{B}"),
                format!("kubepods/besteffort/pod{C}/crio-1.scope"),
                "kubepods/besteffort/notapod".into(),
            ],
        );
        let kubepods = Kubepods::find(&root).unwrap();
        assert_eq!(kubepods.driver, Driver::Cgroupfs);
        let pods = kubepods.pods();
        assert_eq!(pods.len(), 3);
        assert!(pods[A].ends_with(format!("kubepods/pod{A}")));
        assert!(pods[B].ends_with(format!("kubepods/burstable/pod{B}")));
        assert!(pods[C].ends_with(format!("kubepods/besteffort/pod{C}")));
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn no_kubelet_no_kubepods() {
        let root = tree("none", &["system.slice".into()]);
        assert_eq!(Kubepods::find(&root), None);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn names_that_only_look_like_pods_are_not() {
        assert_eq!(pod_uid(Driver::Systemd, "kubepods-pod1234.slice"), None);
        assert_eq!(pod_uid(Driver::Systemd, &format!("foo-pod{A}.slice")), None);
        assert_eq!(pod_uid(Driver::Cgroupfs, &format!("pod{A}x")), None);
        assert_eq!(
            pod_uid(
                Driver::Systemd,
                &format!("kubepods-besteffort-pod{}.slice", A.replace('-', "_"))
            )
            .as_deref(),
            Some(A)
        );
    }
}
