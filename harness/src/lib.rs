//! Multi-process test harness for HiveFS: real `hive` processes, real sockets, real files.
//!
//! [`TestNode`] owns one hive node: a fresh data directory under [`std::env::temp_dir`]
//! (`hivefs-harness-<pid>-<n>-<name>`), `hive init` with free ports, and a `hive run`
//! child whose stdout and stderr go to `node.log` in that directory (appended across
//! restarts). It hands out [`HiveClient`]s and raw [`FramedConn`]s, runs `hive status`,
//! and can crash ([`TestNode::kill9`]), stop ([`TestNode::stop`]) and restart the node.
//! Dropping it kills the process if it still runs and deletes the directory (set
//! `HIVE_KEEP_DIRS=1` to keep it); when the drop happens during a panic, the tail of the
//! node log is printed first.
//!
//! The `hive` binary is `$HIVE_BIN` if set, else `hive` next to the test executable's
//! directory (`target/<profile>/deps/<test>` → `target/<profile>/hive`). `cargo test
//! --workspace` builds it; with `-p hivefs-harness` alone build it first:
//! `cargo build -p hivefs-engine --bin hive`.
//!
//! The child gets `PR_SET_PDEATHSIG = SIGKILL`, so a test process killed from outside does
//! not leave nodes behind. That signal fires when the *thread* that spawned the child ends:
//! start and restart nodes on the thread that owns the `TestNode` (a test's own thread).

use hivefs_client::hive::{ClientOptions, HiveClient};
use hivefs_net::conn::{ConnError, FramedConn, ReadStatus};
use hivefs_net::frame::Frame;
use hivefs_net::proto::Response;
use std::fs::OpenOptions;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub mod cluster;
pub mod mount;
pub mod netns;

pub use hivefs_client;
pub use hivefs_net;

/// How long a node may take to come up (replay included) on a slow, busy machine.
pub const START_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a node may take to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(60);

static DIR_COUNTER: AtomicUsize = AtomicUsize::new(0);
static PORT_COUNTER: AtomicUsize = AtomicUsize::new(0);
static LAB_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A number for the next [`netns::NetLab`] of this process.
pub(crate) fn next_lab() -> usize {
    LAB_COUNTER.fetch_add(1, Ordering::SeqCst)
}

/// What `hive init` is asked for.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    pub shards: u16,
    /// `--size` of the file device.
    pub size: String,
    /// `--segment-size`.
    pub segment_size: String,
    /// Serve plain TCP (`hive run --insecure`).
    pub insecure: bool,
    /// Part of the data directory name, for people reading `/tmp`.
    pub name: String,
    /// Where the node listens (and others reach it).
    pub host: String,
    /// Run the node inside this network namespace (see [`netns::NetLab`]).
    pub netns: Option<String>,
    /// Serve the shards' ports with DPDK (`hive run --net dpdk`) in a [`netns::VethLab`]
    /// of its own, through this poll-mode driver (`net_af_packet` or `net_af_xdp`).
    /// Default: `HIVE_TEST_NET=dpdk` in the environment asks for it (driver from
    /// `HIVE_TEST_DPDK_DRIVER`, default `net_af_xdp`), so the same tests run against
    /// either transport.
    pub dpdk: Option<String>,
    /// More environment variables of every `hive` the node runs (e.g.
    /// `HIVE_TEST_SPEAK_VERSION`: a node standing in for an older build).
    pub env: Vec<(String, String)>,
}

/// The DPDK driver `HIVE_TEST_NET=dpdk` asks for, if it does.
fn dpdk_from_env() -> Option<String> {
    match std::env::var("HIVE_TEST_NET").as_deref() {
        Ok("dpdk") => {
            Some(std::env::var("HIVE_TEST_DPDK_DRIVER").unwrap_or_else(|_| "net_af_xdp".into()))
        }
        _ => None,
    }
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            shards: 2,
            size: "1G".into(),
            segment_size: "16M".into(),
            insecure: false,
            name: "node".into(),
            host: "127.0.0.1".into(),
            netns: None,
            dpdk: dpdk_from_env(),
            env: Vec::new(),
        }
    }
}

