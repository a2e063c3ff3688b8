//! A throwaway "cluster" on one machine: test pods and simulated external hosts, each in its own
//! network namespace, wired by veth to a bridge in a "node" namespace that routes between them.
//!
//! ```text
//!   pod netns (198.51.100.x, 2001:db8:1::x)  ─veth─┐
//!                                                   ├─ br0 in the node netns (gateways .1 / ::1)
//!   host netns (192.0.2.x, 203.0.113.x, 2001:db8:2::x) ─veth─┘
//! ```
//! Every address is a TEST-NET one and lives in a namespace the sandbox created; no namespace
//! has a route off the machine (pods and hosts route only the TEST-NET prefixes, and the node
//! namespace holds nothing but the bridge). Each pod also gets a cgroup under the sandbox's own
//! parent cgroup, where egret's programs attach, never at the machine's root cgroup.
//!
//! Names carry the process id and a counter, so tests run in parallel; `Drop` removes
//! everything, also while unwinding from a panic, and [`Sandbox::new`] sweeps what killed runs
//! left behind.

use std::{
    fs,
    io::{self, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use crate::probe::{Attempt, parse_attempts, probe_binary};

/// Prefix of every name the sandbox gives (netns, cgroup, pin directory).
const PREFIX: &str = "egret-t";
/// Directory of named network namespaces (`ip netns`).
const NETNS_DIR: &str = "/run/netns";
/// Where bpffs is (or gets) mounted.
const BPFFS: &str = "/sys/fs/bpf";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Errors of the sandbox; each says which step failed.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(
        "the privileged tests need root (CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_BPF); run them as root, as CI does"
    )]
    NotRoot,
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("failed to run `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("{what} at {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no cgroup2 filesystem is mounted")]
    NoCgroup2,
    #[error("probe output is not JSON lines: {0}")]
    ProbeOutput(#[from] serde_json::Error),
    #[error(
        "address {0} is outside the sandbox's host subnets (192.0.2.0/24, 203.0.113.0/24, 2001:db8:2::/64)"
    )]
    HostAddress(IpAddr),
}

type Result<T, E = SandboxError> = std::result::Result<T, E>;

/// A test pod: a network namespace and a cgroup.
#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    pub netns: String,
    pub cgroup: PathBuf,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
}

/// A simulated external host: a network namespace holding some TEST-NET addresses.
#[derive(Clone, Debug)]
pub struct Host {
    pub name: String,
    pub netns: String,
    pub addrs: Vec<IpAddr>,
}

/// The sandbox; see the module docs.
pub struct Sandbox {
    id: String,
    node_netns: String,
    cgroup: PathBuf,
    pin_dir: PathBuf,
    netns: Vec<String>,
    cgroups: Mutex<Vec<PathBuf>>,
    children: Mutex<Vec<Child>>,
    pods: u32,
}

impl Sandbox {
    /// Creates the node namespace, the parent cgroup and a pin directory name.
    pub fn new() -> Result<Self> {
        // SAFETY: plain syscall.
        if unsafe { libc::geteuid() } != 0 {
            return Err(SandboxError::NotRoot);
        }
        sweep_stale();
        let pid = std::process::id();
        let id = format!("{PREFIX}{pid}-{}", COUNTER.fetch_add(1, Ordering::Relaxed));
        let cgroup = cgroup2_mount()?.join(&id);
        fs::create_dir_all(&cgroup).map_err(|source| SandboxError::Io {
            what: "failed to create the sandbox cgroup",
            path: cgroup.clone(),
            source,
        })?;
        let node_netns = format!("{id}-node");
        let mut sandbox = Self {
            pin_dir: Path::new(BPFFS).join(&id),
            node_netns: node_netns.clone(),
            cgroup,
            id,
            netns: Vec::new(),
            cgroups: Mutex::new(Vec::new()),
            children: Mutex::new(Vec::new()),
            pods: 0,
        };
        sandbox.add_netns(&node_netns)?;
        let n = node_netns.as_str();
        ip(&["-n", n, "link", "add", "br0", "type", "bridge"])?;
        // A bridge takes the lowest address of its ports unless given one: a pod wired later
        // (`wire_pod`) could change the gateway's MAC under the neighbours that cached it, and
        // their frames to the old address would be dropped as another host's.
        ip(&[
            "-n",
            n,
            "link",
            "set",
            "br0",
            "address",
            "02:00:00:00:00:01",
        ])?;
        ip(&["-n", n, "link", "set", "br0", "up"])?;
        ip(&["-n", n, "link", "set", "lo", "up"])?;
        for addr in ["198.51.100.1/24", "192.0.2.1/24", "203.0.113.1/24"] {
            ip(&["-n", n, "addr", "add", addr, "dev", "br0"])?;
        }
        for addr in ["2001:db8:1::1/64", "2001:db8:2::1/64"] {
            ip(&["-n", n, "addr", "add", addr, "dev", "br0", "nodad"])?;
        }
        sysctl(n, "net.ipv4.ip_forward", "1")?;
        sysctl(n, "net.ipv6.conf.all.forwarding", "1")?;
        Ok(sandbox)
    }

