//! Unsupported kernels and setups: `egret attach`, `egret run` and `egret agent` stop with one
//! line naming what is missing, before anything enforced is touched: the pins of an enforcing
//! egret stay as they were (and keep enforcing), no pin directory is created, none of egret's
//! programs is loaded. Each setup is made for real around the `egret` binary: a private mount
//! namespace where cgroup2 is unmounted or bpffs hidden, capabilities dropped (`setpriv`), or a
//! seccomp filter that answers `BPF_LINK_CREATE` as a kernel older than 5.7 does. And one setup
//! that is no fault: without the kernel's BTF egret enforces as usual. Needs root.
#![expect(
    clippy::expect_used,
    reason = "a test fails by panicking with what it expected"
)]

use std::{
    collections::BTreeMap,
    ffi::{CString, OsStr, OsString},
    fs::File,
    io,
    os::{
        fd::AsRawFd as _,
        unix::{fs::MetadataExt as _, process::CommandExt as _},
    },
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use egret_common::program_names;
use egret_tests::{
    agent::EgretRun,
    probe::{Outcome, egret_binary},
    sandbox::{Pod, Sandbox},
};

/// What a case changes in egret's mount namespace before it starts.
#[derive(Clone, Debug)]
enum Mount {
    /// An empty tmpfs over the directory: what was there is not to be seen.
    Hide(PathBuf),
    /// The mount at the path is gone (lazily, `MNT_DETACH`).
    Unmount(PathBuf),
}

/// How a case runs egret.
#[derive(Clone, Debug, Default)]
struct Setup {
    /// In a private mount namespace, after these changes.
    mounts: Vec<Mount>,
    /// Only these capabilities in the bounding set (as the DaemonSet's container); `None`: all.
    capabilities: Option<&'static [&'static str]>,
    /// `bpf(BPF_LINK_CREATE)` fails with `EINVAL`, as on a kernel older than 5.7.
    no_link_create: bool,
}

/// A command ready to run egret with `args` in `setup`.
fn egret(setup: &Setup, args: &[&OsStr]) -> Command {
    let mut command = match setup.capabilities {
        None => Command::new(egret_binary()),
        Some(caps) => {
            let bounding = std::iter::once("-all".to_owned())
                .chain(caps.iter().map(|c| format!("+{c}")))
                .collect::<Vec<_>>()
                .join(",");
            let mut command = Command::new("setpriv");
            command
                .args(["--reuid", "0", "--inh-caps=-all"])
                .arg(format!("--bounding-set={bounding}"))
                .arg(egret_binary());
            command
        }
    };
    command.args(args).env("EGRET_LOG", "info");
    // Everything the child needs is made here: after fork only syscalls run.
    let mounts: Vec<(bool, CString)> = setup
        .mounts
        .iter()
        .map(|m| match m {
            Mount::Hide(path) => (true, c_path(path)),
            Mount::Unmount(path) => (false, c_path(path)),
        })
        .collect();
    let filter = setup.no_link_create.then(link_create_filter);
    // SAFETY: the closure makes only async-signal-safe syscalls on data prepared beforehand.
    unsafe {
        command.pre_exec(move || {
            let check = |rc: libc::c_int| {
                if rc == 0 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                }
            };
            if !mounts.is_empty() {
                check(libc::unshare(libc::CLONE_NEWNS))?;
                // Nothing done in here reaches the host's mount namespace.
                check(libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ))?;
            }
            for (hide, path) in &mounts {
                if *hide {
                    check(libc::mount(
                        c"none".as_ptr(),
                        path.as_ptr(),
                        c"tmpfs".as_ptr(),
                        0,
                        c"mode=0755".as_ptr().cast(),
                    ))?;
                } else {
                    check(libc::umount2(path.as_ptr(), libc::MNT_DETACH))?;
                }
            }
            if let Some(filter) = &filter {
                let program = libc::sock_fprog {
                    len: filter.len() as u16,
                    filter: filter.as_ptr().cast_mut(),
                };
                check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
                let rc = libc::syscall(
                    libc::SYS_seccomp,
                    libc::SECCOMP_SET_MODE_FILTER,
                    0,
                    &raw const program,
                );
                check(rc as libc::c_int)?;
            }
            Ok(())
        });
    }
    command
}