impl NodeOptions {
    pub fn shards(mut self, n: u16) -> Self {
        self.shards = n;
        self
    }
    pub fn insecure(mut self, yes: bool) -> Self {
        self.insecure = yes;
        self
    }
    pub fn name(mut self, name: &str) -> Self {
        self.name = name.into();
        self
    }
    pub fn size(mut self, size: &str) -> Self {
        self.size = size.into();
        self
    }
    /// Run in network namespace `ns`, listening on `host` there (kernel TCP).
    pub fn in_netns(mut self, ns: &str, host: &str) -> Self {
        self.netns = Some(ns.into());
        self.host = host.into();
        self.dpdk = None;
        self
    }
    /// Serve with DPDK through `driver` (see the field).
    pub fn dpdk(mut self, driver: &str) -> Self {
        self.dpdk = Some(driver.into());
        self
    }
    /// Run every `hive` of the node with `key=value` in its environment.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }
}

/// The `hive` binary to run. Panics with instructions when it is missing.
pub fn hive_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("HIVE_BIN") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "HIVE_BIN={} is not a file", p.display());
        return p;
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test-binary> -> target/<profile>/hive
    let p = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("hive"))
        .expect("test binary has no grandparent directory");
    assert!(
        p.is_file(),
        "the hive binary is missing at {}: build it with `cargo build -p hivefs-engine --bin hive` \
         (same profile and CARGO_TARGET_DIR as the tests), or set HIVE_BIN",
        p.display()
    );
    p
}

/// The `hi` binary (the client host command: `hi mount`) to run: `$HI_BIN` if set, else
/// `hi` next to the test executable's directory, as [`hive_bin`]. Panics with instructions
/// when it is missing.
pub fn hi_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("HI_BIN") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "HI_BIN={} is not a file", p.display());
        return p;
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test-binary> -> target/<profile>/hi
    let p = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("hi"))
        .expect("test binary has no grandparent directory");
    assert!(
        p.is_file(),
        "the hi binary is missing at {}: build it with `cargo build -p hivefs-hi --bin hi` \
         (same profile and CARGO_TARGET_DIR as the tests), or set HI_BIN",
        p.display()
    );
    p
}

/// Are `n` consecutive ports from `base` free on 127.0.0.1 right now?
fn ports_free(base: u16, n: u16) -> bool {
    (0..n).all(|i| {
        base.checked_add(i)
            .is_some_and(|p| TcpListener::bind(("127.0.0.1", p)).is_ok())
    })
}

/// A raw (uncompressed) chunk of `data` for a hive with dedupe key `key`.
pub fn raw_chunk(key: &hivefs_net::chunk::DedupeKey, data: Vec<u8>) -> hivefs_net::proto::PutChunk {
    hivefs_net::proto::PutChunk {
        id: hivefs_net::chunk::ChunkId::compute(key, &data),
        codec: hivefs_net::chunk::Codec::Raw,
        raw_len: data.len() as u32,
        data,
    }
}

/// A base port with `n` consecutive free ports, below the ephemeral range (so outgoing
/// connections do not take them meanwhile), spread by pid so parallel test processes
/// (nextest) rarely collide; collisions that still happen are retried by [`TestNode`].
pub fn free_base_port(n: u16) -> u16 {
    const LO: usize = 20000;
    const SPAN: usize = 12000; // 20000..32000, below ip_local_port_range's usual 32768
    let pid = std::process::id() as usize;
    for _ in 0..500 {
        let k = PORT_COUNTER.fetch_add(1, Ordering::SeqCst);
        let slot = (pid.wrapping_mul(7919) + k * 16) % (SPAN - 16);
        let base = (LO + slot) as u16;
        if ports_free(base, n) {
            return base;
        }
    }
    panic!("found no {n} consecutive free ports in 20000..32000");
}

/// Remove ANSI colour sequences (in case the node's logger colours its output).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\u{1b}' && it.peek() == Some(&'[') {
            it.next();
            for d in it.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Start `cmd` with stdout and stderr appended to `log` (after a `banner` line), stdin
/// closed, colours off, and `death_signal` sent to it if this test process dies first.
pub fn spawn_logged(mut cmd: Command, log: &Path, banner: &str, death_signal: i32) -> Child {
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| panic!("opening {}: {e}", log.display()));
    let mut err = out.try_clone().expect("dup log");
    let _ = writeln!(err, "{banner}");
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .env("NO_COLOR", "1");
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                death_signal as libc::c_ulong,
                0,
                0,
                0,
            );
            Ok(())
        });
    }
    cmd.spawn()
        .unwrap_or_else(|e| panic!("spawning {:?}: {e}", cmd.get_program()))
}

