//! CPU pressure for races: a CPU cgroup with a small quota, holding the processes under test
//! beside a busy-looping hog, so that they are throttled and preempted at arbitrary points
//! (inside a BPF program too, on a preemptible kernel).
//!
//! The `cpu` controller is the cgroup2 one where the hierarchy offers it, else the v1 `cpu`
//! hierarchy of a hybrid host (this machine's layout); both are found in mountinfo. The group
//! and the hog go on drop.

use std::{
    fs, io,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

/// A throttled CPU group with a hog in it.
pub struct CpuPressure {
    dir: PathBuf,
    hog: Child,
}

impl CpuPressure {
    /// A group named `name` allowed `quota_us` of CPU time per `period_us`, with a hog in it.
    pub fn new(name: &str, quota_us: u64, period_us: u64) -> io::Result<Self> {
        let (dir, v2) = make_group(name)?;
        if v2 {
            fs::write(dir.join("cpu.max"), format!("{quota_us} {period_us}"))?;
        } else {
            fs::write(dir.join("cpu.cfs_period_us"), period_us.to_string())?;
            fs::write(dir.join("cpu.cfs_quota_us"), quota_us.to_string())?;
        }
        let hog = Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .stdout(Stdio::null())
            .spawn()?;
        let pressure = Self { dir, hog };
        pressure.add(pressure.hog.id())?;
        Ok(pressure)
    }

    /// Moves process `pid` into the group.
    pub fn add(&self, pid: u32) -> io::Result<()> {
        fs::write(self.dir.join("cgroup.procs"), pid.to_string())
    }
}

impl Drop for CpuPressure {
    fn drop(&mut self) {
        let _ = self.hog.kill();
        let _ = self.hog.wait();
        // Processes still in it (already exited ones are gone) move back to the root group.
        if let Ok(procs) = fs::read_to_string(self.dir.join("cgroup.procs")) {
            let root = self.dir.parent().map(|p| p.join("cgroup.procs"));
            for pid in procs.lines() {
                if let Some(root) = &root {
                    let _ = fs::write(root, pid);
                }
            }
        }
        let _ = fs::remove_dir(&self.dir);
    }
}

/// Creates the group: under the cgroup2 root when it offers `cpu`, else under the v1 `cpu`
/// hierarchy. Returns its directory and whether it is cgroup2.
fn make_group(name: &str) -> io::Result<(PathBuf, bool)> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    let mut v1 = None;
    let mut v2 = None;
    for line in mountinfo.lines() {
        let Some((fields, rest)) = line.split_once(" - ") else {
            continue;
        };
        let mut rest = rest.split_whitespace();
        let fstype = rest.next().unwrap_or_default();
        let options = rest.nth(1).unwrap_or_default();
        let Some(mount_point) = fields.split_whitespace().nth(4) else {
            continue;
        };
        if fstype == "cgroup2" && v2.is_none() {
            v2 = Some(PathBuf::from(mount_point));
        }
        if fstype == "cgroup" && options.split(',').any(|o| o == "cpu") && v1.is_none() {
            v1 = Some(PathBuf::from(mount_point));
        }
    }
    if let Some(root) = v2
        && has_cpu(&root)
    {
        let _ = fs::write(root.join("cgroup.subtree_control"), "+cpu");
        let dir = root.join(name);
        fs::create_dir_all(&dir)?;
        if dir.join("cpu.max").exists() {
            return Ok((dir, true));
        }
        let _ = fs::remove_dir(&dir);
    }
    let root = v1.ok_or_else(|| {
        io::Error::other("no cpu controller: neither cgroup2 nor a v1 hierarchy offers `cpu`")
    })?;
    let dir = root.join(name);
    fs::create_dir_all(&dir)?;
    Ok((dir, false))
}

fn has_cpu(root: &Path) -> bool {
    fs::read_to_string(root.join("cgroup.controllers"))
        .is_ok_and(|c| c.split_whitespace().any(|c| c == "cpu"))
}