    /// Unique id of this sandbox.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The parent cgroup of every pod: attach egret's programs here.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// A bpffs directory for this sandbox's pins (not created; egret creates it).
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Adds a pod: its namespace, veth to the node bridge, addresses, TEST-NET routes and
    /// cgroup. Pods are numbered from 10 in the last octet / group of their addresses.
    pub fn add_pod(&mut self, name: &str) -> Result<Pod> {
        let pod = self.add_unwired_pod(name)?;
        self.wire_pod(&pod)?;
        Ok(pod)
    }

    /// [`Self::add_pod`] before the CNI has run: the pod's namespace (loopback only) and cgroup;
    /// [`Self::wire_pod`] adds the rest.
    pub fn add_unwired_pod(&mut self, name: &str) -> Result<Pod> {
        let index = 10 + self.pods;
        self.pods += 1;
        let netns = format!("{}-{name}", self.id);
        self.add_netns(&netns)?;
        let ipv4 = Ipv4Addr::new(198, 51, 100, index as u8);
        let ipv6: Ipv6Addr = format!("2001:db8:1::{index:x}")
            .parse()
            .unwrap_or(Ipv6Addr::UNSPECIFIED);
        let cgroup = self.add_cgroup(&self.cgroup.join(name))?;
        Ok(Pod {
            name: name.into(),
            netns,
            cgroup,
            ipv4,
            ipv6,
        })
    }