/// A `hive` command, inside the node's network namespace if it has one.
fn hive_command(bin: &Path, opts: &NodeOptions) -> Command {
    let mut c = match &opts.netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    c.envs(opts.env.iter().map(|(k, v)| (k, v)));
    c
}

/// One hive node in its own data directory. See the module docs.
pub struct TestNode {
    dir: PathBuf,
    opts: NodeOptions,
    bin: PathBuf,
    child: Option<Child>,
    base_port: u16,
    starts: u32,
    /// A member of a hive of several nodes: never moved to other ports.
    fixed_ports: bool,
    /// The DPDK test bed of a `--net dpdk` node (removed after the node is gone).
    lab: Option<netns::VethLab>,
}

impl TestNode {
    /// `hive init` a fresh node and start it; returns once every shard port accepts.
    pub fn start(opts: NodeOptions) -> TestNode {
        let mut n = TestNode::init(opts);
        n.run();
        n
    }

    /// `hive join` a fresh node to the hive `via` belongs to (through `via`'s metadata
    /// port: a follower sends it on to the leader), and wait until it serves and is a
    /// member of the metadata cluster. Both nodes keep their ports from then on: the hive
    /// knows its members by address.
    pub fn join(opts: NodeOptions, via: &mut TestNode) -> TestNode {
        TestNode::try_join(opts, via).unwrap_or_else(|why| panic!("{why}"))
    }