fn c_path(path: &Path) -> CString {
    CString::new(path.as_os_str().as_encoded_bytes()).expect("path without NUL")
}

/// `AUDIT_ARCH_*` of this machine (include/uapi/linux/audit.h).
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xc000_003e;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xc000_00b7;

/// A seccomp filter that fails `bpf(BPF_LINK_CREATE, ...)` with `EINVAL`, what a kernel that
/// does not know the command (before 5.7) answers, and allows everything else.
fn link_create_filter() -> Vec<libc::sock_filter> {
    const LD_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JEQ: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const RET: u16 = 0x06; // BPF_RET | BPF_K
    const ALLOW: u32 = 0x7fff_0000; // SECCOMP_RET_ALLOW
    const ERRNO: u32 = 0x0005_0000; // SECCOMP_RET_ERRNO
    const BPF_LINK_CREATE: u32 = 28;
    let op = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    // struct seccomp_data { int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6]; }
    vec![
        op(LD_ABS, 0, 0, 4),
        op(JEQ, 1, 0, AUDIT_ARCH),
        op(RET, 0, 0, ALLOW),
        op(LD_ABS, 0, 0, 0),
        op(JEQ, 1, 0, libc::SYS_bpf as u32),
        op(RET, 0, 0, ALLOW),
        // The low half of the first argument (little-endian): the command.
        op(LD_ABS, 0, 0, 16),
        op(JEQ, 1, 0, BPF_LINK_CREATE),
        op(RET, 0, 0, ALLOW),
        op(RET, 0, 0, ERRNO | libc::EINVAL as u32),
    ]
}

/// Every cgroup2 mount point of this mount namespace.
fn cgroup2_mounts() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .filter_map(|line| {
            let (fields, rest) = line.split_once(" - ")?;
            let mount_point = fields.split_whitespace().nth(4)?;
            (rest.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .collect()
}

/// One pinned file: its inode and, for a link, the kernel's link id, program id and cgroup id.
#[derive(Debug, PartialEq, Eq)]
struct Pin {
    ino: u64,
    link: Option<(u32, u32, u64)>,
}

/// What a pin directory holds, by path. A pin replaced, removed or added changes it.
fn pins(pin_dir: &Path) -> BTreeMap<PathBuf, Pin> {
    let mut out = BTreeMap::new();
    for sub in ["", "maps", "links"] {
        let dir = pin_dir.join(sub);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let ino = entry.metadata().map(|m| m.ino()).unwrap_or(0);
            let link = (sub == "links")
                .then(|| egret::sys::bpf_obj_get(&path).ok())
                .flatten()
                .and_then(|fd| egret::sys::bpf_link_info(&fd).ok())
                .map(|f| (f.id, f.prog_id, f.cgroup_id));
            out.insert(path, Pin { ino, link });
        }
    }
    out
}

/// Ids of the loaded programs named as egret's.
fn egret_programs() -> Vec<u32> {
    let mut ids: Vec<u32> = aya::programs::loaded_programs()
        .flatten()
        .filter(|p| {
            // The kernel keeps 15 bytes of a name.
            p.name_as_str().is_some_and(|name| {
                !name.is_empty()
                    && program_names::ALL
                        .iter()
                        .chain(program_names::TC.iter())
                        .any(|n| n.starts_with(name))
            })
        })
        .map(|p| p.id())
        .collect();
    ids.sort_unstable();
    ids
}

/// Asserts egret stopped with exactly one line on stderr, naming the missing thing.
fn assert_one_line(case: &str, output: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        output.status.code(),
        Some(1),
        "{case}: exit status {:?}; stderr:\n{stderr}",
        output.status
    );
    assert_eq!(lines.len(), 1, "{case}: one line, not:\n{stderr}");
    assert!(
        lines[0].starts_with("egret: ") && lines[0].contains(needle),
        "{case}: the line names {needle:?}:\n{stderr}"
    );
}

fn connect_outcome(sandbox: &Sandbox, pod: &Pod) -> Outcome {
    sandbox
        .probe(
            pod,
            None,
            &["connect", "192.0.2.10:80", "--timeout-ms", "500"],
        )
        .expect("probe")
        .first()
        .map(|a| a.outcome)
        .expect("one attempt")
}