    /// What a CNI ADD does for `pod`: its veth to the node bridge (`p<index>` on the node side),
    /// its addresses and TEST-NET routes.
    pub fn wire_pod(&self, pod: &Pod) -> Result<()> {
        let index = pod.ipv4.octets()[3];
        let ns = pod.netns.as_str();
        self.wire(ns, &format!("p{index}"))?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{}/24", pod.ipv4),
            "dev",
            "eth0",
        ])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{}/64", pod.ipv6),
            "dev",
            "eth0",
            "nodad",
        ])?;
        for net in ["192.0.2.0/24", "203.0.113.0/24"] {
            ip(&["-n", ns, "route", "add", net, "via", "198.51.100.1"])?;
        }
        ip(&[
            "-n",
            ns,
            "-6",
            "route",
            "add",
            "2001:db8:2::/64",
            "via",
            "2001:db8:1::1",
        ])?;
        Ok(())
    }

    /// The node's network namespace, where the bridge and the node ends of the veths are (the
    /// host's, as a pod sees it).
    pub fn node_netns(&self) -> &str {
        &self.node_netns
    }

    /// Adds a container cgroup under a pod's cgroup (as a runtime does after the pod starts).
    pub fn add_container(&self, pod: &Pod, name: &str) -> Result<PathBuf> {
        self.add_cgroup(&pod.cgroup.join(name))
    }

    /// Adds a cgroup below any sandbox cgroup (nested containers, init scopes).
    pub fn add_cgroup_below(&self, parent: &Path, name: &str) -> Result<PathBuf> {
        self.add_cgroup(&parent.join(name))
    }

    /// Adds a cgroup directly under the sandbox's parent cgroup that belongs to no pod.
    pub fn add_unmanaged_cgroup(&self, name: &str) -> Result<PathBuf> {
        self.add_cgroup(&self.cgroup.join(name))
    }

    /// Adds an external host holding `addrs` (each in 192.0.2.0/24, 203.0.113.0/24 or
    /// 2001:db8:2::/64), with routes back to the pods only.
    pub fn add_host(&mut self, name: &str, addrs: &[IpAddr]) -> Result<Host> {
        let netns = format!("{}-{name}", self.id);
        self.add_netns(&netns)?;
        self.wire(&netns, &format!("h{}", self.netns.len()))?;
        let ns = netns.as_str();
        let (mut v4_gateways, mut v6) = (Vec::new(), false);
        for addr in addrs {
            match addr {
                IpAddr::V4(v4) if v4.octets()[..3] == [192, 0, 2] => {
                    ip(&["-n", ns, "addr", "add", &format!("{v4}/24"), "dev", "eth0"])?;
                    v4_gateways.push("192.0.2.1");
                }
                IpAddr::V4(v4) if v4.octets()[..3] == [203, 0, 113] => {
                    ip(&["-n", ns, "addr", "add", &format!("{v4}/24"), "dev", "eth0"])?;
                    v4_gateways.push("203.0.113.1");
                }
                IpAddr::V6(v6addr) if v6addr.segments()[..4] == [0x2001, 0xdb8, 2, 0] => {
                    ip(&[
                        "-n",
                        ns,
                        "addr",
                        "add",
                        &format!("{v6addr}/64"),
                        "dev",
                        "eth0",
                        "nodad",
                    ])?;
                    v6 = true;
                }
                other => return Err(SandboxError::HostAddress(*other)),
            }
        }
        if let Some(gateway) = v4_gateways.first() {
            ip(&["-n", ns, "route", "add", "198.51.100.0/24", "via", gateway])?;
        }
        if v6 {
            ip(&[
                "-n",
                ns,
                "-6",
                "route",
                "add",
                "2001:db8:1::/64",
                "via",
                "2001:db8:2::1",
            ])?;
        }
        Ok(Host {
            name: name.into(),
            netns,
            addrs: addrs.to_vec(),
        })
    }

    /// A TCP listener bound inside `host`'s namespace. The socket belongs to the namespace it
    /// was created in, so the test thread can accept on it as usual.
    pub fn listen_tcp(&self, host: &Host, addr: SocketAddr) -> Result<TcpListener> {
        in_netns(&host.netns, move || {
            let listener = TcpListener::bind(addr)?;
            listener.set_nonblocking(true)?;
            Ok(listener)
        })
    }

    /// A UDP socket bound inside `host`'s namespace, with a short read timeout.
    pub fn bind_udp(&self, host: &Host, addr: SocketAddr) -> Result<UdpSocket> {
        in_netns(&host.netns, move || {
            let socket = UdpSocket::bind(addr)?;
            socket.set_read_timeout(Some(Duration::from_millis(300)))?;
            Ok(socket)
        })
    }

    /// A command that runs `program` inside `netns` and `cgroup` from its first instruction.
    pub fn command_in(&self, netns: &str, cgroup: &Path, program: &Path) -> Result<Command> {
        let ns_path = Path::new(NETNS_DIR).join(netns);
        let ns = fs::File::open(&ns_path).map_err(|source| SandboxError::Io {
            what: "failed to open network namespace",
            path: ns_path,
            source,
        })?;
        let procs_path = cgroup.join("cgroup.procs");
        let procs = fs::OpenOptions::new()
            .write(true)
            .open(&procs_path)
            .map_err(|source| SandboxError::Io {
                what: "failed to open cgroup.procs",
                path: procs_path,
                source,
            })?;
        let mut command = Command::new(program);
        // SAFETY: the closure only makes async-signal-safe syscalls on fds opened beforehand.
        unsafe {
            command.pre_exec(move || {
                if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // "0" moves the writing process (cgroup v2, cgroup.procs).
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(command)
    }

    /// Runs `egret-probe` with `args` in `pod` (or in `cgroup`, when given, within the pod's
    /// namespace) and returns its attempts.
    /// Runs the probe's `scan` from `pod`: `count` datagrams from one socket, one to each
    /// address from `first` up, and asserts that every one was denied.
    pub fn scan_denied(&self, pod: &Pod, first: &str, count: u64) {
        let output = self
            .command_in(&pod.netns, &pod.cgroup, &probe_binary())
            .and_then(|mut command| {
                command
                    .args(["scan", first, "--count", &count.to_string()])
                    .output()
                    .map_err(|source| SandboxError::Io {
                        what: "failed to run the scan",
                        path: probe_binary(),
                        source,
                    })
            })
            .unwrap_or_else(|e| panic!("scan: {e}"));
        let summary: serde_json::Value = serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|e| panic!("scan summary ({e}): {output:?}"));
        assert_eq!(
            summary["outcomes"],
            serde_json::json!({"denied": count}),
            "{summary}"
        );
    }

    pub fn probe(&self, pod: &Pod, cgroup: Option<&Path>, args: &[&str]) -> Result<Vec<Attempt>> {
        let mut command =
            self.command_in(&pod.netns, cgroup.unwrap_or(&pod.cgroup), &probe_binary())?;
        let output = run(command.args(args))?;
        Ok(parse_attempts(&String::from_utf8_lossy(&output.stdout))?)
    }

    /// Starts `egret-probe` with `args` in the background in `pod`; it is killed on drop unless
    /// the caller waits for it. Returns its pid.
    pub fn spawn_probe(&self, pod: &Pod, args: &[&str]) -> Result<u32> {
        self.spawn_probe_in(pod, &pod.cgroup, args)
    }

    /// [`Self::spawn_probe`] in another cgroup of the pod (a kubelet-style pod cgroup).
    pub fn spawn_probe_in(&self, pod: &Pod, cgroup: &Path, args: &[&str]) -> Result<u32> {
        let mut command = self.command_in(&pod.netns, cgroup, &probe_binary())?;
        let child = command
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| SandboxError::Spawn {
                command: format!("{command:?}"),
                source,
            })?;
        let pid = child.id();
        self.children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child);
        Ok(pid)
    }

    /// Waits for a background probe started by [`Self::spawn_probe`] and returns its attempts.
    pub fn wait_probe(&self, pid: u32) -> Result<Vec<Attempt>> {
        Ok(parse_attempts(&self.wait_probe_output(pid)?)?)
    }

    /// Waits for a background probe and returns what it printed (summary modes).
    pub fn wait_probe_output(&self, pid: u32) -> Result<String> {
        let child = {
            let mut children = self.children.lock().unwrap_or_else(|e| e.into_inner());
            let index = children.iter().position(|c| c.id() == pid);
            index.map(|i| children.remove(i))
        };
        let Some(child) = child else {
            return Ok(String::new());
        };
        let output = child
            .wait_with_output()
            .map_err(|source| SandboxError::Spawn {
                command: format!("egret-probe (pid {pid})"),
                source,
            })?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Keeps a child process (an agent, a server) to be killed when the sandbox goes.
    pub fn adopt_child(&self, child: Child) {
        self.children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child);
    }

    fn add_netns(&mut self, name: &str) -> Result<()> {
        ip(&["netns", "add", name])?;
        self.netns.push(name.into());
        // Before any interface exists: link-local addresses would otherwise stay tentative for
        // a second of duplicate address detection, and the first IPv6 packets wait on it.
        sysctl(name, "net.ipv6.conf.default.accept_dad", "0")?;
        sysctl(name, "net.ipv6.conf.all.accept_dad", "0")?;
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// Connects `netns` to the node bridge: `eth0` inside, `node_end` on the bridge.
    fn wire(&self, netns: &str, node_end: &str) -> Result<()> {
        let node = self.node_netns.as_str();
        ip(&[
            "-n", node, "link", "add", node_end, "type", "veth", "peer", "name", "eth0", "netns",
            netns,
        ])?;
        ip(&["-n", node, "link", "set", node_end, "master", "br0", "up"])?;
        ip(&["-n", netns, "link", "set", "eth0", "up"])?;
        Ok(())
    }

    fn add_cgroup(&self, path: &Path) -> Result<PathBuf> {
        fs::create_dir_all(path).map_err(|source| SandboxError::Io {
            what: "failed to create cgroup",
            path: path.into(),
            source,
        })?;
        self.cgroups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(path.into());
        Ok(path.into())
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for mut child in self
            .children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = child.kill();
            let _ = child.wait();
        }
        remove_pins(&self.pin_dir);
        let mut cgroups = std::mem::take(self.cgroups.get_mut().unwrap_or_else(|e| e.into_inner()));
        cgroups.push(self.cgroup.clone());
        remove_cgroups(cgroups);
        for ns in self.netns.drain(..).rev() {
            let _ = ip(&["netns", "del", &ns]);
        }
    }
}

