//! `hive-perf cluster`: replication on throw-away 3-node hives on loopback.
//!
//! For each `--copies` setting (1, 2, 3) and each run, a fresh hive: node 1 by `hive init
//! --copies C --min-copies min(2, C)` and `hive run`, nodes 2 and 3 by `hive join` (each
//! stopped once it is a member, its hive.toml edited, and started again with `hive run`,
//! so that every node runs with `pin_cores = false` and `repair_mib_per_sec` raised).
//! Then `--cluster-bytes` of unique random chunks through `HiveClient::put_stream`
//! (generated and hashed before the clock), and:
//! - GB/s of logical data, to the last acknowledgement;
//! - node CPU-seconds per logical GiB: utime + stime of the three node processes, read
//!   before the write and after every copy settled (no replication job in flight);
//! - network bytes per logical GiB: the stored bytes the client sent, plus what the nodes
//!   forwarded to each other (`repl_forwarded_bytes` of every shard's stats), plus repair
//!   copies the nodes logged meanwhile (normally none);
//! - each node's chunk count.
//!
//! With copies 3 (unless `--no-repair`), a 4th node then joins and the clock runs from
//! `hive join` until the new node holds exactly the chunks whose 3 replicas (under the
//! 4-node map) include it. The old nodes push them (repair). The bytes moved are what
//! reached the new node (its shards' stored bytes, plus any copy offered twice); the
//! old nodes' logged passes (`repair pass done ... copied= bytes=`) are the cross-check.

use crate::chunks::{self, DataKind};
use crate::node::{self, NodeInfo};
use crate::util::{self, GIB};
use crate::{check_stop, Opts};
use anyhow::{bail, Context, Result};
use hivefs_client::hive::HiveClient;
use hivefs_net::chunk::ChunkId;
use hivefs_net::placement::NodeState;
use std::collections::BTreeMap;
use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(clap::Args, Clone, Debug)]
pub struct ClusterArgs {
    /// Logical bytes written to each hive (unique random chunks of --chunk-size).
    #[arg(long, default_value = "1G")]
    pub cluster_bytes: String,
    /// Device size of each node (a sparse file).
    #[arg(long, default_value = "6G")]
    pub cluster_node_size: String,
    /// The copies settings measured.
    #[arg(long, value_delimiter = ',', default_values_t = [1u8, 2, 3])]
    pub copies: Vec<u8>,
    /// Skip the repair measure (a 4th node joining the copies-3 hive).
    #[arg(long)]
    pub no_repair: bool,
    /// `repair_mib_per_sec` written into every node's hive.toml before it starts (high:
    /// the figure shows the mechanism, not the throttle).
    #[arg(long, default_value_t = 4096)]
    pub repair_mib_per_sec: u64,
}

const JOIN_TIMEOUT: Duration = Duration::from_secs(180);
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_GRACE: Duration = Duration::from_secs(10);
/// The new node's chunk count may stand still this long before the repair counts as stalled.
const REPAIR_STALL: Duration = Duration::from_secs(180);

/// A `hive` process this benchmark started.
struct Proc {
    name: String,
    dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    info: Option<NodeInfo>,
    raft_id: u64,
}