    /// [`TestNode::join`], or why `hive join` failed (its output).
    pub fn try_join(opts: NodeOptions, via: &mut TestNode) -> Result<TestNode, String> {
        via.fixed_ports = true;
        let mut node = TestNode::new_dir(opts);
        node.fixed_ports = true;
        node.starts += 1;
        let banner = format!(
            "=== harness: hive join #{} (base port {}) via {} ===",
            node.starts,
            node.base_port,
            via.meta_port()
        );
        let mut cmd = hive_command(&node.bin, &node.opts);
        cmd.arg("join")
            .args(["--hive", &format!("{}:{}", via.opts.host, via.meta_port())])
            .args(["--token", &via.token(), "--ca", &via.ca_fingerprint()])
            .args(node.node_args());
        if std::env::var_os("HIVE_LOG").is_none() {
            cmd.env("HIVE_LOG", "info");
        }
        // The log lives in the data directory, which `hive join` wants empty: keep it
        // beside until the join has made the directory, then it is appended to there.
        std::fs::remove_dir_all(&node.dir).ok();
        let log = node.dir.with_extension("join.log");
        node.child = Some(spawn_logged(cmd, &log, &banner, libc::SIGKILL));
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let text = strip_ansi(&std::fs::read_to_string(&log).unwrap_or_default());
            if text.contains("joined the metadata cluster as a") {
                break;
            }
            if let Some(Ok(Some(st))) = node.child.as_mut().map(|c| c.try_wait()) {
                let _ = std::fs::remove_file(&log);
                node.child = None;
                return Err(format!("hive join exited with {st}:\n{text}"));
            }
            if Instant::now() > deadline {
                node.kill_quietly();
                let _ = std::fs::remove_file(&log);
                panic!("hive join did not finish within {START_TIMEOUT:?}:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Moved, not copied: the node goes on writing to the same file.
        if node.log_path().exists() || std::fs::rename(&log, node.log_path()).is_err() {
            let text = std::fs::read(&log).unwrap_or_default();
            let _ = std::fs::remove_file(&log);
            let _ = OpenOptions::new()
                .create(true)
                .append(true)
                .open(node.log_path())
                .and_then(|mut f| f.write_all(&text));
        }
        if let Err(why) = node.wait_ready() {
            node.kill_quietly();
            panic!("joined node did not come up: {why}\n{}", node.log_tail(60));
        }
        Ok(node)
    }

    /// Set (`Some`) or remove (`None`) a variable of the node's environment, from its next
    /// start on (see [`NodeOptions::env`]).
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.opts.env.retain(|(k, _)| k != key);
        if let Some(v) = value {
            self.opts.env.push((key.into(), v.into()));
        }
    }

    /// A fresh, empty data directory and free ports for a node (nothing started).
    fn new_dir(mut opts: NodeOptions) -> TestNode {
        let bin = hive_bin();
        // A DPDK node gets a namespace and veth of its own; its address is the stack's.
        let lab = opts.dpdk.as_ref().map(|driver| {
            let lab = netns::VethLab::new().unwrap_or_else(|why| {
                panic!("a --net dpdk node ({driver}) was asked for, but its test bed cannot be made: {why}")
            });
            opts.netns = Some(lab.ns.clone());
            opts.host = lab.node_addr.to_string();
            lab
        });
        let k = DIR_COUNTER.fetch_add(1, Ordering::SeqCst);
        let safe: String = opts
            .name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let dir =
            std::env::temp_dir().join(format!("hivefs-harness-{}-{k}-{safe}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .unwrap_or_else(|e| panic!("removing stale {}: {e}", dir.display()));
        }
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        // The metadata port comes first, then one port per shard.
        let opts_netns = opts.netns.is_some();
        let base_port = if opts_netns {
            7400
        } else {
            free_base_port(opts.shards + 1) + 1
        };
        // From here on Drop cleans up, whatever fails.
        TestNode {
            dir,
            opts,
            bin,
            child: None,
            base_port,
            starts: 0,
            // In a namespace of its own a node's ports are its own.
            fixed_ports: opts_netns,
            lab,
        }
    }

    /// The options `hive init` and `hive join` share: directory, device, shards, ports.
    fn node_args(&self) -> Vec<std::ffi::OsString> {
        let mut a: Vec<std::ffi::OsString> = vec!["--data".into(), self.dir.clone().into()];
        // A DPDK node's address belongs to its userspace stack: the kernel listeners
        // (for its own tools, over loopback) take any address.
        if self.opts.dpdk.is_some() {
            a.extend(["--advertise".into(), self.opts.host.clone().into()]);
        }
        let listen = if self.opts.dpdk.is_some() {
            "0.0.0.0".to_string()
        } else {
            self.opts.host.clone()
        };
        a.extend(self.net_args());
        for (k, v) in [
            ("--listen", listen),
            ("--size", self.opts.size.clone()),
            ("--segment-size", self.opts.segment_size.clone()),
            ("--shards", self.opts.shards.to_string()),
            ("--base-port", self.base_port.to_string()),
        ] {
            a.push(k.into());
            a.push(v.into());
        }
        a
    }

    /// `hive init` a fresh node without starting it.
    pub fn init(opts: NodeOptions) -> TestNode {
        let node = TestNode::new_dir(opts);
        let out = hive_command(&node.bin, &node.opts)
            .arg("init")
            .args(node.node_args())
            .env("NO_COLOR", "1")
            .output()
            .unwrap_or_else(|e| panic!("running {} init: {e}", node.bin.display()));
        assert!(
            out.status.success(),
            "hive init failed ({}):\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        node
    }

    /// A DPDK node's `--net dpdk` flags (`hive init` and `hive join` keep them in
    /// hive.toml's `[net]`, so `hive run` and the node's own tools know).
    fn net_args(&self) -> Vec<std::ffi::OsString> {
        let (Some(driver), Some(lab)) = (&self.opts.dpdk, &self.lab) else {
            return Vec::new();
        };
        // One queue pair by default: shard 0 receives and hands packets over. Several
        // (`HIVE_TEST_DPDK_QPAIRS`) spread flows by the kernel's fanout hash, and every
        // shard polls a queue; on this kernel that mode shows stalls of ~100 ms (see
        // ARCHITECTURE.md, DPDK transport), so it is not what the tests use yet.
        let mut vdev = format!("{driver}0,iface=eth0");
        if driver == "net_af_packet" {
            let q = std::env::var("HIVE_TEST_DPDK_QPAIRS").unwrap_or_else(|_| "1".into());
            // A receive ring of 4096 frames (the PMD's default 512 overflowed with two
            // connections' windows in flight: drops, retransmits, 0.09 GB/s puts).
            vdev.push_str(&format!(",qpairs={q},framecnt=4096"));
        }
        let eal = format!(
            "--no-huge -m 512 --no-pci -l 0 --file-prefix {} --vdev {vdev}",
            lab.ns
        );
        [
            "--net".to_string(),
            "dpdk".into(),
            "--dpdk-port".into(),
            format!("{driver}0"),
            "--dpdk-addr".into(),
            format!("{}/{}", lab.node_addr, lab.prefix_len),
            format!("--eal-args={eal}"),
        ]
        .into_iter()
        .map(Into::into)
        .collect()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn options(&self) -> &NodeOptions {
        &self.opts
    }

    pub fn shards(&self) -> u16 {
        self.opts.shards
    }

    pub fn is_insecure(&self) -> bool {
        self.opts.insecure
    }

    pub fn base_port(&self) -> u16 {
        self.base_port
    }

    /// The metadata service's port.
    pub fn meta_port(&self) -> u16 {
        self.base_port - 1
    }

    /// How many chunks a `hive gc` report says it swept ("... swept 2 chunks (...)").
    pub fn swept_count(report: &str) -> u64 {
        report
            .split("swept ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no swept count in {report:?}"))
    }

    /// Run `hive gc` and return what it printed; panics if it fails.
    pub fn gc(&self) -> String {
        let out = hive_command(&self.bin, &self.opts)
            .args(["gc", "--data"])
            .arg(&self.dir)
            .env("NO_COLOR", "1")
            .output()
            .unwrap_or_else(|e| panic!("running hive gc: {e}"));
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "hive gc failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    }

    /// Run `hive fsck` (with `--verify`: every referenced chunk read back and checked) and
    /// panic with its report unless it is clean. Returns the report.
    pub fn fsck(&self, verify: bool) -> String {
        let mut cmd = hive_command(&self.bin, &self.opts);
        cmd.arg("fsck").arg("--data").arg(&self.dir);
        if verify {
            cmd.arg("--verify");
        }
        if self.opts.insecure {
            cmd.arg("--insecure");
        }
        let out = cmd
            .env("NO_COLOR", "1")
            .output()
            .unwrap_or_else(|e| panic!("running hive fsck: {e}"));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "hive fsck found problems:\n{text}");
        text
    }

    /// The port of `shard`.
    pub fn port(&self, shard: u16) -> u16 {
        assert!(
            shard < self.opts.shards,
            "shard {shard} of {}",
            self.opts.shards
        );
        self.base_port + shard
    }

    /// The node's IP address.
    pub fn ip(&self) -> std::net::IpAddr {
        self.opts.host.parse().expect("node host is an IP address")
    }

    pub fn addr(&self, shard: u16) -> SocketAddr {
        SocketAddr::new(self.ip(), self.port(shard))
    }

    /// How many times `hive run` has been started.
    pub fn starts(&self) -> u32 {
        self.starts
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("node.log")
    }

    /// Everything every run of this node has logged so far (ANSI colours removed).
    pub fn log(&self) -> String {
        strip_ansi(&String::from_utf8_lossy(
            &std::fs::read(self.log_path()).unwrap_or_default(),
        ))
    }

    /// The admin token from `admin.token`.
    pub fn token(&self) -> String {
        std::fs::read_to_string(self.dir.join("admin.token"))
            .expect("reading admin.token")
            .trim()
            .to_string()
    }

    /// SHA-256 fingerprint of `ca.pem`, as clients pin it.
    pub fn ca_fingerprint(&self) -> String {
        let pem = std::fs::read_to_string(self.dir.join("ca.pem")).expect("reading ca.pem");
        hivefs_net::tls::fingerprint_pem(&pem).expect("fingerprint of ca.pem")
    }

    /// Client options for this node (token and CA pin from the data directory; no pin for
    /// an insecure node).
    pub fn client_options(&self) -> ClientOptions {
        let fp = (!self.opts.insecure).then(|| self.ca_fingerprint());
        let mut o = ClientOptions::new(
            &self.opts.host,
            self.base_port,
            &self.token(),
            fp.as_deref(),
        );
        o.client_name = "hivefs-harness".into();
        // Kernel nodes on loopback: a live node's kernel answers at once, a dead one
        // resets, so the only wait is a SYN dropped by a full accept queue on a loaded CI
        // machine (retried after 1, 3, 7 s). A DPDK node that was killed is silent: each
        // connect to it waits the whole timeout, which must stay well inside the client's
        // retry budget (`RETRY_FOR`), so those keep the client's default.
        if self.opts.dpdk.is_none() {
            o.connect_timeout = Duration::from_secs(20);
        }
        o
    }

    /// A connected client; panics (with the node log) if it cannot connect.
    pub fn client(&self) -> HiveClient {
        match HiveClient::connect(&self.client_options()) {
            Ok(c) => c,
            Err(e) => panic!(
                "connecting a client to {}: {e}\n--- node log tail ---\n{}",
                self.dir.display(),
                self.log_tail(40)
            ),
        }
    }

    /// A raw TCP connection to `shard` (blocking, with a read timeout of 200 ms so reads
    /// can be bounded by [`recv_until`]).
    pub fn raw_tcp(&self, shard: u16) -> TcpStream {
        let s = TcpStream::connect_timeout(&self.addr(shard), Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("connecting to shard {shard}: {e}"));
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
        s
    }

    /// A raw framed connection to `shard`, not yet authenticated: TLS pinned to the node's
    /// CA, or plain for an insecure node. Nothing is sent until a frame is queued.
    pub fn raw_conn(&self, shard: u16) -> FramedConn<TcpStream> {
        let s = self.raw_tcp(shard);
        let tls = if self.opts.insecure {
            None
        } else {
            let cfg = hivefs_net::tls::client_config_pinned(&self.ca_fingerprint())
                .expect("client TLS config");
            Some((
                cfg,
                hivefs_net::tls::server_name(&self.opts.host).expect("server name"),
            ))
        };
        FramedConn::new_client(s, tls).expect("FramedConn::new_client")
    }

    /// The SHA-256 of every certificate the node presents on a new connection to shard 0,
    /// as a client pinning the CA `pin` sees it (after a Hello with the admin token).
    pub fn presented_chain(&self, pin: &str) -> Vec<String> {
        let tls = hivefs_net::tls::client_config_pinned(pin).expect("client TLS config");
        let name = hivefs_net::tls::server_name(&self.opts.host).expect("server name");
        let mut c = FramedConn::new_client(self.raw_tcp(0), Some((tls, name)))
            .expect("FramedConn::new_client");
        let hello = hivefs_net::proto::Request::Hello {
            min_version: hivefs_net::frame::PROTOCOL_VERSION_MIN,
            max_version: hivefs_net::frame::PROTOCOL_VERSION_MAX,
            token: self.token(),
            client_name: "cert-test".into(),
        };
        c.send_request(hivefs_net::frame::PROTOCOL_VERSION_MIN, 1, &hello)
            .unwrap();
        c.recv_response().unwrap();
        let certs = c.tls().unwrap().peer_certificates().unwrap();
        certs
            .iter()
            .map(|c| hivefs_net::tls::fingerprint_der(c.as_ref()))
            .collect()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Is `hive run` still running? (Reaps it if it exited.)
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            None => false,
            Some(c) => match c.try_wait() {
                Ok(None) => true,
                Ok(Some(_)) | Err(_) => false,
            },
        }
    }

    /// Start `hive run` and wait until every shard port accepts. Panics (with the log) if
    /// the node exits or does not come up within [`START_TIMEOUT`]. If another process
    /// took the ports meanwhile, moves the node to new ports (rewrites `hive.toml`).
    pub fn run(&mut self) {
        assert!(self.child.is_none(), "node already running");
        for attempt in 0..5 {
            if (attempt > 0 || !ports_free(self.meta_port(), self.opts.shards + 1))
                && !self.fixed_ports
            {
                let p = free_base_port(self.opts.shards + 1) + 1;
                self.set_base_port(p);
            }
            let log_start = std::fs::metadata(self.log_path())
                .map(|m| m.len())
                .unwrap_or(0);
            self.spawn();
            match self.wait_ready() {
                Ok(()) => return,
                Err(why) => {
                    let log = self.log();
                    let this_run = log.get(log_start as usize..).unwrap_or("");
                    if (this_run.contains("binding shard")
                        || this_run.contains("binding the metadata port"))
                        && this_run.contains("in use")
                    {
                        // Lost a port race: pick other ports.
                        self.reap();
                        continue;
                    }
                    self.kill_quietly();
                    panic!(
                        "hive run in {} did not come up: {why}\n--- node log tail ---\n{}",
                        self.dir.display(),
                        self.log_tail(60)
                    );
                }
            }
        }
        panic!(
            "hive run: could not bind ports after 5 attempts\n{}",
            self.log_tail(40)
        );
    }

    fn spawn(&mut self) {
        self.starts += 1;
        let banner = format!(
            "=== harness: hive run #{} (base port {}) ===",
            self.starts, self.base_port
        );
        let mut cmd = hive_command(&self.bin, &self.opts);
        cmd.arg("run").arg("--data").arg(&self.dir);
        if self.opts.insecure {
            cmd.arg("--insecure");
        }
        if std::env::var_os("HIVE_LOG").is_none() {
            cmd.env("HIVE_LOG", "info");
        }
        self.child = Some(spawn_logged(cmd, &self.log_path(), &banner, libc::SIGKILL));
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut ready = vec![false; self.opts.shards as usize];
        loop {
            if let Some(c) = &mut self.child {
                if let Ok(Some(st)) = c.try_wait() {
                    return Err(format!("hive run exited with {st}"));
                }
            }
            for s in 0..self.opts.shards {
                if !ready[s as usize]
                    && TcpStream::connect_timeout(&self.addr(s), Duration::from_millis(500)).is_ok()
                {
                    ready[s as usize] = true;
                }
            }
            let meta = SocketAddr::new(self.ip(), self.meta_port());
            if ready.iter().all(|r| *r)
                && TcpStream::connect_timeout(&meta, Duration::from_millis(500)).is_ok()
            {
                // A port that accepts could belong to someone else: the node must be alive.
                std::thread::sleep(Duration::from_millis(50));
                if let Some(c) = &mut self.child {
                    if let Ok(Some(st)) = c.try_wait() {
                        return Err(format!("hive run exited with {st}"));
                    }
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "ports not accepting after {START_TIMEOUT:?}: ready {ready:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn set_base_port(&mut self, port: u16) {
        let p = self.dir.join("hive.toml");
        let text = std::fs::read_to_string(&p).expect("reading hive.toml");
        let mut v: toml::Value = toml::from_str(&text).expect("parsing hive.toml");
        v.as_table_mut()
            .expect("hive.toml is a table")
            .insert("base_port".into(), toml::Value::Integer(port as i64));
        std::fs::write(
            &p,
            toml::to_string_pretty(&v).expect("serialising hive.toml"),
        )
        .expect("writing hive.toml");
        self.base_port = port;
    }

    fn reap(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    fn signal(&self, sig: libc::c_int) {
        if let Some(c) = &self.child {
            // SAFETY: plain syscall on our own child's pid (not yet reaped, so not reused).
            let r = unsafe { libc::kill(c.id() as libc::pid_t, sig) };
            assert!(
                r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH),
                "kill({}, {sig}): {}",
                c.id(),
                std::io::Error::last_os_error()
            );
        }
    }

    fn kill_quietly(&mut self) {
        if self.child.is_some() {
            self.signal(libc::SIGKILL);
            self.reap();
        }
    }

    /// SIGKILL the node and reap it. Panics if it was not running.
    pub fn kill9(&mut self) -> ExitStatus {
        assert!(self.child.is_some(), "kill9: node not running");
        self.signal(libc::SIGKILL);
        let st = self
            .child
            .take()
            .unwrap()
            .wait()
            .expect("waiting for the killed node");
        let _ = OpenOptions::new()
            .append(true)
            .open(self.log_path())
            .and_then(|mut f| writeln!(f, "=== harness: SIGKILL ({st}) ==="));
        st
    }

    /// SIGTERM the node and wait for it to exit (at most [`STOP_TIMEOUT`], then SIGKILL
    /// and panic). Returns its exit status; a clean stop is `success()`.
    pub fn stop(&mut self) -> ExitStatus {
        assert!(self.child.is_some(), "stop: node not running");
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            let c = self.child.as_mut().unwrap();
            if let Some(st) = c.try_wait().expect("try_wait") {
                self.child = None;
                return st;
            }
            if Instant::now() > deadline {
                self.kill_quietly();
                panic!(
                    "node did not exit within {STOP_TIMEOUT:?} of SIGTERM\n{}",
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stop the node if it runs (asserting a clean exit), then start it again.
    pub fn restart(&mut self) {
        if self.is_running() {
            let st = self.stop();
            assert!(
                st.success(),
                "node exited with {st} on SIGTERM\n{}",
                self.log_tail(40)
            );
        } else {
            self.reap();
        }
        self.run();
    }

    /// Run `hive <args> --data DIR [--insecure]`-style commands: `args` come first, then
    /// `--data DIR`. Returns the output whatever the exit status.
    pub fn hive(&self, args: &[&str]) -> Output {
        // In the node's namespace: a DPDK node's own tools reach it over loopback there.
        hive_command(&self.bin, &self.opts)
            .args(args)
            .arg("--data")
            .arg(&self.dir)
            .env("NO_COLOR", "1")
            .output()
            .expect("running hive")
    }

    fn status_args(&self, json: bool) -> Vec<&'static str> {
        let mut a = vec!["status"];
        if json {
            a.push("--json");
        }
        if self.opts.insecure {
            a.push("--insecure");
        }
        a
    }

    /// `hive status --json`, parsed. Panics if the command fails or prints bad JSON.
    pub fn status_json(&self) -> serde_json::Value {
        let out = self.hive(&self.status_args(true));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "hive status --json failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("hive status --json printed invalid JSON ({e}):\n{stdout}"))
    }

    /// `hive status` (human output). Panics if the command fails.
    pub fn status_text(&self) -> String {
        let out = self.hive(&self.status_args(false));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "hive status failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Wait until the log contains `needle` (at most `timeout`).
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.kill_quietly();
        if let Some(lab) = &self.lab {
            // EAL's runtime files of the node's file prefix (it may have been killed).
            let _ = std::fs::remove_dir_all(format!("/var/run/dpdk/{}", lab.ns));
        }
        if std::thread::panicking() {
            eprintln!(
                "--- hive node log ({}) tail ---\n{}\n--- end of node log ---",
                self.dir.display(),
                self.log_tail(60)
            );
        }
        if std::env::var_os("HIVE_KEEP_DIRS").is_some() {
            eprintln!("keeping {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// What a raw connection got while waiting for a reply.
#[derive(Debug)]
pub enum Received {
    Frame(Frame),
    /// The peer closed on a frame boundary (TCP FIN or TLS close_notify).
    Closed,
    /// A connection error (reset, TLS failure, bad frame from the peer).
    Error(ConnError),
    /// Nothing within the deadline.
    Timeout,
}

impl Received {
    /// The response carried, if a frame arrived and decodes.
    pub fn response(&self) -> Option<(u64, Response)> {
        match self {
            Received::Frame(f) => Response::decode(f.opcode, &f.body)
                .ok()
                .map(|r| (f.request_id, r)),
            _ => None,
        }
    }

    /// The peer ended the connection: a clean close, or a reset.
    pub fn is_closed(&self) -> bool {
        match self {
            Received::Closed => true,
            Received::Error(ConnError::Io(e)) => matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
            ),
            _ => false,
        }
    }
}

/// Flush what is queued and wait (at most `timeout`) for one frame or the end of the
/// connection. The stream must have a read timeout (as [`TestNode::raw_tcp`] sets) so
/// that reads return periodically.
pub fn recv_until(conn: &mut FramedConn<TcpStream>, timeout: Duration) -> Received {
    let deadline = Instant::now() + timeout;
    let mut frames = Vec::with_capacity(1);
    loop {
        if conn.wants_write() {
            if let Err(e) = conn.flush() {
                return Received::Error(e);
            }
        }
        match conn.read_frames(&mut frames, 1) {
            Ok(status) => {
                if let Some(f) = frames.pop() {
                    return Received::Frame(f);
                }
                if status == ReadStatus::Closed {
                    return Received::Closed;
                }
            }
            Err(e) => return Received::Error(e),
        }
        if Instant::now() > deadline {
            return Received::Timeout;
        }
    }
}

/// Drive a TLS client handshake to completion (no-op for plain connections).
pub fn finish_handshake(conn: &mut FramedConn<TcpStream>, timeout: Duration) -> Result<(), String> {
    // read_frames reads on until the socket would block: keep that wait short here.
    let saved = conn.get_ref().read_timeout().ok().flatten();
    let _ = conn
        .get_ref()
        .set_read_timeout(Some(Duration::from_millis(5)));
    let r = drive_handshake(conn, timeout);
    let _ = conn.get_ref().set_read_timeout(saved);
    r
}

fn drive_handshake(conn: &mut FramedConn<TcpStream>, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let mut frames = Vec::new();
    while conn.is_handshaking() {
        conn.flush()
            .map_err(|e| format!("flush during handshake: {e}"))?;
        match conn.read_frames(&mut frames, 1) {
            Ok(ReadStatus::Closed) => return Err("closed during the handshake".into()),
            Ok(ReadStatus::Open) => {}
            Err(e) => return Err(format!("handshake: {e}")),
        }
        if !frames.is_empty() {
            return Err("a frame arrived during the handshake".into());
        }
        if Instant::now() > deadline {
            return Err("handshake timed out".into());
        }
    }
    conn.flush()
        .map_err(|e| format!("flush after handshake: {e}"))?;
    Ok(())
}

/// The workspace's seeded PRNG, for reproducible test data and timings.
pub use hivefs_nvme::rng::SplitMix64 as Rng;

/// `HIVE_*`-style numeric setting from the environment, or `default`.
pub fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}