/// Kills what is left in each cgroup and removes them, deepest first.
fn remove_cgroups(mut cgroups: Vec<PathBuf>) {
    cgroups.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for cgroup in cgroups {
        for _ in 0..50 {
            let procs = fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
            if procs.trim().is_empty() {
                break;
            }
            // cgroup.kill (5.14+) kills every process below, also ones forked meanwhile.
            let _ = fs::write(cgroup.join("cgroup.kill"), "1");
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = fs::remove_dir(&cgroup);
    }
}

/// Removes a sandbox's bpffs pins: dropping the pinned links detaches egret's programs.
fn remove_pins(pin_dir: &Path) {
    for sub in ["links", "maps"] {
        if let Ok(entries) = fs::read_dir(pin_dir.join(sub)) {
            for entry in entries.flatten() {
                let _ = fs::remove_file(entry.path());
            }
        }
        let _ = fs::remove_dir(pin_dir.join(sub));
    }
    let _ = fs::remove_dir(pin_dir);
}

/// Removes namespaces, cgroups and pins of sandboxes whose process is gone (a killed run).
fn sweep_stale() {
    let dead = |name: &str| -> bool {
        let Some(rest) = name.strip_prefix(PREFIX) else {
            return false;
        };
        let pid: Option<u32> = rest.split('-').next().and_then(|p| p.parse().ok());
        pid.is_some_and(|pid| {
            pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
        })
    };
    if let Ok(entries) = fs::read_dir(NETNS_DIR) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if dead(&name) {
                let _ = ip(&["netns", "del", &name]);
            }
        }
    }
    if let Ok(root) = cgroup2_mount()
        && let Ok(entries) = fs::read_dir(&root)
    {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if dead(&name) {
                let mut all = Vec::new();
                collect_dirs(&entry.path(), &mut all);
                remove_cgroups(all);
            }
        }
    }
    if let Ok(entries) = fs::read_dir(BPFFS) {
        for entry in entries.flatten() {
            if dead(&entry.file_name().to_string_lossy()) {
                remove_pins(&entry.path());
            }
        }
    }
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.into());
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                collect_dirs(&entry.path(), out);
            }
        }
    }
}

