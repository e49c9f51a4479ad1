//! `hive-perf`: HiveFS benchmarks. See perf/README.md.

mod chunks;
mod cluster;
mod fs;
mod limits;
mod node;
mod pipeline;
mod util;

use anyhow::{bail, Context, Result};
use chunks::{DataKind, Phase};
use clap::{Parser, Subcommand, ValueEnum};
use hivefs_client::hive::HiveClient;
use hivefs_net::chunk::{ChunkId, Codec};
use limits::{FioJob, StreamKind};
use node::{NodeInfo, SpawnedNode};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Parser)]
#[command(
    name = "hive-perf",
    version,
    about = "HiveFS benchmarks: chunk put/get/has against a node, the chunking pipeline, fio and loopback TCP limits"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    #[command(flatten)]
    o: Opts,
}

#[derive(clap::Args, Clone)]
struct Opts {
    /// Attach to a running node: its data directory (token, CA, ports).
    #[arg(long, global = true)]
    node_dir: Option<PathBuf>,
    /// The attached node serves plain TCP (`hive run --insecure`).
    #[arg(long, global = true)]
    insecure: bool,
    /// Pid of the attached node, for node CPU accounting.
    #[arg(long, global = true)]
    node_pid: Option<i32>,
    /// Create and run throw-away node(s) under --work-dir (bench all: one TLS and one
    /// --insecure; other commands: one, TLS unless --insecure).
    #[arg(long, global = true)]
    spawn: bool,
    /// The `hive` binary for --spawn (default: next to this executable).
    #[arg(long, global = true)]
    hive_bin: Option<PathBuf>,
    /// Where spawned nodes and the fio file live (must allow O_DIRECT, e.g. ext4).
    #[arg(long, global = true, default_value = "/var/tmp")]
    work_dir: PathBuf,
    /// Size of a spawned node's (sparse) device file.
    #[arg(long, global = true, default_value = "12G")]
    node_size: String,
    /// Override a key of a spawned node's hive.toml (repeatable), e.g.
    /// `--node-set commit_max_bytes=8388608`.
    #[arg(long, global = true, value_name = "KEY=VALUE")]
    node_set: Vec<String>,
    /// Shards of a spawned node.
    #[arg(long, global = true, default_value_t = 1)]
    shards: u16,
    /// Core the node (and the TCP sink) is pinned to.
    #[arg(long, global = true, default_value_t = 1)]
    node_core: usize,
    /// Core this client is pinned to.
    #[arg(long, global = true, default_value_t = 0)]
    client_core: usize,
    /// Repetitions; figures are the medians.
    #[arg(long, global = true, default_value_t = 3)]
    runs: usize,
    /// Also measure fio and the loopback TCP stream, and print the ratios.
    #[arg(long, global = true)]
    vs_fio: bool,
    /// Keep spawned nodes' directories and the fio file.
    #[arg(long, global = true)]
    keep: bool,
    /// Which chunk drivers: the client library, the raw framed driver, or both
    /// (default: both for `bench all`, client otherwise).
    #[arg(long, global = true, value_enum)]
    driver: Option<Driver>,
    /// Bytes of unique chunks per put phase (default 1G); `fs`: bytes of the file written
    /// and read (default 2G).
    #[arg(long, global = true)]
    bytes: Option<String>,
    /// Bytes of random gets per get phase.
    #[arg(long, global = true, default_value = "1G")]
    get_bytes: String,
    /// Chunk size for put/get.
    #[arg(long, global = true, default_value = "64K")]
    chunk_size: String,
    /// Chunk payloads.
    #[arg(long, global = true, value_enum, default_value_t = DataKind::Random)]
    data: DataKind,
    /// Client-library put calls: chunks per `HiveClient::put` call, in bytes.
    #[arg(long, global = true, default_value = "16M")]
    call_bytes: String,
    /// Client-library get calls: ids per `get_stored` / `get` call.
    #[arg(long, global = true, default_value_t = 256)]
    call_ids: usize,
    /// Ids per has phase.
    #[arg(long, global = true, default_value = "4M")]
    has_ids: String,
    /// Ids per `HiveClient::has` call (the client sends them as requests of 2048).
    #[arg(long, global = true, default_value_t = 32768)]
    has_call_ids: usize,
    /// Ids per raw `Has` request.
    #[arg(long, global = true, default_value_t = 2048)]
    has_batch: usize,
    /// Fraction of has ids the node lacks.
    #[arg(long, global = true, default_value_t = 0.5)]
    has_miss: f64,
    /// Raw driver: requests in flight per shard (capped by the node's credits).
    #[arg(long, global = true, default_value_t = 16)]
    depth: usize,
    /// Raw driver: bytes per `Put` request.
    #[arg(long, global = true, default_value = "1M")]
    put_request_bytes: String,
    /// Pipeline input: a file (default: generated data of --pipeline-bytes).
    #[arg(long, global = true)]
    file: Option<PathBuf>,
    #[arg(long, global = true, default_value = "512M")]
    pipeline_bytes: String,
    #[arg(long, global = true, value_enum, default_value_t = CodecArg::Lz4)]
    codec: CodecArg,
    /// fio test file size and seconds per job.
    #[arg(long, global = true, default_value = "4G")]
    fio_size: String,
    #[arg(long, global = true, default_value_t = 5)]
    fio_secs: u64,
    /// Seconds per loopback TCP stream.
    #[arg(long, global = true, default_value_t = 3.0)]
    tcp_secs: f64,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Driver {
    Client,
    Raw,
    Both,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum CodecArg {
    Raw,
    Lz4,
    Zstd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Chunk benchmarks against a node.
    Chunks {
        #[command(subcommand)]
        what: ChunkCmd,
    },
    /// Chunk + hash + compress a buffer (no network): GB/s on one core and on all.
    Pipeline,
    /// fio on the work dir's device and the loopback TCP streams only.
    Limits,
    /// Everything in one run.
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
    /// File-system benchmarks through a FUSE mount (`hi`), each against its ceiling.
    Fs {
        #[command(subcommand)]
        what: fs::FsCmd,
        #[command(flatten)]
        args: Box<fs::FsArgs>,
    },
    /// Replication on throw-away 3-node hives (copies 1, 2, 3): GB/s, node CPU-s and
    /// network bytes per logical GiB; repair throughput when a 4th node joins.
    Cluster {
        #[command(flatten)]
        args: cluster::ClusterArgs,
    },
    /// (internal) Receiver of a loopback stream.
    #[command(hide = true)]
    TcpSink {
        #[arg(long, value_enum)]
        kind: StreamKind,
        #[arg(long)]
        tls_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ChunkCmd {
    /// Unique random chunks, precomputed: GB/s, latency, node CPU-s/GiB.
    PutUnique,
    /// Random gets of stored chunks (get_stored, and verified get).
    Get,
    /// `has` in batches: ids/s per shard, batch latency.
    Has,
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Pipeline, limits (with --vs-fio), put/get/has with TLS and --insecure.
    All,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn check_stop() -> Result<()> {
    if STOP.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

fn main() {
    hivefs_net::tune_allocator();
    let cli = Cli::parse();
    if let Cmd::TcpSink { kind, tls_dir } = &cli.cmd {
        if let Err(e) = limits::sink_main(*kind, tls_dir.as_deref()) {
            eprintln!("tcp-sink: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    if let Err(e) = real_main(cli) {
        eprintln!("hive-perf: {e:#}");
        std::process::exit(1);
    }
}

/// What to run.
#[derive(Default)]
struct Plan {
    pipeline: bool,
    limits: bool,
    put: bool,
    get: bool,
    has: bool,
    client: bool,
    raw: bool,
    /// Per node: insecure?
    modes: Vec<bool>,
}

/// Everything measured, by figure.
#[derive(Default)]
struct Results {
    /// figure -> per-run values.
    figs: BTreeMap<String, Vec<f64>>,
    /// (phase name, mode) -> per-run phases.
    phases: BTreeMap<(String, String), Vec<Phase>>,
    notes: Vec<String>,
}

impl Results {
    fn fig(&mut self, name: &str, v: f64) {
        self.figs.entry(name.to_string()).or_default().push(v);
    }

    fn med(&self, name: &str) -> Option<f64> {
        self.figs
            .get(name)
            .map(|v| util::median(v))
            .filter(|x| x.is_finite())
    }

    fn phase(&mut self, p: Phase) {
        let suffix = if p.mode == "tls" {
            String::new()
        } else {
            format!("_{}", p.mode)
        };
        let per_shard = p.ops_per_s() / p.shards.max(1) as f64;
        if p.bytes > 0 {
            self.fig(&format!("{}_gbps{suffix}", p.name), p.gbps());
            if let Some(c) = p.node_cpu_per_gib() {
                self.fig(&format!("{}_node_cpu_s_per_gib{suffix}", p.name), c);
            }
            if let Some(c) = p.client_cpu_per_gib() {
                self.fig(&format!("{}_client_cpu_s_per_gib{suffix}", p.name), c);
            }
        } else {
            self.fig(
                &format!("{}_ids_per_s_per_shard{suffix}", p.name),
                per_shard,
            );
        }
        self.phases
            .entry((p.name.clone(), p.mode.clone()))
            .or_default()
            .push(p);
    }

    fn note(&mut self, s: String) {
        println!("NOTE: {s}");
        self.notes.push(s);
    }
}

/// A node under test and the chunks stored on it by this process.
struct NodeCtx {
    info: NodeInfo,
    _spawned: Option<SpawnedNode>,
    client: Option<HiveClient>,
    stored: Vec<ChunkId>,
}

impl NodeCtx {
    fn client(&mut self) -> Result<&mut HiveClient> {
        if self.client.is_none() {
            self.client = Some(chunks::connect(&self.info)?);
        }
        Ok(self.client.as_mut().expect("connected"))
    }
}

/// Removes the work directory at the end unless kept.
struct WorkDir {
    path: PathBuf,
    keep: bool,
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn seed_for(base: u64, run: usize, what: &str, mode: &str) -> u64 {
    let mut h = base ^ (run as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for b in what.bytes().chain(mode.bytes()) {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    h
}

fn real_main(cli: Cli) -> Result<()> {
    let o = cli.o.clone();
    let cpus = util::cpu_count();
    if o.client_core >= cpus || o.node_core >= cpus {
        bail!(
            "--client-core {} / --node-core {} out of range: this machine has {cpus} cores",
            o.client_core,
            o.node_core
        );
    }
    if o.runs == 0 {
        bail!("--runs must be at least 1");
    }
    if let Cmd::Fs { what, args } = &cli.cmd {
        // Nothing is pinned: hi, the node and the benchmark share the cores as on a host.
        return fs::run(*what, args, &o);
    }
    if let Cmd::Cluster { args } = &cli.cmd {
        // Nothing is pinned: the client and three nodes share the cores.
        return cluster::run(args, &o);
    }
    // Pin before any thread exists: every thread spawned later inherits it.
    util::pin_current_thread(&[o.client_core])?;

    let mut plan = Plan::default();
    let default_driver = match &cli.cmd {
        Cmd::Bench { .. } => Driver::Both,
        _ => Driver::Client,
    };
    let driver = o.driver.unwrap_or(default_driver);
    plan.client = driver != Driver::Raw;
    plan.raw = driver != Driver::Client;
    plan.limits = o.vs_fio;
    match &cli.cmd {
        Cmd::Chunks { what } => match what {
            ChunkCmd::PutUnique => plan.put = true,
            ChunkCmd::Get => plan.get = true,
            ChunkCmd::Has => plan.has = true,
        },
        Cmd::Pipeline => plan.pipeline = true,
        Cmd::Limits => plan.limits = true,
        Cmd::Bench {
            what: BenchCmd::All,
        } => {
            plan.pipeline = true;
            plan.put = true;
            plan.get = true;
            plan.has = true;
        }
        Cmd::TcpSink { .. } | Cmd::Fs { .. } | Cmd::Cluster { .. } => unreachable!(),
    }
    let needs_node = plan.put || plan.get || plan.has;
    if needs_node {
        plan.modes = match (&cli.cmd, o.spawn) {
            (Cmd::Bench { .. }, true) => vec![false, true],
            _ => vec![o.insecure],
        };
        if !o.spawn && o.node_dir.is_none() {
            bail!("give --spawn or --node-dir DIR");
        }
    }

    let bytes = util::parse_size(o.bytes.as_deref().unwrap_or("1G"))?;
    let get_bytes = util::parse_size(&o.get_bytes)?;
    let chunk_bytes = util::parse_size(&o.chunk_size)? as usize;
    if chunk_bytes == 0 || chunk_bytes > hivefs_net::chunk::MAX_CHUNK_RAW_BYTES {
        bail!(
            "--chunk-size must be 1..={}",
            hivefs_net::chunk::MAX_CHUNK_RAW_BYTES
        );
    }
    let call_bytes = util::parse_size(&o.call_bytes)?;
    let has_ids = util::parse_count(&o.has_ids)? as usize;
    let put_req_bytes = util::parse_size(&o.put_request_bytes)? as usize;
    let base_seed = util::os_seed();

    println!("hive-perf: {cpus} cores; client pinned to core {}, node and sinks to core {}; {} run(s), medians reported", o.client_core, o.node_core, o.runs);
    println!("load average at start: {}", loadavg());
    let mut res = Results::default();

    let work = if o.spawn || plan.limits {
        let p = o.work_dir.join(format!("hive-perf-{}", std::process::id()));
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        Some(WorkDir {
            path: p,
            keep: o.keep,
        })
    } else {
        None
    };

    // --- The pipeline (no network).
    if plan.pipeline {
        let pb = util::parse_size(&o.pipeline_bytes)?;
        let data = pipeline::input(o.file.as_deref(), pb, base_seed)?;
        let codec = match o.codec {
            CodecArg::Raw => Codec::Raw,
            CodecArg::Lz4 => Codec::Lz4,
            CodecArg::Zstd => Codec::Zstd,
        };
        println!(
            "\n== pipeline: {} of {}, codec {:?}, chunks 16/64/256 KiB",
            util::fmt_size(data.len() as u64),
            o.file
                .as_ref()
                .map_or("generated data".to_string(), |f| f.display().to_string()),
            codec
        );
        for r in 0..o.runs {
            check_stop()?;
            for threads in [1, cpus] {
                match pipeline::run(&data, threads, codec) {
                    Ok(p) => {
                        println!(
                            "run {} threads {}: {:.3} GB/s ({} chunks, stored/raw {:.2}, {:.2} cpu-s, {:.3} GB/s per cpu-second)",
                            r + 1,
                            p.threads,
                            p.gbps(),
                            p.chunks,
                            p.stored as f64 / p.bytes as f64,
                            p.cpu,
                            p.bytes as f64 / p.cpu.max(1e-9) / 1e9
                        );
                        if threads == 1 {
                            res.fig("pipeline_gbps_1core", p.gbps());
                        } else {
                            res.fig("pipeline_gbps_all_cores", p.gbps());
                            res.fig("pipeline_gbps_per_core_all", p.gbps() / cpus as f64);
                        }
                    }
                    Err(e) => res.note(format!(
                        "pipeline run {} ({threads} threads) failed: {e:#}",
                        r + 1
                    )),
                }
            }
        }
    }

    // --- Nodes.
    let mut nodes: Vec<NodeCtx> = Vec::new();
    if needs_node {
        if o.spawn {
            let bin = node::find_hive_bin(o.hive_bin.as_deref())?;
            let overrides: Vec<(String, String)> = o
                .node_set
                .iter()
                .map(|kv| {
                    kv.split_once('=')
                        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                        .with_context(|| format!("--node-set {kv}: want KEY=VALUE"))
                })
                .collect::<Result<_>>()?;
            if !overrides.is_empty() {
                println!("spawned nodes' hive.toml overrides: {overrides:?}");
            }
            let wd = &work.as_ref().expect("work dir").path;
            for &insecure in &plan.modes {
                let dir = wd.join(if insecure {
                    "node-insecure"
                } else {
                    "node-tls"
                });
                let t0 = std::time::Instant::now();
                let sp = SpawnedNode::spawn(
                    &bin,
                    &dir,
                    &o.node_size,
                    o.shards,
                    insecure,
                    Some(o.node_core),
                    o.keep,
                    &overrides,
                )?;
                println!(
                    "started {} in {:.1}s: {}",
                    sp.info.label,
                    t0.elapsed().as_secs_f64(),
                    dir.display()
                );
                let info = sp.info.clone();
                nodes.push(NodeCtx {
                    info,
                    _spawned: Some(sp),
                    client: None,
                    stored: Vec::new(),
                });
            }
        } else {
            let dir = o.node_dir.as_ref().expect("checked");
            let info = NodeInfo::from_dir(dir, o.insecure, o.node_pid)?;
            if info.pid.is_none() {
                res.note(info.no_pid_reason.clone());
            }
            nodes.push(NodeCtx {
                info,
                _spawned: None,
                client: None,
                stored: Vec::new(),
            });
        }
        for n in &mut nodes {
            let shards = n.client()?.map().shard_count;
            n.info.shards = shards;
        }
    }

    // --- Limits: fio and the loopback streams.
    let fio = if plan.limits {
        match limits::fio_bin() {
            Ok(p) => Some(p),
            Err(why) => {
                res.note(format!("fio figures missing: {why}"));
                None
            }
        }
    } else {
        None
    };
    let sink_tls = if plan.limits {
        let d = work.as_ref().expect("work dir").path.join("sink-tls");
        Some((d.clone(), limits::write_sink_tls(&d)?))
    } else {
        None
    };
    let fio_size = util::parse_size(&o.fio_size)?;

    for r in 0..o.runs {
        check_stop()?;
        if plan.limits {
            println!("\n== limits, run {}", r + 1);
            let wd = &work.as_ref().expect("work dir").path;
            if let Some(fio) = &fio {
                let file = wd.join("fio.dat");
                for (job, name) in [
                    (FioJob::SeqWrite, "fio_write_gbps"),
                    (FioJob::RandRead, "fio_read_gbps"),
                ] {
                    check_stop()?;
                    match limits::fio_run(fio, job, &file, fio_size, o.fio_secs, o.node_core) {
                        Ok(g) => {
                            println!(
                                "{name:<22} {g:.3}  ({job:?}, O_DIRECT, depth 16, {} file, {}s)",
                                util::fmt_size(fio_size),
                                o.fio_secs
                            );
                            res.fig(name, g);
                        }
                        Err(e) => res.note(format!("fio {job:?} run {} failed: {e:#}", r + 1)),
                    }
                }
            }
            let (tls_dir, fp) = sink_tls.as_ref().expect("sink tls");
            for (kind, name) in [
                (StreamKind::Raw, "tcp_gbps"),
                (StreamKind::Framed, "framed_tcp_gbps"),
                (StreamKind::Tls, "framed_tls_gbps"),
            ] {
                check_stop()?;
                match limits::stream(
                    kind,
                    o.tcp_secs,
                    o.node_core,
                    Some((tls_dir.as_path(), fp.as_str())),
                ) {
                    Ok(st) => {
                        println!(
                            "{name:<22} {:.3}  ({kind:?} loopback stream, 1 MiB writes, {:.1}s; cpu-s/GiB sender {:.3} ({:.0}% busy), sink {:.3} ({:.0}% busy))",
                            st.gbps,
                            st.secs,
                            st.sender_cpu_per_gib,
                            100.0 * st.sender_cpu_per_gib * st.gbps * 1e9 / util::GIB,
                            st.sink_cpu_per_gib,
                            100.0 * st.sink_cpu_per_gib * st.gbps * 1e9 / util::GIB
                        );
                        res.fig(name, st.gbps);
                        res.fig(&format!("{name}_sink_cpu_s_per_gib"), st.sink_cpu_per_gib);
                    }
                    Err(e) => res.note(format!("{kind:?} stream run {} failed: {e:#}", r + 1)),
                }
            }
        }

        for n in nodes.iter_mut() {
            let mode = n.info.mode();
            println!("\n== {} node, run {}", mode, r + 1);
            if let Err(e) = node_run(
                n,
                &plan,
                &o,
                &mut res,
                r,
                base_seed,
                bytes,
                get_bytes,
                chunk_bytes,
                call_bytes,
                has_ids,
                put_req_bytes,
            ) {
                res.note(format!("{mode} node run {}: {e:#}", r + 1));
                n.client = None;
            }
        }
    }

    // Stop nodes (spawned ones are shut down and removed) before the summary.
    for n in nodes.iter_mut() {
        n.client = None;
        if let Some(mut sp) = n._spawned.take() {
            if let Err(e) = sp.stop() {
                res.note(format!("stopping {}: {e:#}", n.info.label));
            }
        }
    }
    drop(nodes);
    println!(
        "\nload average at end: {} (other processes on this machine compete for the same cores)",
        loadavg()
    );
    summary(&res, &plan, &o);
    drop(work);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn node_run(
    n: &mut NodeCtx,
    plan: &Plan,
    o: &Opts,
    res: &mut Results,
    r: usize,
    base_seed: u64,
    bytes: u64,
    get_bytes: u64,
    chunk_bytes: usize,
    call_bytes: u64,
    has_ids: usize,
    put_req_bytes: usize,
) -> Result<()> {
    let mode = n.info.mode().to_string();
    let info = n.info.clone();
    let key = n.client()?.map().dedupe_key;
    let map = n.client()?.map().clone();
    let run_phase =
        |res: &mut Results, what: &str, f: &mut dyn FnMut() -> Result<Phase>| -> Result<()> {
            check_stop()?;
            match f() {
                Ok(p) => {
                    println!("{}", p.report());
                    res.phase(p);
                    Ok(())
                }
                Err(e) => {
                    res.note(format!("{what} ({mode}) run {} failed: {e:#}", r + 1));
                    Err(e)
                }
            }
        };

    let populate = |n: &mut NodeCtx, total: u64, tag: &str| -> Result<()> {
        let set = chunks::make_chunks(
            &key,
            total,
            chunk_bytes,
            o.data,
            seed_for(base_seed, r, tag, n.info.mode()),
        );
        let (results, _) = n.client()?.put(&set.chunks)?;
        if results.contains(&hivefs_net::proto::PutResult::Rejected) {
            bail!("populate: a chunk was rejected");
        }
        n.stored.extend(set.chunks.iter().map(|c| c.id));
        Ok(())
    };

    if plan.put {
        if plan.client {
            let set = chunks::make_chunks(
                &key,
                bytes,
                chunk_bytes,
                o.data,
                seed_for(base_seed, r, "put", &mode),
            );
            let ids: Vec<ChunkId> = set.chunks.iter().map(|c| c.id).collect();
            let client = n.client()?;
            let ok = run_phase(res, "put_unique", &mut || {
                chunks::put_hive(client, &info, &set, call_bytes)
            })
            .is_ok();
            if ok {
                n.stored.extend(ids);
            } else {
                n.client = None;
            }
        }
        if plan.raw {
            let set = chunks::make_chunks(
                &key,
                bytes,
                chunk_bytes,
                o.data,
                seed_for(base_seed, r, "rawput", &mode),
            );
            let ids: Vec<ChunkId> = set.chunks.iter().map(|c| c.id).collect();
            if run_phase(res, "raw_put_unique", &mut || {
                chunks::put_raw(&info, &map, &set, put_req_bytes, o.depth)
            })
            .is_ok()
            {
                n.stored.extend(ids);
            }
        }
    }

    if (plan.get || plan.has) && n.stored.is_empty() {
        let total = bytes.min(get_bytes).max(chunk_bytes as u64);
        println!(
            "(populating {} of chunks for gets/has, untimed)",
            util::fmt_size(total)
        );
        populate(n, total, "populate")?;
    }

    if plan.get {
        let count = (get_bytes as usize / chunk_bytes).max(1);
        let picks = chunks::random_picks(&n.stored, count, seed_for(base_seed, r, "get", &mode));
        if plan.client {
            for verify in [false, true] {
                let client = n.client()?;
                if run_phase(
                    res,
                    if verify { "get_verified" } else { "get" },
                    &mut || chunks::get_hive(client, &info, &picks, o.call_ids, verify),
                )
                .is_err()
                {
                    n.client = None;
                }
            }
        }
        if plan.raw {
            let _ = run_phase(res, "raw_get", &mut || {
                chunks::get_raw(&info, &map, &picks, o.depth)
            });
        }
    }

    if plan.has {
        let (ids, expect) = chunks::has_workload(
            &n.stored,
            has_ids,
            o.has_miss.clamp(0.0, 1.0),
            seed_for(base_seed, r, "has", &mode),
        );
        if plan.client {
            let client = n.client()?;
            if run_phase(res, "has", &mut || {
                chunks::has_hive(client, &info, &ids, &expect, o.has_call_ids)
            })
            .is_err()
            {
                n.client = None;
            }
        }
        if plan.raw {
            let _ = run_phase(res, "raw_has", &mut || {
                chunks::has_raw(&info, &map, &ids, &expect, o.has_batch, o.depth)
            });
        }
    }
    Ok(())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn fmt_fig(name: &str, v: f64) -> String {
    if name.contains("ids_per_s") {
        format!("{v:.0}")
    } else {
        format!("{v:.4}")
    }
}

fn summary(res: &Results, plan: &Plan, o: &Opts) {
    println!(
        "\n== summary (medians of {} run(s); GB = 1e9 bytes, GiB = 2^30)",
        o.runs
    );
    println!("{:<44} {:>12}   per run", "figure", "median");
    for (name, v) in &res.figs {
        let runs: Vec<String> = v.iter().map(|x| fmt_fig(name, *x)).collect();
        println!(
            "{:<44} {:>12}   [{}]",
            name,
            fmt_fig(name, util::median(v)),
            runs.join(", ")
        );
    }
    if !res.phases.is_empty() {
        println!("\nlatency over all runs (merged histograms):");
        for ((name, mode), ps) in &res.phases {
            let mut lat = util::Lat::new();
            for p in ps {
                lat.add(&p.lat);
            }
            let threads: Vec<String> = {
                let mut agg: BTreeMap<String, f64> = BTreeMap::new();
                for p in ps {
                    for (t, c) in &p.node_threads {
                        *agg.entry(t.clone()).or_default() += c / ps.len() as f64;
                    }
                }
                agg.into_iter()
                    .filter(|(_, c)| *c >= 0.005)
                    .map(|(t, c)| format!("{t} {c:.2}s"))
                    .collect()
            };
            println!(
                "  {name:<16} {mode:<9} {}: {}",
                ps[0].lat_unit,
                lat.describe()
            );
            if !threads.is_empty() {
                println!(
                    "  {:<26} node cpu per run by thread: {}",
                    "",
                    threads.join(", ")
                );
            }
        }
    }
    for n in &res.notes {
        println!("NOTE: {n}");
    }

    // Machine-readable lines. Unsuffixed node figures are the TLS node's (the insecure
    // node's when it is the only one measured).
    let headline = if plan.modes.contains(&false) || plan.modes.is_empty() {
        ""
    } else {
        "_insecure"
    };
    let g = |n: &str| res.med(n);
    let limit = |fio: Option<f64>| -> Option<f64> {
        match (fio, g("tcp_gbps")) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    };
    let put_limit = limit(g("fio_write_gbps"));
    let get_limit = limit(g("fio_read_gbps"));
    let na = |v: Option<f64>, name: &str| v.map_or("NA".to_string(), |x| fmt_fig(name, x));
    println!(
        "\n== machine-readable (node figures: {} node; limit = min(fio, tcp))",
        if headline.is_empty() {
            "TLS"
        } else {
            "insecure"
        }
    );
    let mut lines: Vec<String> = Vec::new();
    if plan.put || plan.get || plan.has {
        let modes: Vec<&str> = if headline.is_empty() && plan.modes.contains(&true) {
            vec!["", "_insecure"]
        } else {
            vec![headline]
        };
        for (i, sfx) in modes.iter().enumerate() {
            let tag = |base: &str| {
                if i == 0 {
                    base.to_string()
                } else {
                    format!("{base}{sfx}")
                }
            };
            if plan.put && plan.limits {
                let v = g(&format!("put_unique_gbps{sfx}"))
                    .zip(put_limit)
                    .map(|(a, l)| a / l);
                lines.push(format!(
                    "ratio {} {}",
                    if i == 0 {
                        "put_unique_vs_limit".to_string()
                    } else {
                        format!("put_unique{sfx}_vs_limit")
                    },
                    na(v, "ratio")
                ));
            }
            if plan.get && plan.limits {
                let v = g(&format!("get_gbps{sfx}"))
                    .zip(get_limit)
                    .map(|(a, l)| a / l);
                lines.push(format!(
                    "ratio {} {}",
                    if i == 0 {
                        "get_vs_limit".to_string()
                    } else {
                        format!("get{sfx}_vs_limit")
                    },
                    na(v, "ratio")
                ));
            }
            if plan.has {
                lines.push(format!(
                    "figure {} {}",
                    tag("has_ids_per_s_per_shard"),
                    na(g(&format!("has_ids_per_s_per_shard{sfx}")), "ids_per_s")
                ));
            }
            if plan.put {
                lines.push(format!(
                    "figure {} {}",
                    tag("node_cpu_s_per_gib"),
                    na(g(&format!("put_unique_node_cpu_s_per_gib{sfx}")), "x")
                ));
            }
            if plan.get {
                lines.push(format!(
                    "figure {} {}",
                    tag("node_cpu_s_per_gib_get"),
                    na(g(&format!("get_node_cpu_s_per_gib{sfx}")), "x")
                ));
            }
            if plan.put {
                lines.push(format!(
                    "figure {} {}",
                    tag("put_unique_gbps"),
                    na(g(&format!("put_unique_gbps{sfx}")), "x")
                ));
            }
            if plan.get {
                lines.push(format!(
                    "figure {} {}",
                    tag("get_gbps"),
                    na(g(&format!("get_gbps{sfx}")), "x")
                ));
            }
        }
    }
    if plan.limits {
        for f in [
            "fio_write_gbps",
            "fio_read_gbps",
            "tcp_gbps",
            "framed_tcp_gbps",
            "framed_tls_gbps",
        ] {
            lines.push(format!("figure {f} {}", na(g(f), f)));
        }
        lines.push(format!("figure put_limit_gbps {}", na(put_limit, "x")));
        lines.push(format!("figure get_limit_gbps {}", na(get_limit, "x")));
    }
    if plan.pipeline {
        for f in ["pipeline_gbps_1core", "pipeline_gbps_all_cores"] {
            lines.push(format!("figure {f} {}", na(g(f), f)));
        }
    }
    if plan.raw {
        for sfx in ["", "_insecure"] {
            for (f, src) in [
                ("raw_put_unique_gbps", "raw_put_unique_gbps"),
                ("raw_get_gbps", "raw_get_gbps"),
                ("raw_has_ids_per_s_per_shard", "raw_has_ids_per_s_per_shard"),
            ] {
                if let Some(v) = g(&format!("{src}{sfx}")) {
                    lines.push(format!("figure {f}{sfx} {}", fmt_fig(f, v)));
                }
            }
        }
    }
    for l in &lines {
        println!("{l}");
    }

    if plan.limits && (plan.put || plan.get || plan.has) {
        println!("\n== acceptance (issue: medians of 3, same run)");
        let chk = |what: &str, v: Option<f64>, want: f64| match v {
            Some(x) => {
                let f = |v: f64| {
                    if want >= 1000.0 {
                        format!("{v:.0}")
                    } else {
                        format!("{v:.4}")
                    }
                };
                println!(
                    "{:<40} {:>14} (want >= {}) {}",
                    what,
                    f(x),
                    f(want),
                    if x >= want { "PASS" } else { "FAIL" }
                )
            }
            None => println!("{what:<40} {:>14} (not measured)", "NA"),
        };
        if plan.put {
            chk(
                "put_unique (TLS) / limit",
                g("put_unique_gbps").zip(put_limit).map(|(a, l)| a / l),
                0.7,
            );
        }
        if plan.get {
            chk(
                "get / limit",
                g("get_gbps").zip(get_limit).map(|(a, l)| a / l),
                0.7,
            );
        }
        if plan.has {
            chk(
                "has ids/s per shard",
                g("has_ids_per_s_per_shard"),
                1_000_000.0,
            );
        }
        if plan.put || plan.get {
            println!(
                "{:<40} put {} / get {} cpu-s/GiB",
                "node CPU-seconds per GiB reported",
                na(g("put_unique_node_cpu_s_per_gib"), "x"),
                na(g("get_node_cpu_s_per_gib"), "x")
            );
        }
    }
}
