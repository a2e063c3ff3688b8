//! End-to-end tests of the pin directory: who may own it, what a running egret does when its
//! pins are removed or its links detached, and what a starting egret refuses to adopt. They need
//! root, like every test here.
#![expect(
    clippy::expect_used,
    reason = "a test fails by panicking with what it expected"
)]

use std::{
    fs,
    os::unix::fs::{PermissionsExt as _, symlink},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use egret::{
    datapath::{Datapath, DatapathConfig, DatapathError, LoadMode, PinLayout},
    sys::{self, SysError},
};
use egret_common::{LAYOUT_VERSION, MetaValue, map_names, program_names};
use egret_tests::{
    agent::{EgretRun, http_get, sum},
    probe::Outcome,
    sandbox::{Pod, Sandbox},
};

fn open(pin_dir: &Path, cgroup: Option<&Path>) -> Result<Datapath, Box<DatapathError>> {
    Datapath::open(&DatapathConfig {
        pin_dir: pin_dir.into(),
        cgroup: cgroup.map(Path::to_path_buf),
    })
    .map_err(Box::new)
}

fn connect(sandbox: &Sandbox, pod: &Pod, target: &str) -> Outcome {
    sandbox
        .probe(pod, None, &["connect", target, "--timeout-ms", "500"])
        .expect("probe")
        .first()
        .map(|a| a.outcome)
        .expect("one attempt")
}

/// The files pinned under `links/`.
fn link_pins(pin_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(PinLayout::new(pin_dir).links())
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn all_programs() -> Vec<String> {
    let mut names: Vec<String> = program_names::ALL.iter().map(|s| s.to_string()).collect();
    names.sort();
    names
}

/// Detaches the link pinned for `program`, as `bpftool link detach` does: the pin stays, the
/// program no longer runs.
fn detach(pin_dir: &Path, program: &str) {
    let fd = sys::bpf_obj_get(&PinLayout::new(pin_dir).link(program)).expect("open pinned link");
    sys::bpf_link_detach(&fd).expect("BPF_LINK_DETACH");
    assert_eq!(sys::bpf_link_info(&fd).expect("link info").cgroup_id, 0);
}

fn assert_unsafe(err: Box<DatapathError>, path: &Path, found: &str) {
    let text = err.to_string();
    assert!(
        matches!(&*err, DatapathError::Sys(SysError::UnsafePinPath { path: p, .. }) if p == path),
        "wrong error: {err:?}"
    );
    assert!(text.contains(found), "{text}");
    assert!(
        text.contains("owned by root"),
        "says what is required: {text}"
    );
}

#[test]
fn pin_directories_others_could_change_are_refused_before_anything_is_attached() {
    let sandbox = Sandbox::new().unwrap_or_else(|e| panic!("sandbox: {e}"));
    let pin_dir = sandbox.pin_dir().to_path_buf();
    let nothing_attached = |pin_dir: &Path| {
        assert!(link_pins(pin_dir).is_empty(), "{:?}", link_pins(pin_dir));
        assert!(!PinLayout::new(pin_dir).map(map_names::ENDPOINTS).exists());
    };

    // Pre-created by an unprivileged user (nobody, 65534).
    fs::create_dir(&pin_dir).expect("mkdir");
    std::os::unix::fs::chown(&pin_dir, Some(65534), Some(65534)).expect("chown");
    let err = open(&pin_dir, Some(sandbox.cgroup()))
        .err()
        .expect("a pin dir owned by nobody must be refused");
    assert_unsafe(err, &pin_dir, "owner uid 65534");
    nothing_attached(&pin_dir);
    std::os::unix::fs::chown(&pin_dir, Some(0), Some(0)).expect("chown back");

    // `links/` created world-writable (by root, as an installer might).
    let links = PinLayout::new(&pin_dir).links();
    fs::create_dir(&links).expect("mkdir links");
    fs::set_permissions(&links, fs::Permissions::from_mode(0o777)).expect("chmod");
    let err = open(&pin_dir, Some(sandbox.cgroup()))
        .err()
        .expect("a world-writable links/ must be refused");
    assert_unsafe(err, &links, "mode 777");
    nothing_attached(&pin_dir);
    assert!(
        !PinLayout::new(&pin_dir).maps().exists(),
        "a refusal leaves nothing behind"
    );
    fs::remove_dir(&links).expect("rmdir links");
    fs::remove_dir(&pin_dir).expect("rmdir");

    // A symlink in place of the pin directory, to a directory root owns.
    let elsewhere = PathBuf::from(format!("{}-elsewhere", pin_dir.display()));
    fs::create_dir(&elsewhere).expect("mkdir target");
    symlink(&elsewhere, &pin_dir).expect("symlink");
    let err = open(&pin_dir, Some(sandbox.cgroup()))
        .err()
        .expect("a symlinked pin dir must be refused");
    assert_unsafe(err, &pin_dir, "a symlink");
    assert!(
        fs::read_dir(&elsewhere).expect("target").next().is_none(),
        "nothing created through the symlink"
    );
    fs::remove_file(&pin_dir).expect("rm symlink");
    fs::remove_dir(&elsewhere).expect("rmdir target");

    // A directory egret creates itself is root's, mode 0700, and accepted.
    let dp = open(&pin_dir, Some(sandbox.cgroup())).expect("fresh pin dir");
    for dir in [
        pin_dir.clone(),
        PinLayout::new(&pin_dir).maps(),
        PinLayout::new(&pin_dir).links(),
    ] {
        let mode = fs::symlink_metadata(&dir)
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700, "{}", dir.display());
    }
    assert_eq!(dp.attached_programs(), program_names::ALL.len());
}

#[test]
fn removed_link_pins_are_pinned_again_and_enforcement_never_stops() {
    let mut sandbox = Sandbox::new().unwrap_or_else(|e| panic!("sandbox: {e}"));
    let pod = sandbox.add_pod("web").expect("pod");
    let host = sandbox
        .add_host("ext", &["192.0.2.10".parse().expect("ip")])
        .expect("host");
    let _listener = sandbox
        .listen_tcp(&host, "192.0.2.10:80".parse().expect("addr"))
        .expect("listen");
    let agent = start_agent(&sandbox, &pod, "pins");
    agent.wait_log("policy enforced", 1, Duration::from_secs(20));
    assert_eq!(connect(&sandbox, &pod, "192.0.2.10:80"), Outcome::Denied);

    // Remove every link pin: today that detached egret (the pins were the only reference).
    for name in link_pins(sandbox.pin_dir()) {
        fs::remove_file(PinLayout::new(sandbox.pin_dir()).link(&name)).expect("rm pin");
    }
    assert!(link_pins(sandbox.pin_dir()).is_empty());
    for _ in 0..5 {
        assert_eq!(
            connect(&sandbox, &pod, "192.0.2.10:80"),
            Outcome::Denied,
            "the running agent holds its links: enforcement continues without the pins"
        );
    }
    // The agent checks its links every second and pins them again.
    let deadline = Instant::now() + Duration::from_secs(5);
    while link_pins(sandbox.pin_dir()) != all_programs() {
        assert!(
            Instant::now() < deadline,
            "pins never came back: {:?}\n{}",
            link_pins(sandbox.pin_dir()),
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(agent.log().contains("pinned again"), "{}", agent.log());
    drop(agent);
    // The pins are the agent's links: a restart adopts them.
    let dp = open(sandbox.pin_dir(), None).expect("adopt the re-pinned links");
    assert_eq!(dp.mode(), &LoadMode::Adopted);
    assert_eq!(connect(&sandbox, &pod, "192.0.2.10:80"), Outcome::Denied);
}

#[test]
fn a_detached_program_is_attached_again_within_seconds_counted_and_adopted_after() {
    let mut sandbox = Sandbox::new().unwrap_or_else(|e| panic!("sandbox: {e}"));
    let pod = sandbox.add_pod("web").expect("pod");
    let host = sandbox
        .add_host("ext", &["192.0.2.10".parse().expect("ip")])
        .expect("host");
    let _listener = sandbox
        .listen_tcp(&host, "192.0.2.10:80".parse().expect("addr"))
        .expect("listen");
    let agent = start_agent(&sandbox, &pod, "detach");
    agent.wait_log("policy enforced", 1, Duration::from_secs(20));
    let address = agent.metrics_address().expect("metrics address");
    let metric = |name: &str, needles: &[&str]| {
        sum(
            &http_get(&address, "/metrics").expect("metrics"),
            name,
            needles,
        )
    };
    let reattached = |program: &str| {
        metric(
            "egret_links_restored_total",
            &["what=\"reattached\"", &format!("program=\"{program}\"")],
        )
    };
    assert_eq!(
        metric("egret_programs_attached", &[]),
        program_names::ALL.len() as u64
    );
    assert_eq!(
        reattached(program_names::CONNECT4),
        0,
        "the series exists at 0"
    );
    assert_eq!(connect(&sandbox, &pod, "192.0.2.10:80"), Outcome::Denied);

    // Someone detaches connect4 (the link stays pinned, dead): enforcement by it stops at once,
    // and the agent notices within a second or two and attaches it again.
    detach(sandbox.pin_dir(), program_names::CONNECT4);
    let detached_at = Instant::now();
    while connect(&sandbox, &pod, "192.0.2.10:80") != Outcome::Denied {
        assert!(
            detached_at.elapsed() < Duration::from_secs(5),
            "connect4 not attached again within 5 s:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(agent.log().contains("attached again"), "{}", agent.log());
    let deadline = Instant::now() + Duration::from_secs(5);
    while reattached(program_names::CONNECT4) != 1 {
        assert!(Instant::now() < deadline, "the restoration is not counted");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        metric("egret_programs_attached", &[]),
        program_names::ALL.len() as u64
    );
    // No wrong verdict after it.
    for _ in 0..20 {
        assert_eq!(connect(&sandbox, &pod, "192.0.2.10:80"), Outcome::Denied);
    }
    drop(agent);

    // The fresh link is pinned in place of the dead one: a restart adopts every link.
    let agent = start_agent(&sandbox, &pod, "detach");
    let log = agent.wait_log("policy enforced", 1, Duration::from_secs(20));
    assert!(log.contains("adopting pinned datapath"), "{log}");
    assert_eq!(
        connect(&sandbox, &pod, "192.0.2.10:80"),
        Outcome::Denied,
        "denied after the restart"
    );
}

#[test]
fn a_planted_link_of_another_egret_is_not_adopted() {
    let sandbox = Sandbox::new().unwrap_or_else(|e| panic!("sandbox: {e}"));
    let elsewhere = sandbox
        .add_unmanaged_cgroup("elsewhere")
        .expect("other cgroup");
    let other_pins = PathBuf::from(format!("{}-other", sandbox.pin_dir().display()));
    let _cleanup = RemovePins(other_pins.clone());
    drop(open(sandbox.pin_dir(), Some(sandbox.cgroup())).expect("ours"));
    drop(open(&other_pins, Some(&elsewhere)).expect("another egret"));

    // Replace our connect4 pin with the other egret's link (same program, other maps and
    // cgroup).
    let ours = PinLayout::new(sandbox.pin_dir()).link(program_names::CONNECT4);
    fs::remove_file(&ours).expect("rm our pin");
    let theirs = sys::bpf_obj_get(&PinLayout::new(&other_pins).link(program_names::CONNECT4))
        .expect("their link");
    sys::bpf_obj_pin(std::os::fd::AsFd::as_fd(&theirs), &ours).expect("plant");

    for cgroup in [None, Some(sandbox.cgroup())] {
        let err = open(sandbox.pin_dir(), cgroup)
            .err()
            .expect("a foreign link must not be adopted");
        assert!(
            matches!(&*err, DatapathError::ForeignLink { name, path, .. } if *name == program_names::CONNECT4 && *path == ours),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("not this pin directory's"),
            "{err}"
        );
    }
}

#[test]
fn a_cgroup_other_than_the_adopted_attach_point_is_an_error_naming_both() {
    let mut sandbox = Sandbox::new().unwrap_or_else(|e| panic!("sandbox: {e}"));
    let pod = sandbox.add_pod("web").expect("pod");
    drop(open(sandbox.pin_dir(), Some(sandbox.cgroup())).expect("attach"));
    let err = open(sandbox.pin_dir(), Some(&pod.cgroup))
        .err()
        .expect("another cgroup must be refused");
    let attached_id = sys::cgroup_id(sandbox.cgroup()).expect("id");
    let requested_id = sys::cgroup_id(&pod.cgroup).expect("id");
    let text = err.to_string();
    assert!(
        matches!(&*err, DatapathError::CgroupMismatch { attached_id: a, requested_id: r, .. } if *a == attached_id && *r == requested_id),
        "{err:?}"
    );
    assert!(text.contains(&pod.cgroup.display().to_string()), "{text}");
    assert!(text.contains(&attached_id.to_string()), "{text}");
    // The cgroup it is attached to adopts.
    let dp = open(sandbox.pin_dir(), Some(sandbox.cgroup())).expect("adopt");
    assert_eq!(dp.mode(), &LoadMode::Adopted);
}

#[test]
fn maps_pinned_with_another_layout_version_are_refused_naming_both_while_enforcement_stays() {
    let mut sandbox = Sandbox::new().unwrap_or_else(|e| panic!("sandbox: {e}"));
    let pod = sandbox.add_pod("web").expect("pod");
    let host = sandbox
        .add_host("ext", &["192.0.2.10".parse().expect("ip")])
        .expect("host");
    let _listener = sandbox
        .listen_tcp(&host, "192.0.2.10:80".parse().expect("addr"))
        .expect("listen");
    let agent = start_agent(&sandbox, &pod, "layout");
    agent.wait_log("policy enforced", 1, Duration::from_secs(20));
    assert_eq!(connect(&sandbox, &pod, "192.0.2.10:80"), Outcome::Denied);
    drop(agent);

    // What a newer egret with another map layout would have pinned.
    let meta_path = PinLayout::new(sandbox.pin_dir()).map(map_names::META);
    let data = aya::maps::MapData::from_pin(&meta_path).expect("meta map");
    let mut meta: aya::maps::Array<_, MetaValue> =
        aya::maps::Array::try_from(aya::maps::Map::from_map_data(data).expect("map"))
            .expect("array");
    assert_eq!(
        meta.get(&0, 0).expect("stamp").layout_version,
        LAYOUT_VERSION
    );
    let future = LAYOUT_VERSION + 1;
    meta.set(
        0,
        MetaValue {
            layout_version: future,
            flags: 0,
        },
        0,
    )
    .expect("restamp");
    let err = open(sandbox.pin_dir(), Some(sandbox.cgroup()))
        .err()
        .expect("another layout must be refused");
    assert!(
        matches!(&*err, DatapathError::LayoutVersion { pinned, supported, .. } if *pinned == future && *supported == LAYOUT_VERSION),
        "{err:?}"
    );
    // The binary says so and exits, touching nothing: what was enforced stays enforced.
    let agent = start_agent(&sandbox, &pod, "layout");
    let log = agent.wait_log("layout", 1, Duration::from_secs(20));
    assert!(
        log.contains(&future.to_string()) && log.contains(&LAYOUT_VERSION.to_string()),
        "the error names both layouts: {log}"
    );
    assert_eq!(
        connect(&sandbox, &pod, "192.0.2.10:80"),
        Outcome::Denied,
        "the refused agent left the old enforcement in place"
    );
}

#[test]
fn maps_pinned_before_the_stamp_existed_are_refused_as_layout_1() {
    let sandbox = Sandbox::new().unwrap_or_else(|e| panic!("sandbox: {e}"));
    drop(open(sandbox.pin_dir(), Some(sandbox.cgroup())).expect("attach"));
    // What an egret from before the layout stamp left: every map but the stamp.
    fs::remove_file(PinLayout::new(sandbox.pin_dir()).map(map_names::META)).expect("rm stamp");
    let err = open(sandbox.pin_dir(), Some(sandbox.cgroup()))
        .err()
        .expect("unstamped maps must be refused");
    assert!(
        matches!(&*err, DatapathError::LayoutVersion { pinned: 1, supported, .. } if *supported == LAYOUT_VERSION),
        "{err:?}"
    );
}

#[test]
fn bpffs_mounted_by_egret_is_root_only() {
    let sandbox = Sandbox::new().unwrap_or_else(|e| panic!("sandbox: {e}"));
    let mount_point = std::env::temp_dir().join(format!("{}-bpffs", sandbox.id()));
    fs::create_dir_all(&mount_point).expect("mount point");
    let pin_dir = mount_point.join("egret");
    let mounted = sys::ensure_bpffs(&pin_dir, &mount_point);
    let mode = fs::symlink_metadata(&mount_point)
        .expect("stat")
        .permissions()
        .mode();
    let c = std::ffi::CString::new(mount_point.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: a NUL-terminated path; unmounts what this test mounted.
    let unmounted = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    let _ = fs::remove_dir(&mount_point);
    mounted.expect("mount bpffs");
    assert_eq!(unmounted, 0, "the test mounted a bpffs");
    // The kernel always adds the sticky bit to a bpffs root (`bpf_fill_super`).
    assert_eq!(
        mode & 0o777,
        0o700,
        "a new bpffs is 1777 unless egret says otherwise"
    );
}

/// Removes a second pin directory a test made beside the sandbox's.
struct RemovePins(PathBuf);

impl Drop for RemovePins {
    fn drop(&mut self) {
        let _ = egret::datapath::uninstall(&self.0);
    }
}

fn agent_dir(sandbox: &Sandbox, name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{}-{name}", sandbox.id()))
}

/// Starts `egret run` for `pod` with a policy that denies 192.0.2.10, serving metrics.
fn start_agent(sandbox: &Sandbox, pod: &Pod, name: &str) -> EgretRun {
    let dir = agent_dir(sandbox, name);
    let policies = dir.join("policies");
    fs::create_dir_all(&policies).expect("policy dir");
    fs::write(
        policies.join("deny.yaml"),
        "apiVersion: egret.dev/v1alpha1\nkind: EgressPolicy\nmetadata: {name: deny-ten}\n\
         spec:\n  priority: 0\n  subject: {podSelector: {}}\n  rules:\n  - name: ten\n    \
         action: Deny\n    to: [{networks: [192.0.2.10/32]}]\n",
    )
    .expect("write policy");
    fs::write(
        dir.join("egret.yaml"),
        format!(
            "baseline: allow\npolicies: [policies]\nworkloads:\n\
             - {{name: web, namespace: shop, labels: {{app: web}}, cgroup: {}}}\n\
             metrics: {{address: 127.0.0.1:0, maxDestinationSeries: 100}}\n",
            pod.cgroup.display()
        ),
    )
    .expect("write config");
    EgretRun::start(&dir, sandbox.pin_dir(), sandbox.cgroup(), "60").expect("spawn egret run")
}