/// Runs `f` on a thread that has entered `netns`; sockets it creates stay in that namespace.
fn in_netns<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> Result<T> {
    let ns_path = Path::new(NETNS_DIR).join(netns);
    let ns = fs::File::open(&ns_path).map_err(|source| SandboxError::Io {
        what: "failed to open network namespace",
        path: ns_path.clone(),
        source,
    })?;
    let joined = std::thread::spawn(move || -> io::Result<T> {
        // SAFETY: setns on this thread only; it exits right after.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        f()
    })
    .join();
    match joined {
        Ok(result) => result.map_err(|source| SandboxError::Io {
            what: "failed to open a socket in network namespace",
            path: ns_path,
            source,
        }),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// The cgroup2 mount point, from /proc/self/mountinfo.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").map_err(|source| SandboxError::Io {
            what: "failed to read mountinfo",
            path: "/proc/self/mountinfo".into(),
            source,
        })?;
    mountinfo
        .lines()
        .find_map(|line| {
            let (fields, rest) = line.split_once(" - ")?;
            let mount_point = fields.split_whitespace().nth(4)?;
            (rest.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .ok_or(SandboxError::NoCgroup2)
}

fn ip(args: &[&str]) -> Result<Output> {
    run(Command::new("ip").args(args))
}

fn sysctl(netns: &str, key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    let value = value.to_owned();
    in_netns(netns, move || {
        let mut f = fs::OpenOptions::new().write(true).open(&path)?;
        f.write_all(value.as_bytes())
    })
}

/// Runs a command to completion; a non-zero exit is an error with its stderr.
pub fn run(command: &mut Command) -> Result<Output> {
    let output = command.output().map_err(|source| SandboxError::Spawn {
        command: format!("{command:?}"),
        source,
    })?;
    if !output.status.success() {
        return Err(SandboxError::Command {
            command: format!("{command:?}"),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(output)
}