impl Proc {
    fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    fn log_tail(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(25)..].join("\n")
    }

    fn cpu_secs(&self) -> Option<f64> {
        self.pid().and_then(|p| util::proc_cpu_secs(p).ok())
    }

    /// The process ended early: an error with its log.
    fn check_alive(&mut self) -> Result<()> {
        if let Some(c) = self.child.as_mut() {
            if let Some(st) = c.try_wait()? {
                self.child = None;
                bail!("{} exited ({st}); log:\n{}", self.name, self.log_tail());
            }
        }
        Ok(())
    }

    fn term(&self) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill of a child this process started and has not reaped.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
    }

    /// Wait for the process to end (after `term`), SIGKILL after `until`.
    fn reap(&mut self, until: Instant) -> Result<()> {
        let Some(mut c) = self.child.take() else {
            return Ok(());
        };
        loop {
            if let Some(st) = c.try_wait()? {
                if !st.success() {
                    eprintln!("hive-perf: {} exited with {st}", self.name);
                }
                return Ok(());
            }
            if Instant::now() >= until {
                let _ = c.kill();
                let _ = c.wait();
                bail!(
                    "{} did not stop within {STOP_GRACE:?} of SIGTERM: killed",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Until every shard port accepts.
    fn wait_ready(&mut self) -> Result<()> {
        let info = self.info.clone().context("node info")?;
        let t0 = Instant::now();
        loop {
            check_stop()?;
            self.check_alive()?;
            if (0..info.shards)
                .all(|s| TcpStream::connect((info.host.as_str(), info.base_port + s)).is_ok())
            {
                return Ok(());
            }
            if t0.elapsed() > READY_TIMEOUT {
                bail!(
                    "{} did not listen within {READY_TIMEOUT:?}; log:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Start `hive ARGS` with its output appended to `log`, in its own process group, sent
/// SIGTERM if this process dies (`node::own_child`; spawned from the main thread).
fn spawn_hive(bin: &Path, args: &[String], log: &Path) -> Result<Child> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .env(
            "HIVE_LOG",
            std::env::var("HIVE_LOG").unwrap_or_else(|_| "info".into()),
        )
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(f.try_clone()?)
        .stderr(f);
    node::own_child(&mut cmd, libc::SIGTERM);
    cmd.spawn()
        .with_context(|| format!("starting {} {}", bin.display(), args.join(" ")))
}

/// A throw-away hive: its processes are stopped and its directory removed on drop.
struct Cluster {
    bin: PathBuf,
    dir: PathBuf,
    keep: bool,
    shards: u16,
    size: String,
    repair_rate: u64,
    nodes: Vec<Proc>,
    /// `host:meta_port` of node 1, its admin token and the CA fingerprint.
    via: String,
    token: String,
    ca: String,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for p in &self.nodes {
            p.term();
        }
        let until = Instant::now() + STOP_GRACE;
        for p in self.nodes.iter_mut() {
            if let Err(e) = p.reap(until) {
                eprintln!("hive-perf: {e:#}");
            }
        }
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Cluster {
    fn new(bin: &Path, dir: PathBuf, o: &Opts, a: &ClusterArgs) -> Result<Cluster> {
        if dir.exists() {
            bail!("{} already exists", dir.display());
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Cluster {
            bin: bin.to_path_buf(),
            dir,
            keep: o.keep,
            shards: o.shards,
            size: a.cluster_node_size.clone(),
            repair_rate: a.repair_mib_per_sec,
            nodes: Vec::new(),
            via: String::new(),
            token: String::new(),
            ca: String::new(),
        })
    }

    fn node_args(&self, d: &Path, base_port: u16) -> Vec<String> {
        vec![
            "--data".into(),
            d.display().to_string(),
            "--size".into(),
            self.size.clone(),
            "--shards".into(),
            self.shards.to_string(),
            "--base-port".into(),
            base_port.to_string(),
            "--segment-size".into(),
            "64M".into(),
        ]
    }

    fn our_keys(&self) -> Vec<(String, String)> {
        vec![
            ("pin_cores".into(), "false".into()),
            ("repair_mib_per_sec".into(), self.repair_rate.to_string()),
        ]
    }

    /// `hive run` node `i` (its directory made by init or join), and wait until it listens.
    fn run_node(&mut self, i: usize) -> Result<()> {
        let p = &mut self.nodes[i];
        let args = vec!["run".into(), "--data".into(), p.dir.display().to_string()];
        p.child = Some(spawn_hive(&self.bin, &args, &p.log)?);
        p.info = Some(NodeInfo::from_dir(&p.dir, false, p.pid())?);
        p.wait_ready()
    }

    /// Node 1: `hive init` with the hive's copies, then run.
    fn init_first(&mut self, copies: u8) -> Result<()> {
        let d = self.dir.join("n1");
        let base_port = node::free_base_port(self.shards + 1)? + 1;
        let mut args = vec!["init".to_string()];
        args.extend(self.node_args(&d, base_port));
        args.extend([
            "--copies".into(),
            copies.to_string(),
            "--min-copies".into(),
            copies.min(2).to_string(),
        ]);
        let out = Command::new(&self.bin)
            .args(&args)
            .env("HIVE_LOG", "warn")
            .env("NO_COLOR", "1")
            .output()
            .with_context(|| format!("running {} init", self.bin.display()))?;
        if !out.status.success() {
            bail!(
                "hive init failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        node::set_toml_keys(&d, &self.our_keys())?;
        self.nodes.push(Proc {
            name: "n1".into(),
            dir: d.clone(),
            log: self.dir.join("n1.log"),
            child: None,
            info: None,
            raft_id: node::toml_key(&d, "raft_id")?.parse()?,
        });
        self.run_node(0)?;
        let info = self.nodes[0].info.clone().expect("started");
        self.via = format!("127.0.0.1:{}", base_port - 1);
        self.token = info.token.clone();
        self.ca = info.fingerprint.clone().context("no CA fingerprint")?;
        Ok(())
    }

    /// `hive join` a node (it runs as the node from then on). With `restart`, it is stopped
    /// once a member, its hive.toml edited (`our_keys`) and started again with `hive run`;
    /// otherwise it keeps its defaults (`pin_cores = true`: with 1 shard, pinned to core 0).
    /// Returns its index.
    fn join(&mut self, restart: bool) -> Result<usize> {
        let i = self.nodes.len();
        let name = format!("n{}", i + 1);
        let d = self.dir.join(&name);
        // The log is beside the data directory: `hive join` wants that one empty.
        let log = self.dir.join(format!("{name}.log"));
        let base_port = node::free_base_port(self.shards + 1)? + 1;
        let mut args = vec![
            "join".to_string(),
            "--hive".into(),
            self.via.clone(),
            "--token".into(),
            self.token.clone(),
            "--ca".into(),
            self.ca.clone(),
        ];
        args.extend(self.node_args(&d, base_port));
        let child = spawn_hive(&self.bin, &args, &log)?;
        self.nodes.push(Proc {
            name: name.clone(),
            dir: d.clone(),
            log,
            child: Some(child),
            info: None,
            raft_id: 0,
        });
        let t0 = Instant::now();
        loop {
            check_stop()?;
            let p = &mut self.nodes[i];
            p.check_alive()?;
            let text = std::fs::read_to_string(&p.log).unwrap_or_default();
            if text.contains("joined the metadata cluster as a") {
                break;
            }
            if t0.elapsed() > JOIN_TIMEOUT {
                bail!(
                    "{name}: hive join did not finish within {JOIN_TIMEOUT:?}; log:\n{}",
                    p.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let p = &mut self.nodes[i];
        p.raft_id = node::toml_key(&d, "raft_id")?.parse()?;
        if restart {
            p.term();
            p.reap(Instant::now() + STOP_GRACE)?;
            node::set_toml_keys(&d, &self.our_keys())?;
            self.run_node(i)?;
        } else {
            p.info = Some(NodeInfo::from_dir(&d, false, p.pid())?);
            p.wait_ready()?;
        }
        Ok(i)
    }
}

/// One node's shards' stats, summed.
#[derive(Clone, Copy, Debug, Default)]
struct NodeStats {
    chunks: u64,
    stored_bytes: u64,
    fwd: u64,
    fwd_bytes: u64,
    owed: u64,
    jobs: u64,
    map_epoch: u64,
    /// Chunks offered to the shards by puts and copies (stored + duplicate), and the
    /// duplicates among them.
    puts: u64,
    dups: u64,
}

fn node_stats(c: &mut HiveClient) -> Result<NodeStats> {
    let mut s = NodeStats {
        map_epoch: u64::MAX,
        ..Default::default()
    };
    for j in c.stats().context("stats")? {
        let v: serde_json::Value = serde_json::from_str(&j).context("stats JSON")?;
        let g = |k: &str| v[k].as_u64().unwrap_or(0);
        s.chunks += g("chunks");
        s.stored_bytes += g("stored_bytes");
        s.fwd += g("repl_forwarded");
        s.fwd_bytes += g("repl_forwarded_bytes");
        s.owed += g("repl_owed");
        s.jobs += g("repl_jobs");
        s.puts += g("puts_stored") + g("puts_duplicate");
        s.dups += g("puts_duplicate");
        s.map_epoch = s.map_epoch.min(g("map_epoch"));
    }
    Ok(s)
}

/// Whether a repair pass is running on the node of `dir`, and its map epoch (`repair.json`).
fn repair_state(dir: &Path) -> Option<(bool, u64)> {
    let b = std::fs::read(dir.join("repair.json")).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&b).ok()?;
    Some((
        v["running"].as_bool().unwrap_or(false),
        v["map_epoch"].as_u64().unwrap_or(0),
    ))
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map_or(0, |m| m.len())
}

/// The repair passes a node finished after byte `from` of its log, from their
/// `repair pass done ... copied=N bytes=B` lines (logged at info when a pass copied
/// anything): (passes, copies, bytes). Exact for finished passes; a pass that a map
/// change cut short logs nothing.
fn repair_log(log: &Path, from: u64) -> (u64, u64, u64) {
    let text = std::fs::read(log).unwrap_or_default();
    let text = String::from_utf8_lossy(&text[(from as usize).min(text.len())..]).into_owned();
    let num = |line: &str, key: &str| -> Option<u64> {
        let i = line.find(key)? + key.len();
        let digits: String = line[i..]
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        digits.parse().ok()
    };
    let mut out = (0, 0, 0);
    for line in text.lines().filter(|l| l.contains("repair pass done")) {
        if let (Some(c), Some(b)) = (num(line, " copied="), num(line, " bytes=")) {
            out.0 += 1;
            out.1 += c;
            out.2 += b;
        }
    }
    out
}

/// Figures by name, one value per run.
#[derive(Default)]
struct Figs {
    figs: BTreeMap<String, Vec<f64>>,
    notes: Vec<String>,
}

impl Figs {
    fn fig(&mut self, name: &str, v: f64) {
        self.figs.entry(name.to_string()).or_default().push(v);
    }

    fn note(&mut self, s: String) {
        println!("NOTE: {s}");
        self.notes.push(s);
    }
}

/// Connect to one node (retrying while it comes up).
fn connect(p: &Proc) -> Result<HiveClient> {
    chunks::connect(p.info.as_ref().context("node not started")?)
}

/// Until `client` sees `n` nodes, all up, and every node's shards have that map.
fn wait_map(client: &mut HiveClient, stats: &mut [HiveClient], n: usize) -> Result<()> {
    let t0 = Instant::now();
    loop {
        check_stop()?;
        client.refresh_map();
        let m = client.hive_map();
        let up = m.nodes.len() == n && m.nodes.iter().all(|x| x.state == NodeState::Up);
        if up {
            let epoch = m.epoch;
            let mut all = true;
            for c in stats.iter_mut() {
                all &= node_stats(c)?.map_epoch >= epoch;
            }
            if all {
                return Ok(());
            }
        }
        if t0.elapsed() > Duration::from_secs(60) {
            let states: Vec<String> = m
                .nodes
                .iter()
                .map(|x| format!("{}:{:?}", x.id, x.state))
                .collect();
            bail!(
                "the map did not show {n} nodes up within 60 s (epoch {}: {})",
                m.epoch,
                states.join(", ")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn cpu_sum(nodes: &[Proc]) -> Result<f64> {
    let mut s = 0.0;
    for p in nodes {
        s += p
            .cpu_secs()
            .with_context(|| format!("no CPU time for {} (not running?)", p.name))?;
    }
    Ok(s)
}

/// Removes the benchmark's directory on every exit path unless kept.
struct RmDir {
    path: PathBuf,
    keep: bool,
}

impl Drop for RmDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// `hive-perf cluster`.
pub fn run(a: &ClusterArgs, o: &Opts) -> Result<()> {
    let bin = node::find_hive_bin(o.hive_bin.as_deref())?;
    let bytes = util::parse_size(&a.cluster_bytes)?;
    let chunk_bytes = util::parse_size(&o.chunk_size)? as usize;
    let call_bytes = util::parse_size(&o.call_bytes)?;
    if chunk_bytes == 0 || chunk_bytes > hivefs_net::chunk::MAX_CHUNK_RAW_BYTES {
        bail!(
            "--chunk-size must be 1..={}",
            hivefs_net::chunk::MAX_CHUNK_RAW_BYTES
        );
    }
    if a.copies.is_empty() || a.copies.iter().any(|&c| !(1..=3).contains(&c)) {
        bail!("--copies: each of 1, 2, 3");
    }
    let work = RmDir {
        path: o
            .work_dir
            .join(format!("hive-perf-cluster-{}", std::process::id())),
        keep: o.keep,
    };
    let base_seed = util::os_seed();
    println!(
        "hive-perf cluster: {} cores, nothing pinned (client, 3 nodes and their copies share them); {} of unique random {} chunks per hive; copies {:?}; {} run(s), medians reported; repair_mib_per_sec = {}",
        util::cpu_count(),
        util::fmt_size(bytes),
        util::fmt_size(chunk_bytes as u64),
        a.copies,
        o.runs,
        a.repair_mib_per_sec
    );
    println!("hive: {}", bin.display());
    println!("load average at start: {}", crate::loadavg());
    let mut f = Figs::default();
    let mut failed = 0usize;
    for r in 0..o.runs {
        for &copies in &a.copies {
            check_stop()?;
            println!("\n== copies {copies}, run {}", r + 1);
            let dir = work.path.join(format!("c{copies}-r{}", r + 1));
            let seed = crate::seed_for(base_seed, r, "cluster", &copies.to_string());
            let res = one_hive(
                &bin,
                dir,
                o,
                a,
                copies,
                bytes,
                chunk_bytes,
                call_bytes,
                seed,
                &mut f,
            );
            if let Err(e) = res {
                failed += 1;
                f.note(format!("copies {copies} run {}: {e:#}", r + 1));
                if crate::STOP.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
            }
        }
    }
    drop(work);
    println!("\nload average at end: {}", crate::loadavg());
    summary(&f, a, o.runs);
    if failed > 0 {
        bail!("{failed} hive run(s) failed (see the notes)");
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn one_hive(
    bin: &Path,
    dir: PathBuf,
    o: &Opts,
    a: &ClusterArgs,
    copies: u8,
    bytes: u64,
    chunk_bytes: usize,
    call_bytes: u64,
    seed: u64,
    f: &mut Figs,
) -> Result<()> {
    let c = copies;
    let t_setup = Instant::now();
    let mut cl = Cluster::new(bin, dir, o, a)?;
    cl.init_first(copies)?;
    cl.join(true)?;
    cl.join(true)?;
    let mut client = connect(&cl.nodes[0])?;
    // The puts ask for the copies measured (a volume's `copies`).
    client.set_level(copies);
    let mut stats: Vec<HiveClient> = cl.nodes.iter().map(connect).collect::<Result<_>>()?;
    wait_map(&mut client, &mut stats, 3)?;
    let hm = client.hive_map();
    let slots = hm.placement(copies as usize).slots_per_node();
    println!(
        "3 nodes up in {:.1}s (map epoch {}, {} buckets; pids {}; node id:weight:replica slots {})",
        t_setup.elapsed().as_secs_f64(),
        hm.epoch,
        hm.bucket_count,
        cl.nodes
            .iter()
            .map(|p| format!("{} {}", p.name, p.pid().unwrap_or(0)))
            .collect::<Vec<_>>()
            .join(", "),
        hm.nodes
            .iter()
            .map(|x| {
                let s = slots.iter().find(|(id, _)| *id == x.id).map_or(0, |s| s.1);
                format!("{}:{}:{s}", x.id, x.weight)
            })
            .collect::<Vec<_>>()
            .join(" ")
    );

    // The write.
    let key = client.map().dedupe_key;
    let set = chunks::make_chunks(&key, bytes, chunk_bytes, DataKind::Random, seed);
    let n = set.chunks.len() as u64;
    let calls = chunks::calls(&set.chunks, call_bytes);
    let before: Vec<NodeStats> = stats.iter_mut().map(node_stats).collect::<Result<_>>()?;
    let logs0: Vec<u64> = cl.nodes.iter().map(|p| file_len(&p.log)).collect();
    let cpu0 = cpu_sum(&cl.nodes)?;
    let self0 = util::self_cpu_secs();
    let t0 = Instant::now();
    let st = client
        .put_stream(calls.iter().copied())
        .context("put stream")?;
    let secs = t0.elapsed().as_secs_f64();
    let client_cpu = util::self_cpu_secs() - self0;
    if !st.rejected.is_empty() || st.duplicate > 0 || st.stored != n {
        bail!(
            "put stream: {} stored, {} duplicate, {} rejected of {n} unique chunks",
            st.stored,
            st.duplicate,
            st.rejected.len()
        );
    }
    // Settle: the copies beyond min_copies may still be on their way.
    let mut after: Vec<NodeStats>;
    loop {
        after = stats.iter_mut().map(node_stats).collect::<Result<_>>()?;
        let held: u64 = after
            .iter()
            .zip(&before)
            .map(|(a, b)| a.chunks - b.chunks)
            .sum();
        let jobs: u64 = after.iter().map(|s| s.jobs).sum();
        if jobs == 0 && held >= c as u64 * n {
            break;
        }
        if t0.elapsed() > Duration::from_secs(secs as u64 + 120) {
            f.note(format!(
                "copies {c}: after 120 s the nodes hold {held} copies of {n} chunks ({jobs} replication jobs in flight); measured as is"
            ));
            break;
        }
        check_stop()?;
        std::thread::sleep(Duration::from_millis(20));
    }
    let settle = t0.elapsed().as_secs_f64();
    let cpu = cpu_sum(&cl.nodes)? - cpu0;
    // Repair copies made meanwhile (normally none), from the passes the nodes logged.
    let repair_bytes: u64 = cl
        .nodes
        .iter()
        .zip(&logs0)
        .map(|(p, from)| repair_log(&p.log, *from).2)
        .sum();
    let gib = set.raw_bytes as f64 / GIB;
    let fwd_bytes: u64 = after
        .iter()
        .zip(&before)
        .map(|(a, b)| a.fwd_bytes - b.fwd_bytes)
        .sum();
    let owed: u64 = after
        .iter()
        .zip(&before)
        .map(|(a, b)| a.owed - b.owed)
        .sum();
    let net = set.wire_bytes + fwd_bytes + repair_bytes;
    let counts: Vec<u64> = after
        .iter()
        .zip(&before)
        .map(|(a, b)| a.chunks - b.chunks)
        .collect();
    let gbps = set.raw_bytes as f64 / secs / 1e9;
    println!(
        "write: {} in {secs:.2}s = {gbps:.3} GB/s (all copies settled at {settle:.2}s); node cpu {cpu:.2}s = {:.3} cpu-s/GiB; client cpu {:.3} cpu-s/GiB",
        util::fmt_size(set.raw_bytes),
        cpu / gib,
        client_cpu / gib
    );
    println!(
        "network: client sent {} + forwarded {} + repair {} = {:.3} bytes per logical byte ({:.4e} per GiB); owed {owed}",
        set.wire_bytes,
        fwd_bytes,
        repair_bytes,
        net as f64 / set.raw_bytes as f64,
        net as f64 / gib
    );
    println!(
        "chunks per node: {} of {n} ({}); {:.3} copies per chunk",
        counts
            .iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(" / "),
        counts
            .iter()
            .map(|x| format!("{:.3}", *x as f64 / n as f64))
            .collect::<Vec<_>>()
            .join(" / "),
        counts.iter().sum::<u64>() as f64 / n as f64
    );
    if owed > 0 {
        f.note(format!("copies {c}: {owed} copies owed during the write"));
    }
    let p = format!("cluster_c{c}");
    f.fig(&format!("{p}_gbps"), gbps);
    f.fig(
        &format!("{p}_settled_gbps"),
        set.raw_bytes as f64 / settle / 1e9,
    );
    f.fig(&format!("{p}_node_cpu_s_per_gib"), cpu / gib);
    f.fig(&format!("{p}_client_cpu_s_per_gib"), client_cpu / gib);
    f.fig(&format!("{p}_net_bytes_per_gib"), net as f64 / gib);
    f.fig(&format!("{p}_owed"), owed as f64);
    f.fig(
        &format!("{p}_copies_per_chunk"),
        counts.iter().sum::<u64>() as f64 / n as f64,
    );
    for (i, x) in counts.iter().enumerate() {
        f.fig(&format!("{p}_chunks_n{}", i + 1), *x as f64);
    }

    if c == 3 && !a.no_repair {
        let ids: Vec<ChunkId> = set.chunks.iter().map(|x| x.id).collect();
        let stored = set.wire_bytes;
        drop(calls);
        drop(set);
        repair(&mut cl, &mut client, &mut stats, &ids, stored, f)?;
    }
    drop(stats);
    drop(client);
    drop(cl);
    Ok(())
}

/// A 4th node joins the copies-3 hive: time until it holds its share.
fn repair(
    cl: &mut Cluster,
    client: &mut HiveClient,
    stats: &mut Vec<HiveClient>,
    ids: &[ChunkId],
    stored: u64,
    f: &mut Figs,
) -> Result<()> {
    let n = ids.len() as u64;
    let old = cl.nodes.len();
    let logs0: Vec<u64> = cl.nodes.iter().map(|p| file_len(&p.log)).collect();
    let cpu0 = cpu_sum(&cl.nodes)?;
    let t0 = Instant::now();
    // `join` waits for the join to finish; the repair starts as soon as the map has the
    // node, so the clock runs from here.
    let i = cl.join(false)?;
    let joined = t0.elapsed().as_secs_f64();
    stats.push(connect(&cl.nodes[i])?);
    wait_map(client, stats, old + 1)?;
    let map = client.hive_map().clone();
    let me = cl.nodes[i].raft_id;
    let want = ids
        .iter()
        .filter(|id| map.replicas_of(id, 3).contains(&me))
        .count() as u64;
    println!(
        "n{} (node {me}) joined in {joined:.1}s; map epoch {}; its share: {want} of {n} chunks ({:.3} of the replica slots)",
        i + 1,
        map.epoch,
        want as f64 / (3 * n) as f64
    );
    let (mut last, mut grew) = (0u64, Instant::now());
    let mut first: Option<f64> = None;
    let have = loop {
        check_stop()?;
        let s = node_stats(&mut stats[i])?;
        if s.chunks > last {
            last = s.chunks;
            grew = Instant::now();
            first.get_or_insert(t0.elapsed().as_secs_f64());
        }
        // Done when it holds its share (or, past it, has not grown for 3 s).
        let quiet = Duration::from_millis(if s.chunks == want { 0 } else { 3000 });
        if s.chunks >= want && grew.elapsed() >= quiet {
            break s;
        }
        if grew.elapsed() > REPAIR_STALL {
            bail!(
                "repair stalled: the new node holds {} of its {want} chunks after {:.0}s",
                s.chunks,
                t0.elapsed().as_secs_f64()
            );
        }
        for p in cl.nodes.iter_mut() {
            p.check_alive()?;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let secs = t0.elapsed().as_secs_f64();
    // The new node's CPU counts from its start (after t0).
    let cpu = cpu_sum(&cl.nodes)? - cpu0;
    // Let the old nodes' passes end, for their logged counters.
    let t1 = Instant::now();
    loop {
        let idle = cl.nodes[..old]
            .iter()
            .all(|p| repair_state(&p.dir).is_some_and(|(run, e)| !run && e >= map.epoch));
        if idle {
            break;
        }
        if t1.elapsed() > Duration::from_secs(60) {
            f.note("repair: old nodes' passes still running 60 s after the new node had its share; their logged copies are counted as far as logged".into());
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    let (mut passes, mut sent, mut sent_bytes) = (0, 0, 0);
    for (p, from) in cl.nodes[..old].iter().zip(&logs0) {
        let (a, b, c) = repair_log(&p.log, *from);
        passes += a;
        sent += b;
        sent_bytes += c;
    }
    // What reached the new node: every chunk it was offered (stored or duplicate); all
    // chunks are the same size.
    let per_chunk = have.stored_bytes as f64 / have.chunks.max(1) as f64;
    let received = have.puts;
    let moved = have.stored_bytes as f64 + have.dups as f64 * per_chunk;
    let gib = moved / GIB;
    let rate = gib / (secs / 60.0);
    let frac = moved / (3 * stored) as f64;
    println!(
        "repair: n{} holds {} chunks ({} bytes) {secs:.1}s after the join (first chunk at {:.1}s); it was sent {received} copies ({} duplicates) = {gib:.3} GiB: {rate:.2} GiB/min; {frac:.4} of the stored replica bytes moved; node cpu {cpu:.2}s = {:.3} cpu-s per moved GiB",
        i + 1,
        have.chunks,
        have.stored_bytes,
        first.unwrap_or(f64::NAN),
        have.dups,
        cpu / gib
    );
    println!(
        "  old nodes' logs: {passes} pass(es) that copied: {sent} copies, {sent_bytes} bytes (with {} bytes of framing per chunk)",
        hivefs_net::proto::PUT_CHUNK_OVERHEAD_BYTES
    );
    if sent != received {
        f.note(format!(
            "repair: the old nodes logged {sent} copies; the new node was offered {received}"
        ));
    }
    if have.dups > 0 {
        f.note(format!(
            "repair: {} copies reached the new node twice",
            have.dups
        ));
    }
    f.fig("repair_gib_per_min", rate);
    f.fig("repair_secs", secs);
    f.fig("repair_join_secs", joined);
    f.fig("repair_moved_gib", gib);
    f.fig("repair_copies_received", received as f64);
    f.fig("repair_copies_duplicate", have.dups as f64);
    f.fig("repair_copies_logged", sent as f64);
    f.fig("repair_new_node_chunks", have.chunks as f64);
    f.fig("repair_new_node_want_chunks", want as f64);
    f.fig("repair_fraction_moved", frac);
    f.fig("repair_node_cpu_s_per_gib", cpu / gib);
    if let Some(t) = first {
        f.fig(
            "repair_copy_gib_per_min",
            gib / ((secs - t).max(1e-3) / 60.0),
        );
    }
    Ok(())
}

fn fmt(name: &str, v: f64) -> String {
    if name.contains("chunks")
        || name.starts_with("repair_copies")
        || name.ends_with("_owed")
        || name.contains("net_bytes")
    {
        format!("{v:.0}")
    } else {
        format!("{v:.4}")
    }
}

fn summary(f: &Figs, a: &ClusterArgs, runs: usize) {
    println!("\n== summary (medians of {runs} run(s); GB = 1e9 bytes, GiB = 2^30)");
    println!("{:<40} {:>14}   per run", "figure", "median");
    for (name, v) in &f.figs {
        let per: Vec<String> = v.iter().map(|x| fmt(name, *x)).collect();
        println!(
            "{:<40} {:>14}   [{}]",
            name,
            fmt(name, util::median(v)),
            per.join(", ")
        );
    }
    for n in &f.notes {
        println!("NOTE: {n}");
    }
    println!("\n== machine-readable");
    let g = |name: &str| {
        f.figs
            .get(name)
            .map(|v| util::median(v))
            .filter(|x| x.is_finite())
            .map_or("NA".to_string(), |x| fmt(name, x))
    };
    for &c in &a.copies {
        for k in [
            "gbps",
            "node_cpu_s_per_gib",
            "net_bytes_per_gib",
            "copies_per_chunk",
            "chunks_n1",
            "chunks_n2",
            "chunks_n3",
            "owed",
        ] {
            let name = format!("cluster_c{c}_{k}");
            println!("figure {name} {}", g(&name));
        }
    }
    if a.copies.contains(&3) && !a.no_repair {
        for k in [
            "repair_gib_per_min",
            "repair_moved_gib",
            "repair_secs",
            "repair_fraction_moved",
            "repair_node_cpu_s_per_gib",
        ] {
            println!("figure {k} {}", g(k));
        }
    }
}