/// A config that isolates `pod` (workload `shop/web`): nothing it sends is allowed.
fn write_deny_config(dir: &Path, pod: &Pod, extra: &str) {
    std::fs::create_dir_all(dir.join("policies")).expect("dir");
    std::fs::write(
        dir.join("egret.yaml"),
        format!(
            "policies: [policies]\nworkloads:\n- {{name: web, namespace: shop, labels: {{app: web}}, cgroup: {}{extra}}}\n",
            pod.cgroup.display()
        ),
    )
    .expect("config");
    std::fs::write(
        dir.join("policies/deny.yaml"),
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-all, namespace: shop}\n\
         spec: {podSelector: {}, policyTypes: [Egress]}\n",
    )
    .expect("policy");
}

/// The tests of this file load egret's programs or count them: one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn unsupported_setups_stop_egret_with_one_line_before_it_touches_anything() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut sandbox = Sandbox::new().unwrap_or_else(|e| panic!("sandbox: {e}"));
    let web = sandbox.add_pod("web").expect("pod");
    let _host = sandbox
        .add_host("ext", &["192.0.2.10".parse().expect("addr")])
        .expect("host");
    let dir = std::env::temp_dir().join(format!("{}-preflight", sandbox.id()));
    write_deny_config(&dir, &web, "");
    // An egret that enforced and exited: its pins keep enforcing.
    let first = EgretRun::start(&dir, sandbox.pin_dir(), sandbox.cgroup(), "0").expect("egret run");
    first.wait_log("policy enforced", 1, Duration::from_secs(20));
    drop(first);
    assert_eq!(connect_outcome(&sandbox, &web), Outcome::Denied);
    let pins_before = pins(sandbox.pin_dir());
    assert!(pins_before.len() > 10, "{pins_before:?}");
    let programs_before = egret_programs();

    let fresh = PathBuf::from(format!("{}-fresh", sandbox.pin_dir().display()));
    let plain_dir = dir.join("not-a-cgroup");
    std::fs::create_dir_all(&plain_dir).expect("plain dir");
    let not_bpffs = dir.join("pins");
    let procs = web.cgroup.join("cgroup.procs");
    let cgroup2: Vec<Mount> = cgroup2_mounts().into_iter().map(Mount::Unmount).collect();
    assert!(!cgroup2.is_empty(), "this host has cgroup2 mounted");
    let bpffs = Path::new("/sys/fs/bpf");

    // (case, setup, --pin-dirs, --cgroup, what the line names)
    let cases: Vec<(&str, Setup, Vec<&Path>, &Path, String)> = vec![
        (
            "cgroup2 not mounted",
            Setup {
                mounts: cgroup2,
                ..Setup::default()
            },
            vec![sandbox.pin_dir(), &fresh],
            sandbox.cgroup(),
            "no cgroup2 filesystem is mounted".into(),
        ),
        (
            "--cgroup on a plain directory",
            Setup::default(),
            vec![sandbox.pin_dir(), &fresh],
            &plain_dir,
            format!(
                "--cgroup {} is not a cgroup2 directory (found ",
                plain_dir.display()
            ),
        ),
        (
            "--cgroup at a cgroup's file",
            Setup::default(),
            vec![sandbox.pin_dir(), &fresh],
            &procs,
            "is not a cgroup2 directory (found a file, not a directory)".into(),
        ),
        (
            "bpffs missing and not mountable (no CAP_SYS_ADMIN)",
            Setup {
                mounts: vec![Mount::Hide(bpffs.into())],
                capabilities: Some(&["bpf", "perfmon", "net_admin"]),
                ..Setup::default()
            },
            vec![sandbox.pin_dir(), &fresh],
            sandbox.cgroup(),
            "no bpffs for the pin directory".into(),
        ),
        (
            "--pin-dir on no bpffs",
            Setup::default(),
            vec![&not_bpffs],
            sandbox.cgroup(),
            format!("no bpffs for the pin directory {}", not_bpffs.display()),
        ),
        (
            "a kernel without BPF_LINK_CREATE (before 5.7)",
            Setup {
                no_link_create: true,
                ..Setup::default()
            },
            vec![sandbox.pin_dir(), &fresh],
            sandbox.cgroup(),
            "this kernel cannot attach cgroup programs through bpf links (BPF_LINK_CREATE, Linux 5.7)".into(),
        ),
    ];
    let config = dir.join("egret.yaml");
    for (case, setup, pin_dirs, cgroup, needle) in &cases {
        for pin_dir in pin_dirs {
            let commands: [(&str, Vec<&OsStr>); 3] = [
                ("attach", vec!["attach".as_ref()]),
                (
                    "run",
                    vec![
                        "run".as_ref(),
                        "--report-interval".as_ref(),
                        "0".as_ref(),
                        "--config".as_ref(),
                        config.as_os_str(),
                    ],
                ),
                (
                    // No API server: the line must come before the kubeconfig is read.
                    "agent",
                    vec![
                        "agent".as_ref(),
                        "--node-name".as_ref(),
                        "node-1".as_ref(),
                        "--kubeconfig".as_ref(),
                        "/nonexistent/kubeconfig".as_ref(),
                    ],
                ),
            ];
            for (name, args) in commands {
                let mut all: Vec<&OsStr> = vec!["--pin-dir".as_ref(), pin_dir.as_os_str()];
                all.extend(args);
                all.extend(["--cgroup".as_ref(), cgroup.as_os_str()]);
                let output = egret(setup, &all)
                    .stdin(Stdio::null())
                    .output()
                    .expect("egret");
                let case = format!("egret {name}, {case}, --pin-dir {}", pin_dir.display());
                assert_one_line(&case, &output, needle);
                assert!(!fresh.exists(), "{case}: created {}", fresh.display());
                assert!(
                    !not_bpffs.exists(),
                    "{case}: created {}",
                    not_bpffs.display()
                );
                assert_eq!(pins(sandbox.pin_dir()), pins_before, "{case}: pins changed");
            }
        }
    }
    assert_eq!(
        egret_programs(),
        programs_before,
        "egret's programs were loaded"
    );
    assert_eq!(
        connect_outcome(&sandbox, &web),
        Outcome::Denied,
        "the pinned enforcement went on"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn without_the_kernels_btf_egret_enforces_as_usual() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut sandbox = Sandbox::new().unwrap_or_else(|e| panic!("sandbox: {e}"));
    let web = sandbox.add_pod("web").expect("pod");
    let _host = sandbox
        .add_host("ext", &["192.0.2.10".parse().expect("addr")])
        .expect("host");
    // The pod's node-side veth (`p10`) lives in the node namespace: egret runs there.
    let node = File::open(Path::new("/run/netns").join(format!("{}-node", sandbox.id())))
        .expect("node netns");
    // SAFETY: setns on this test's thread only; egret inherits it.
    let rc = unsafe { libc::setns(node.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", io::Error::last_os_error());
    let dir = std::env::temp_dir().join(format!("{}-no-btf", sandbox.id()));
    write_deny_config(
        &dir,
        &web,
        &format!(", ips: [{}], interfaces: [p10]", web.ipv4),
    );
    let setup = Setup {
        mounts: vec![Mount::Hide("/sys/kernel/btf".into())],
        ..Setup::default()
    };
    let stderr = dir.join("stderr.log");
    let args: Vec<OsString> = vec![
        "--pin-dir".into(),
        sandbox.pin_dir().into(),
        "run".into(),
        "--report-interval".into(),
        "0".into(),
        "--cgroup".into(),
        sandbox.cgroup().into(),
        "--config".into(),
        dir.join("egret.yaml").into(),
    ];
    let args: Vec<&OsStr> = args.iter().map(OsString::as_os_str).collect();
    let mut child = egret(&setup, &args)
        .stdout(Stdio::null())
        .stderr(File::create(&stderr).expect("log"))
        .spawn()
        .expect("egret run");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = std::fs::read_to_string(&stderr).unwrap_or_default();
        if log.contains("policy enforced") && log.contains("TC programs attached") {
            break;
        }
        let exited = child.try_wait().expect("wait");
        if exited.is_some() || Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("egret without BTF never enforced with its TC programs ({exited:?}):\n{log}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    sandbox.adopt_child(child);
    assert_eq!(connect_outcome(&sandbox, &web), Outcome::Denied);
    let _ = std::fs::remove_dir_all(&dir);
}
