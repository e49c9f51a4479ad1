//! `hive`: initialise, run and inspect a hive node.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use hivefs_engine::admin::Link;
use hivefs_engine::config::{self, InitOptions, NodeConfig};
use hivefs_engine::meta::peer::{PeerError, PeerLink};
use hivefs_engine::meta::version::speaks;
use hivefs_engine::node::Node;
use hivefs_net::meta::{self, Answer, Errno, MetaRequest, NodeSpec, PeerRequest, Query};
use hivefs_net::proto::{ErrorCode, Request, Response};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Parser)]
#[command(name = "hive", version, about = "HiveFS hive node")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a node: config, hive CA and node certificate, admin token, dedupe key, device format.
    Init {
        #[command(flatten)]
        node: NodeArgs,
        #[arg(long, default_value = "node-1")]
        node_id: String,
        #[arg(long, default_value_t = config::DEFAULT_BUCKETS)]
        buckets: u32,
    },
    /// Add a node to a running hive: fetch the hive's CA and dedupe key from it, make the
    /// data directory and device, start serving, and become a member of the metadata
    /// cluster (a voter while the hive has fewer than 5). Then run as `hive run` does;
    /// restart later with `hive run`. Run again on the same directory to finish a join
    /// that was interrupted.
    Join {
        /// Any node of the hive: its metadata port, HOST:PORT (a follower points to its leader).
        #[arg(long)]
        hive: String,
        /// The hive's admin token.
        #[arg(long)]
        token: String,
        /// SHA-256 fingerprint of the hive CA (as `hive init` printed it).
        #[arg(long)]
        ca: String,
        /// This node's name in the hive (default: node-HOST-METAPORT).
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Serve: one shard thread per configured shard, each on base_port + shard.
    Run {
        #[arg(long)]
        data: PathBuf,
        /// Plain TCP without TLS (measurements only).
        #[arg(long)]
        insecure: bool,
        /// io_uring SQPOLL: a kernel thread polls submissions (falls back with a logged reason).
        #[arg(long)]
        sqpoll: bool,
        /// io_uring IOPOLL: polled completions (falls back where refused, e.g. virtio).
        #[arg(long)]
        iopoll: bool,
        /// Override `[net]` of hive.toml for this run.
        #[command(flatten)]
        net: NetArgs,
    },
    /// The embedded default: a one-node hive in DATA (made on first use), volume
    /// `default`, mounted at MOUNTPOINT until Ctrl-C.
    Up {
        /// Where the hive keeps its files (created and initialised if it holds no hive).
        #[arg(long, default_value = "hive-data")]
        data: PathBuf,
        /// Size of the chunk device file made on first use, e.g. 16G (sparse).
        #[arg(long, default_value = "16G")]
        size: String,
        /// Where to mount volume `default`.
        #[arg(default_value = "hive")]
        mountpoint: PathBuf,
    },
    /// Check a running node: the namespace (tree, link counts, extents) and that every
    /// chunk a file references is stored (`--verify`: and reads back hashing to its id).
    /// Exit status 1 when anything is wrong.
    Fsck {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        verify: bool,
        #[arg(long)]
        insecure: bool,
    },
    /// Run a repair pass on this node now and follow it with a progress bar: every chunk
    /// it holds onto its replicas at its level, copies beyond the replicas released.
    /// (Passes also run by themselves on every map change and every 30 s.)
    Repair {
        #[arg(long)]
        data: PathBuf,
        /// Only ask for the pass; do not wait for it.
        #[arg(long)]
        no_wait: bool,
    },
    /// Scrub this node now: re-read every chunk it holds and check it against its id; bad
    /// copies are removed and repair copies good ones back (progress in `hive status`).
    /// Runs by itself every `scrub_every_secs` (hive.toml).
    Scrub {
        #[arg(long)]
        data: PathBuf,
    },
    /// Run one garbage collection on a running node and print what it freed.
    Gc {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        insecure: bool,
    },
    /// Rotate this node's certificate (a new key, issued by the hive CA); the running node
    /// presents it on new connections within a second, without a restart.
    Cert {
        #[command(subcommand)]
        cmd: CertCmd,
    },
    /// Rotate the hive CA without downtime: a new CA, cross-signed by the current one;
    /// every node installs it and a new node certificate from it within seconds, and
    /// presents the cross certificate and the old CA too, so clients pinning the old
    /// fingerprint keep working. Pin the new fingerprint for new mounts.
    Ca {
        #[command(subcommand)]
        cmd: CaCmd,
    },
    /// Access tokens: create (prints the secret once), list, revoke.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// Operate on a node of the cluster map: `remove` drains it (it takes no new data and
    /// its buckets move away); `state` sets a state by hand.
    Node {
        #[command(subcommand)]
        cmd: NodeCmd,
    },
    /// Per-shard and total figures of a running node.
    Status {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        json: bool,
        #[arg(long)]
        insecure: bool,
    },
}

/// Where and how a new node keeps and serves its data (`hive init`, `hive join`).
#[derive(clap::Args)]
struct NodeArgs {
    #[arg(long)]
    data: PathBuf,
    /// A file or block device for chunks (default DATA/chunks.dev).
    #[arg(long)]
    device: Option<PathBuf>,
    /// Size of a file device, e.g. 16G (sparse).
    #[arg(long)]
    size: Option<String>,
    /// Shards (one pinned thread each); default: one per core.
    #[arg(long)]
    shards: Option<u16>,
    #[arg(long, default_value_t = config::DEFAULT_BASE_PORT)]
    base_port: u16,
    /// The metadata port (where mounts connect); default: base_port - 1.
    #[arg(long)]
    meta_port: Option<u16>,
    #[arg(long, default_value = "127.0.0.1")]
    listen: String,
    /// The host other nodes and clients reach this node at (default: --listen).
    #[arg(long)]
    advertise: Option<String>,
    /// Failure zone (replicas go to distinct zones first).
    #[arg(long, default_value = "default")]
    zone: String,
    /// Segment size, e.g. 64M.
    #[arg(long, default_value = "64M")]
    segment_size: String,
    /// The copies of a volume created without `--copies` (each volume keeps its own): 3,
    /// 2 (a mirror) or 1 (tests only). `hive init` sets the hive's; a joining node takes
    /// the hive's.
    #[arg(long, default_value_t = config::default_copies(), value_parser = clap::value_parser!(u8).range(1..=8))]
    copies: u8,
    /// Copies durable before a write is acknowledged (at most --copies).
    #[arg(long, default_value_t = config::default_min_copies(), value_parser = clap::value_parser!(u8).range(1..=8))]
    min_copies: u8,
    /// The shards' transport, kept in hive.toml's `[net]`.
    #[command(flatten)]
    net: NetArgs,
}

/// The shards' transport (`[net]` in hive.toml). Each flag given replaces its field.
#[derive(clap::Args)]
struct NetArgs {
    /// Kernel TCP, or dpdk (each shard polls DPDK queues and runs TCP in userspace; needs
    /// a build with the `dpdk` feature). Default: kernel.
    #[arg(long)]
    net: Option<config::NetMode>,
    /// DPDK port name (e.g. net_af_xdp0, the --vdev in --eal-args, or a PCI address).
    #[arg(long)]
    dpdk_port: Option<String>,
    /// The node's IPv4 address/prefix on the DPDK port (owned by the userspace stack).
    #[arg(long)]
    dpdk_addr: Option<String>,
    /// Default gateway on the DPDK port.
    #[arg(long)]
    dpdk_gateway: Option<String>,
    /// EAL arguments, one string (split on spaces), e.g. "--no-huge -m 512
    /// --file-prefix hive1 --vdev net_af_xdp0,iface=eth0".
    #[arg(long, allow_hyphen_values = true)]
    eal_args: Option<String>,
    /// Microseconds a shard keeps polling its queue after its last packet (default 2000;
    /// 0 = sleep as soon as the queue is empty).
    #[arg(long)]
    dpdk_spin_us: Option<u64>,
}

impl NetArgs {
    fn apply(self, nc: &mut config::NetConfig) {
        if let Some(m) = self.net {
            nc.mode = m;
        }
        if let Some(p) = self.dpdk_port {
            nc.dpdk_port = p;
        }
        if let Some(a) = self.dpdk_addr {
            nc.dpdk_addr = a;
        }
        if self.dpdk_gateway.is_some() {
            nc.dpdk_gateway = self.dpdk_gateway;
        }
        if let Some(a) = self.eal_args {
            nc.eal_args = a.split_whitespace().map(str::to_string).collect();
        }
        if self.dpdk_spin_us.is_some() {
            nc.spin_us = self.dpdk_spin_us;
        }
    }
}

impl NodeArgs {
    fn init_options(self, node_id: String, bucket_count: u32) -> Result<InitOptions> {
        let shards = self.shards.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get() as u16)
                .unwrap_or(1)
        });
        Ok(InitOptions {
            data_dir: self.data,
            device: self.device,
            size_bytes: self.size.as_deref().map(config::parse_size).transpose()?,
            shards,
            base_port: self.base_port,
            meta_port: self.meta_port,
            listen: self.listen,
            node_id,
            bucket_count,
            segment_bytes: config::parse_size(&self.segment_size)?,
            advertise: self.advertise,
            zone: self.zone,
            copies: self.copies,
            min_copies: self.min_copies.min(self.copies),
            net: {
                let mut nc = config::NetConfig::default();
                self.net.apply(&mut nc);
                nc
            },
        })
    }
}

#[derive(Subcommand)]
enum CertCmd {
    Rotate {
        #[arg(long)]
        data: PathBuf,
    },
}

#[derive(Subcommand)]
enum CaCmd {
    Rotate {
        #[arg(long)]
        data: PathBuf,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Make a token. Scopes: `admin`, `host` (any volume, no hive operations),
    /// `volume:NAME` (one volume), `volume:NAME:ro` (one volume, read only).
    Create {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        scope: String,
        /// Lifetime, e.g. 3600s, 90m, 12h, 30d (default: no expiry).
        #[arg(long)]
        ttl: Option<String>,
        #[arg(long, default_value = "")]
        label: String,
    },
    /// Every token: id, scope, expiry, revoked.
    List {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by id (as `list` shows it, or a unique prefix of at least 8 digits):
    /// its connections are closed within seconds on every node.
    Revoke {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        id: String,
    },
}

#[derive(Subcommand)]
enum NodeCmd {
    /// Drain node ID and remove it: it takes no new data and repair copies what it holds
    /// to the nodes that now replace it (it keeps serving its copies meanwhile, so no
    /// chunk is ever below its copies); once every chunk it holds has all its copies on
    /// other nodes it is marked `out`. Shows progress; `--no-wait` only starts the drain.
    Remove {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        id: u64,
        #[arg(long)]
        no_wait: bool,
    },
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn main() {
    hivefs_net::tune_allocator();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HIVE_LOG")
                .unwrap_or_else(|_| "info,openraft=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = real_main() {
        eprintln!("hive: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Init {
            node,
            node_id,
            buckets,
        } => {
            let o = node.init_options(node_id, buckets)?;
            let out = config::init(&o)?;
            println!(
                "hive node {} initialised in {}",
                out.config.node_id,
                o.data_dir.display()
            );
            println!("device        {}", out.config.device.display());
            println!(
                "shards        {} (ports {}..={})",
                out.config.shards,
                out.config.base_port,
                out.config.base_port + out.config.shards - 1
            );
            println!("metadata      port {}", out.config.meta_port());
            println!("ca            {}", out.ca_fingerprint);
            println!("token         {}", out.admin_token);
            Ok(())
        }
        Cmd::Join {
            hive,
            token,
            ca,
            name,
            mut node,
        } => {
            let meta_port = node.meta_port.unwrap_or(node.base_port.saturating_sub(1));
            node.meta_port = Some(meta_port);
            let host = node
                .advertise
                .clone()
                .unwrap_or_else(|| node.listen.clone());
            let name = name.unwrap_or_else(|| {
                format!("node-{}-{meta_port}", host.replace([':', '[', ']'], "-"))
            });
            // The bucket count comes from the hive (its join grant).
            let o = node.init_options(name, config::DEFAULT_BUCKETS)?;
            join(&hive, &token, &ca, o)
        }
        Cmd::Run {
            data,
            insecure,
            sqpoll,
            iopoll,
            net,
        } => {
            let mut nc = NodeConfig::load(&data)?.net;
            net.apply(&mut nc);
            // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
            unsafe {
                libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
                libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
            }
            let node = Node::start_with(
                &data,
                hivefs_engine::node::RunOptions {
                    insecure,
                    sqpoll,
                    iopoll,
                    net: Some(nc),
                },
            )?;
            tracing::info!(ports = ?node.ports, "hive node running");
            node.wait(&STOP)
        }
        Cmd::Status {
            data,
            json,
            insecure,
        } => status(&data, json, insecure),
        Cmd::Token { cmd } => token_cmd(cmd),
        Cmd::Ca {
            cmd: CaCmd::Rotate { data },
        } => rotate_ca(&data),
        Cmd::Cert {
            cmd: CertCmd::Rotate { data },
        } => {
            let fp = config::rotate_node_cert(&data)?;
            println!("node certificate rotated: {fp}");
            Ok(())
        }
        Cmd::Node {
            cmd: NodeCmd::Remove { data, id, no_wait },
        } => {
            set_node_state(&data, id, hivefs_net::placement::NodeState::Draining)?;
            println!("node {id} is draining: it takes no new data; repair copies what it holds to the nodes replacing it");
            if no_wait {
                return Ok(());
            }
            wait_drained(&data, id)?;
            set_node_state(&data, id, hivefs_net::placement::NodeState::Out)?;
            println!("node {id} is out of the hive: its data is held elsewhere; it can be stopped");
            Ok(())
        }
        Cmd::Up {
            data,
            size,
            mountpoint,
        } => up(&data, &size, &mountpoint),
        Cmd::Fsck {
            data,
            verify,
            insecure,
        } => fsck(&data, verify, insecure),
        Cmd::Repair { data, no_wait } => repair_now(&data, no_wait),
        Cmd::Scrub { data } => {
            NodeConfig::load(&data)?;
            let f = data.join(hivefs_engine::repair::SCRUB_REQUEST_FILE);
            std::fs::write(&f, b"").with_context(|| format!("writing {}", f.display()))?;
            println!(
                "scrub requested: the running node starts it within a second (see `hive status`)"
            );
            Ok(())
        }
        Cmd::Gc { data, insecure } => {
            let r = match ask_leader(&data, insecure, Query::Gc)? {
                Answer::Gc(r) => r,
                other => bail!("unexpected answer {other:?}"),
            };
            println!(
                "gc epoch {}: {} chunks referenced, {} stored; swept {} chunks ({} stored bytes), spared {} claimed since the mark began",
                r.epoch, r.referenced_chunks, r.stored_chunks, r.swept_chunks, r.swept_bytes, r.spared_chunks
            );
            Ok(())
        }
    }
}

/// Call `req` on the hive at `addr` with the admin token, following "not the leader"
/// answers to the leader (a few hops, while an election settles). An `idempotent`
/// request is also asked again while the leader answers that it cannot hear a quorum (a
/// member slow or restarting); others are not (a write that timed out may still commit).
fn call_leader(
    addr: &str,
    token: &str,
    tls: &std::sync::Arc<rustls::ClientConfig>,
    req: &MetaRequest,
    timeout: std::time::Duration,
    idempotent: bool,
) -> Result<meta::MetaReply> {
    let mut at = addr.to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let r = PeerLink::dial(&at, Some(tls.clone()), token, "hive join", timeout)
            .and_then(|mut l| l.call(req));
        match r {
            Ok(reply) => return Ok(reply),
            Err(e) if std::time::Instant::now() < deadline => {
                if let Some(leader) = e.leader() {
                    at = leader.to_string();
                } else if matches!(
                    e,
                    PeerError::Refused {
                        code: ErrorCode::NotLeader,
                        ..
                    }
                ) {
                    // No leader known yet: an election is on.
                    std::thread::sleep(std::time::Duration::from_millis(500));
                } else if idempotent
                    && matches!(
                        e,
                        PeerError::Refused {
                            code: ErrorCode::NoQuorum,
                            ..
                        }
                    )
                    && !STOP.load(Ordering::SeqCst)
                {
                    tracing::info!("{e}; asking again");
                    std::thread::sleep(std::time::Duration::from_secs(1));
                } else {
                    return Err(e.into());
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Why the hive refuses a node `NOTSUP` at join or admission (`meta/version.rs`).
const NEWER_LOG: &str = "the hive's metadata log is at a newer version than this build \
     speaks: upgrade this node's `hive` first";

/// `hive join`: see the subcommand's docs.
fn join(hive: &str, token: &str, ca: &str, o: InitOptions) -> Result<()> {
    let pinned = hivefs_net::tls::client_config_pinned(ca).map_err(|e| anyhow::anyhow!("{e}"))?;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let short = std::time::Duration::from_secs(30);
    if o.data_dir.join(config::CONFIG_FILE).exists() {
        let cfg = NodeConfig::load(&o.data_dir)?;
        if cfg.bootstrap {
            bail!(
                "{} holds the first node of a hive of its own; a node joins only from an empty directory",
                o.data_dir.display()
            );
        }
        println!(
            "hive: {} was joined before: finishing the join",
            o.data_dir.display()
        );
    } else {
        let spec = NodeSpec {
            name: o.node_id.clone(),
            host: o.advertise.clone().unwrap_or_else(|| o.listen.clone()),
            meta_port: o.meta_port.unwrap_or(0),
            base_port: o.base_port,
            shards: o.shards,
            zone: o.zone.clone(),
            weight: o
                .size_bytes
                .unwrap_or(config::DEFAULT_DEVICE_BYTES)
                .div_ceil(1 << 30) as u32,
        };
        if let Err(e) = spec.validate() {
            bail!("this node cannot be recorded as {spec:?} ({e}): check --name, --advertise, --zone and the ports");
        }
        // `AGAIN`: the leader has not recorded itself in the map yet (a node just started
        // does so moments after it serves); ask again until `short` has passed.
        let asked = std::time::Instant::now();
        let answer = loop {
            let a = call_leader(
                hive,
                token,
                &pinned,
                &MetaRequest::Peer(PeerRequest::Join(spec.clone())),
                short,
                false,
            )?;
            if a != Err(Errno::AGAIN) || asked.elapsed() >= short {
                break a;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        };
        let grant = match answer {
            Ok(Answer::Joined(g)) => g,
            Ok(other) => bail!("joining {hive}: unexpected answer {other:?}"),
            Err(Errno::NOTSUP) => bail!("joining {hive}: {NEWER_LOG}"),
            Err(e) => bail!("joining {hive}: the hive refused: {e}"),
        };
        let id = grant.id;
        config::init_joined(
            &o,
            &config::Joining {
                grant,
                admin_token: token.to_string(),
            },
        )?;
        println!(
            "hive: node {} is node {id} of the hive; its files are in {}",
            o.node_id,
            o.data_dir.display()
        );
    }
    let data = o.data_dir.canonicalize()?;
    let cfg = NodeConfig::load(&data)?;
    let node = Node::start(&data, false)?;
    // Catching up may mean a snapshot and a long log: a generous deadline. Admitting is
    // idempotent (asked again while the leader has no quorum).
    let admitted = call_leader(
        hive,
        token,
        &pinned,
        &MetaRequest::Peer(PeerRequest::Admit { id: cfg.raft_id }),
        std::time::Duration::from_secs(600),
        true,
    );
    match admitted {
        Ok(Ok(Answer::Admitted { voter })) => println!(
            "hive: node {} joined the metadata cluster as a {}",
            cfg.raft_id,
            if voter { "voter" } else { "learner" }
        ),
        Ok(Err(Errno::NOTSUP)) => {
            let _ = node.shutdown();
            bail!("admitting node {}: {NEWER_LOG}", cfg.raft_id)
        }
        Ok(other) => {
            let _ = node.shutdown();
            bail!(
                "admitting node {}: unexpected answer {other:?}",
                cfg.raft_id
            )
        }
        Err(e) => {
            let _ = node.shutdown();
            bail!(
                "admitting node {}: {e:#} (run `hive join` again to retry)",
                cfg.raft_id
            )
        }
    }
    tracing::info!(ports = ?node.ports, "hive node running");
    node.wait(&STOP)
}

/// The metadata cluster as this node sees it, and the cluster map's nodes (asked of the
/// leader: this node when it leads, else `nodes` says why it is missing).
fn cluster_status(dir: &std::path::Path, insecure: bool) -> serde_json::Value {
    let members = match admin_query(dir, insecure, Query::Members, "hive status") {
        Ok(Answer::Members {
            this,
            leader,
            term,
            last_applied,
            members,
        }) => serde_json::json!({
            "this": this,
            "leader": leader,
            "term": term,
            "last_applied": last_applied,
            "members": members.iter().map(|m| serde_json::json!({
                "id": m.id, "addr": m.addr, "voter": m.voter,
            })).collect::<Vec<_>>(),
        }),
        Ok(other) => serde_json::json!({ "error": format!("unexpected {other:?}") }),
        Err(e) => serde_json::json!({ "error": format!("{e:#}") }),
    };
    let nodes = match ask_leader(dir, insecure, Query::Nodes) {
        Ok(Answer::Nodes { map_epoch, nodes }) => serde_json::json!({
            "map_epoch": map_epoch,
            "nodes": nodes.iter().map(|n| serde_json::json!({
                "id": n.id, "name": n.spec.name, "addr": n.spec.meta_addr(),
                "base_port": n.spec.base_port, "shards": n.spec.shards, "zone": n.spec.zone,
                "weight": n.spec.weight, "state": format!("{:?}", n.state).to_lowercase(),
            })).collect::<Vec<_>>(),
        }),
        Ok(other) => serde_json::json!({ "error": format!("unexpected {other:?}") }),
        Err(e) => serde_json::json!({ "error": format!("{e:#}") }),
    };
    // During a rolling upgrade: whether every member runs a build that speaks the newest
    // metadata commands yet (`meta/version.rs`).
    let log = match ask_leader(dir, insecure, Query::LogVersion) {
        Ok(Answer::LogVersion(v)) => serde_json::json!({
            "version": v,
            "this_build_speaks": speaks(),
        }),
        Ok(other) => serde_json::json!({ "error": format!("unexpected {other:?}") }),
        Err(e) => serde_json::json!({ "error": format!("{e:#}") }),
    };
    serde_json::json!({ "raft": members, "map": nodes, "log": log })
}

fn print_cluster(c: &serde_json::Value) {
    let raft = &c["raft"];
    if let Some(e) = raft["error"].as_str() {
        println!("metadata cluster: unknown ({e})");
    } else {
        let leader = raft["leader"]
            .as_u64()
            .map_or("none (election)".to_string(), |l| format!("node {l}"));
        println!(
            "metadata cluster: this is node {}, leader {leader}, term {}, applied {}",
            raft["this"], raft["term"], raft["last_applied"]
        );
        for m in raft["members"].as_array().into_iter().flatten() {
            println!(
                "  member {:>3}  {:<24} {}",
                m["id"],
                m["addr"].as_str().unwrap_or("?"),
                if m["voter"].as_bool() == Some(true) {
                    "voter"
                } else {
                    "learner"
                }
            );
        }
    }
    let log = &c["log"];
    match log["version"].as_u64() {
        Some(v) if v < speaks() as u64 => println!(
            "metadata log version {v} (this build speaks {}: raised once every member does)",
            speaks()
        ),
        Some(v) => println!("metadata log version {v}"),
        None => println!(
            "metadata log version: unknown ({})",
            log["error"].as_str().unwrap_or("?")
        ),
    }
    let map = &c["map"];
    if let Some(nodes) = map["nodes"].as_array() {
        println!("cluster map epoch {}:", map["map_epoch"]);
        for n in nodes {
            println!(
                "  node {:>3}  {:<9} {:<20} {:<24} zone {:<10} weight {:>6} shards {}",
                n["id"],
                n["state"].as_str().unwrap_or("?"),
                n["name"].as_str().unwrap_or("?"),
                n["addr"].as_str().unwrap_or("?"),
                n["zone"].as_str().unwrap_or("?"),
                n["weight"],
                n["shards"]
            );
        }
    } else if let Some(e) = map["error"].as_str() {
        println!("cluster map: unknown ({e})");
    }
}

fn parse_scope(s: &str) -> Result<meta::TokenScope> {
    Ok(match s.split(':').collect::<Vec<_>>().as_slice() {
        ["admin"] => meta::TokenScope::Admin,
        ["host"] => meta::TokenScope::Host,
        ["volume", name] => meta::TokenScope::Volume {
            name: name.to_string(),
            read_only: false,
        },
        ["volume", name, "ro"] => meta::TokenScope::Volume {
            name: name.to_string(),
            read_only: true,
        },
        _ => bail!("unknown scope {s:?}: admin, host, volume:NAME or volume:NAME:ro"),
    })
}

fn parse_duration(s: &str) -> Result<std::time::Duration> {
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len()));
    let n: u64 = num
        .trim()
        .parse()
        .with_context(|| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => bail!("bad duration unit in {s:?}: s, m, h or d"),
    };
    Ok(std::time::Duration::from_secs(secs))
}

fn admin_mutation(op: meta::Mutation) -> Result<MetaRequest> {
    Ok(MetaRequest::Mutate(meta::MetaCommand {
        volume: 0,
        client: u64::from_le_bytes(config::random_bytes::<8>()?) | 1,
        seq: 1,
        acked_below: 1,
        now: meta::Timespec::default(),
        op,
    }))
}

/// `hive ca rotate`: make the new CA here (cross-signed with this node's copy of the
/// current CA key), record it through the metadata leader, and wait until this node has
/// installed it (the others follow within a second or two).
fn rotate_ca(data: &std::path::Path) -> Result<()> {
    let read =
        |f: &str| std::fs::read_to_string(data.join(f)).with_context(|| format!("reading {f}"));
    let old = hivefs_net::tls::CaMaterial {
        cert_pem: read("ca.pem")?,
        key_pem: read("ca.key")?,
    };
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let (new, cross) = hivefs_net::tls::rotate_ca(&old, &format!("hive CA {secs}"))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let rotation = meta::CaRotation {
        ca_cert_pem: new.cert_pem.clone(),
        ca_key_pem: new.key_pem,
        cross_cert_pem: cross,
        previous_cert_pem: old.cert_pem.clone(),
    };
    ask_leader_req(
        data,
        false,
        &admin_mutation(meta::Mutation::RotateCa(rotation))?,
    )
    .context("recording the CA rotation (another rotation may have come first)")?;
    let old_fp = config::ca_fingerprint(data)?;
    let new_fp =
        hivefs_net::tls::fingerprint_pem(&new.cert_pem).map_err(|e| anyhow::anyhow!("{e}"))?;
    let t0 = std::time::Instant::now();
    while config::ca_fingerprint(data)? != new_fp {
        if t0.elapsed() > std::time::Duration::from_secs(15) {
            bail!("the CA rotation is recorded, but this node has not installed it in 15 s (is it running?)");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    println!("hive CA rotated: {new_fp}");
    eprintln!(
        "clients pinning the previous CA ({old_fp}) keep connecting (nodes present a cross \
         certificate); pin the new fingerprint for new mounts"
    );
    Ok(())
}

fn token_cmd(cmd: TokenCmd) -> Result<()> {
    use hivefs_engine::tokens::{digest, wall_ms};
    match cmd {
        TokenCmd::Create {
            data,
            scope,
            ttl,
            label,
        } => {
            let scope = parse_scope(&scope)?;
            let secret = hex::encode(config::random_bytes::<32>()?);
            let now = wall_ms();
            let expires_ms = match ttl {
                Some(t) => now + parse_duration(&t)?.as_millis() as u64,
                None => 0,
            };
            let sha256 = digest(&secret);
            ask_leader_req(
                &data,
                false,
                &admin_mutation(meta::Mutation::CreateToken {
                    sha256,
                    scope: scope.clone(),
                    expires_ms,
                    label,
                    created_ms: now,
                })?,
            )?;
            println!("{secret}");
            eprintln!(
                "token {} ({scope:?}) created; the secret above is shown once",
                hex::encode(&sha256[..8])
            );
            Ok(())
        }
        TokenCmd::List { data, json } => {
            let Answer::Tokens(list) = ask_leader(&data, false, Query::Tokens)? else {
                bail!("unexpected answer");
            };
            if json {
                let v: Vec<_> = list
                    .iter()
                    .map(|t| {
                        serde_json::json!({
                            "id": t.id, "scope": format!("{:?}", t.scope), "expires_ms": t.expires_ms,
                            "revoked": t.revoked, "label": t.label, "created_ms": t.created_ms,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            let now = wall_ms();
            for t in &list {
                let state = if t.revoked {
                    "revoked".to_string()
                } else if t.expires_ms != 0 && t.expires_ms <= now {
                    "expired".to_string()
                } else if t.expires_ms != 0 {
                    format!("expires in {} s", (t.expires_ms - now) / 1000)
                } else {
                    "valid".to_string()
                };
                println!(
                    "{}  {:<40} {:<20} {}",
                    t.id,
                    format!("{:?}", t.scope),
                    state,
                    t.label
                );
            }
            Ok(())
        }
        TokenCmd::Revoke { data, id } => {
            ask_leader_req(
                &data,
                false,
                &admin_mutation(meta::Mutation::RevokeToken { id: id.clone() })?,
            )?;
            println!("token {id} revoked");
            Ok(())
        }
    }
}

/// Ask the metadata leader an admin query, starting at the node in `dir` (a follower
/// points to the leader).
/// Set a node's state in the cluster map (through the leader).
fn set_node_state(
    dir: &std::path::Path,
    id: u64,
    state: hivefs_net::placement::NodeState,
) -> Result<()> {
    let client = u64::from_le_bytes(config::random_bytes::<8>()?) | 1;
    let req = MetaRequest::Mutate(meta::MetaCommand {
        volume: 0,
        client,
        seq: 1,
        acked_below: 1,
        now: meta::Timespec::default(),
        op: meta::Mutation::SetNodeState { id, state },
    });
    ask_leader_req(dir, false, &req)?;
    Ok(())
}

fn shard_admin_call(link: &mut Link, op: &meta::ShardAdmin) -> Result<meta::ShardAdminReply> {
    match link.call(&Request::ShardAdmin {
        body: meta::encode(op),
    })? {
        Response::ShardAdminReply { body } => Ok(meta::decode(&body)?),
        other => bail!("unexpected answer {:?}", other.opcode()),
    }
}

/// `hive repair`: ask the running node for a pass, then show its progress until it ends.
fn repair_now(data: &std::path::Path, no_wait: bool) -> Result<()> {
    use hivefs_engine::repair::{RepairProgress, REPAIR_REQUEST_FILE};
    use std::io::Write;
    let cfg = NodeConfig::load(data)?;
    // The pass that serves the request is the first to start after it: the one after a
    // pass under way now.
    let now = RepairProgress::load(data);
    let target = now.passes + if now.running { 2 } else { 1 };
    let f = data.join(REPAIR_REQUEST_FILE);
    std::fs::write(&f, b"").with_context(|| format!("writing {}", f.display()))?;
    if no_wait {
        println!(
            "repair pass requested: the running node starts it within a second (see `hive status`)"
        );
        return Ok(());
    }
    let mut idle_since = std::time::Instant::now();
    loop {
        std::thread::sleep(std::time::Duration::from_millis(200));
        let p = RepairProgress::load(data);
        if p.running {
            idle_since = std::time::Instant::now();
        }
        if f.exists() && !p.running {
            if idle_since.elapsed() > std::time::Duration::from_secs(10) {
                let _ = std::fs::remove_file(&f);
                bail!(
                    "the node did not start a pass within 10 s: is it running, and one of a hive of several nodes?"
                );
            }
            continue;
        }
        let done = !p.running && p.passes >= target;
        let frac = if done {
            1.0
        } else if p.passes + 1 == target {
            p.fraction(cfg.shards)
        } else {
            0.0
        };
        let width = 30;
        let filled = (frac * width as f64).round() as usize;
        eprint!(
            "\rrepair pass {} [{}{}] {:>3.0}%  shard {}/{}, {} copies made ({} bytes), {} released ",
            target,
            "#".repeat(filled),
            "-".repeat(width - filled),
            100.0 * frac,
            (p.shard + 1).min(cfg.shards),
            cfg.shards,
            p.copied,
            p.copied_bytes,
            p.released
        );
        let _ = std::io::stderr().flush();
        if done {
            break;
        }
    }
    eprintln!();
    println!("{}", RepairProgress::load(data).describe());
    Ok(())
}

/// Wait until every chunk node `id` holds is also held by all of its bucket's targets
/// under the current map (where a draining node is no target), printing progress.
fn wait_drained(dir: &std::path::Path, id: u64) -> Result<()> {
    use hivefs_net::chunk::ChunkId;
    use hivefs_net::placement::NodeState;
    let cfg = NodeConfig::load(dir)?;
    let mut last_line = String::new();
    loop {
        let mut local = Link::open(dir, &cfg, cfg.base_port, false, "hive node remove")?;
        let map = match local.call(&Request::HiveMap)? {
            Response::HiveMapReply { map } => map,
            other => bail!("placement map: unexpected {:?}", other.opcode()),
        };
        let Some(node) = map.node(id).cloned() else {
            bail!("node {id} is not in the map");
        };
        if node.state != NodeState::Draining {
            // The map this node has may not show the change yet.
            std::thread::sleep(std::time::Duration::from_millis(300));
            continue;
        }
        let order = map.placement(usize::MAX);
        let (mut total, mut done) = (0u64, 0u64);
        for s in 0..node.shards {
            let mut link = Link::open_at(
                dir,
                &node.host,
                node.base_port + s,
                false,
                "hive node remove",
            )
            .with_context(|| format!("node {id} shard {s}"))?;
            let mut after: Option<Vec<u8>> = None;
            loop {
                let (ids, more) = match shard_admin_call(
                    &mut link,
                    &meta::ShardAdmin::ListIds {
                        after: after.clone(),
                        max: 4096,
                    },
                )? {
                    meta::ShardAdminReply::Listed { ids, levels, more } => {
                        let ids = meta::split_ids(&ids).context("bad id list")?;
                        if ids.len() != levels.len() {
                            bail!("listing node {id}: ids and levels differ in number");
                        }
                        (ids.into_iter().zip(levels).collect::<Vec<_>>(), more)
                    }
                    other => bail!("listing node {id}: {other:?}"),
                };
                after = ids.last().map(|l| l.0 .0.to_vec());
                total += ids.len() as u64;
                // How many targets of each id hold it at its level.
                let mut held: std::collections::HashMap<ChunkId, usize> = Default::default();
                let mut want: std::collections::HashMap<(u64, u16), Vec<ChunkId>> =
                    Default::default();
                let mut need: std::collections::HashMap<ChunkId, (usize, u8)> = Default::default();
                for &(cid, level) in &ids {
                    let cid = &cid;
                    let copies = level.max(1) as usize;
                    let b = map.bucket_of(cid);
                    let targets = hivefs_engine::repair::targets(&map, order.replicas(b), copies);
                    // A target that is down is no target: the drain waits for it (or
                    // for its replacement) rather than leave a chunk short.
                    need.insert(*cid, (copies.min(map.eligible_count()), level));
                    for t in targets {
                        let shards = map.node(t).map_or(1, |m| m.shards.max(1));
                        want.entry((t, (b % shards as u32) as u16))
                            .or_default()
                            .push(*cid);
                    }
                }
                for ((t, ts), cids) in want {
                    let Some(m) = map.node(t) else { continue };
                    let Ok(mut l) =
                        Link::open_at(dir, &m.host, m.base_port + ts, false, "hive node remove")
                    else {
                        continue;
                    };
                    if let Ok(meta::ShardAdminReply::Held { levels, .. }) = shard_admin_call(
                        &mut l,
                        &meta::ShardAdmin::Holding {
                            ids: meta::join_ids(&cids),
                        },
                    ) {
                        for (cid, level) in cids.iter().zip(levels) {
                            if level >= need[cid].1 {
                                *held.entry(*cid).or_default() += 1;
                            }
                        }
                    }
                }
                done += ids
                    .iter()
                    .filter(|(c, _)| held.get(c).copied().unwrap_or(0) >= need[c].0)
                    .count() as u64;
                if !more {
                    break;
                }
            }
        }
        let line =
            format!("draining node {id}: {done} of {total} chunks have all their copies elsewhere");
        if line != last_line {
            eprint!("\r{line}");
            last_line = line;
        }
        if done == total {
            eprintln!();
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

fn ask_leader(dir: &std::path::Path, insecure: bool, query: Query) -> Result<Answer> {
    ask_leader_req(dir, insecure, &MetaRequest::Query { volume: 0, query })
}

fn ask_leader_req(dir: &std::path::Path, insecure: bool, req: &MetaRequest) -> Result<Answer> {
    let cfg = NodeConfig::load(dir)?;
    if insecure {
        // A plain-TCP hive has one node: it leads.
        let MetaRequest::Query { query, .. } = req else {
            bail!("--insecure: only queries");
        };
        return admin_query(dir, insecure, query.clone(), "hive");
    }
    let token = std::fs::read_to_string(dir.join("admin.token")).context("reading admin.token")?;
    let tls = hivefs_net::tls::client_config_trusting(&config::trust_bundle(dir)?)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let at = NodeSpec::addr_of(cfg.local_host(), cfg.meta_port());
    // A collection or a verifying fsck reads the whole hive: give it time.
    let long = matches!(
        req,
        MetaRequest::Query {
            query: Query::Gc | Query::Fsck { .. },
            ..
        }
    );
    let timeout = std::time::Duration::from_secs(if long { 3600 } else { 20 });
    match call_leader(&at, token.trim(), &tls, req, timeout, false)? {
        Ok(a) => Ok(a),
        Err(e) => bail!("the hive answered {e}"),
    }
}

/// Ask the metadata service of the node in `dir` an admin query.
fn admin_query(dir: &std::path::Path, insecure: bool, query: Query, who: &str) -> Result<Answer> {
    let cfg = NodeConfig::load(dir)?;
    let mut link = Link::open(dir, &cfg, cfg.meta_port(), insecure, who)?;
    let req = MetaRequest::Query { volume: 0, query };
    let body = match link.call(&Request::Meta {
        body: meta::encode(&req),
    })? {
        Response::MetaReply { body } => body,
        Response::Error { code, message } => bail!("{who}: {code:?}: {message}"),
        other => bail!("{who}: unexpected {:?}", other.opcode()),
    };
    match meta::decode::<meta::MetaReply>(&body)? {
        Ok(a) => Ok(a),
        Err(e) => bail!("{who}: {e}"),
    }
}

fn fsck(dir: &std::path::Path, verify: bool, insecure: bool) -> Result<()> {
    let r = match ask_leader(dir, insecure, Query::Fsck { verify })? {
        Answer::Fsck(r) => r,
        other => bail!("unexpected answer {other:?}"),
    };
    println!(
        "volumes {}  inodes {}  referenced chunks {}  stored chunks {}  verified {}  stale {}  copies {}  under-replicated {}",
        r.volumes,
        r.inodes,
        r.referenced_chunks,
        r.stored_chunks,
        r.verified_chunks,
        r.stale_chunks,
        r.copies_wanted,
        r.under_replicated
    );
    for f in &r.findings {
        println!("PROBLEM: {f}");
    }
    if r.findings.is_empty() {
        println!("clean");
        Ok(())
    } else {
        println!("{} problem(s)", r.findings.len());
        std::process::exit(1);
    }
}

/// `hive up`: init if needed, run the node, make sure volume `default` exists, mount it
/// with `hi`, and on Ctrl-C unmount and stop.
fn up(data: &std::path::Path, size: &str, mountpoint: &std::path::Path) -> Result<()> {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    if !data.join(config::CONFIG_FILE).exists() {
        let shards = std::thread::available_parallelism()
            .map(|n| n.get() as u16)
            .unwrap_or(1);
        let o = InitOptions {
            data_dir: data.to_path_buf(),
            device: None,
            size_bytes: Some(config::parse_size(size)?),
            shards,
            base_port: config::DEFAULT_BASE_PORT,
            meta_port: None,
            listen: "127.0.0.1".into(),
            node_id: "node-1".into(),
            bucket_count: config::DEFAULT_BUCKETS,
            segment_bytes: config::DEFAULT_SEGMENT_BYTES,
            advertise: None,
            zone: config::default_zone(),
            copies: config::default_copies(),
            min_copies: config::default_min_copies(),
            net: config::NetConfig::default(),
        };
        config::init(&o)?;
        println!("hive: initialised a one-node hive in {}", data.display());
    }
    let data = data.canonicalize()?;
    let node = Node::start(&data, false)?;
    let meta = node.meta().context("the metadata service did not start")?;
    let (vol, made) = match meta.ensure_volume("default", 1) {
        Ok(v) => v,
        Err(e) => {
            let _ = node.shutdown();
            return Err(e);
        }
    };
    if made {
        println!("hive: created volume default");
    }
    eprintln!(
        "hive: WARNING: volume {} keeps copies = {}: a one-node hive has no redundancy; \
         a lost disk loses its data",
        vol.name, vol.copies
    );
    std::fs::create_dir_all(mountpoint)
        .with_context(|| format!("creating {}", mountpoint.display()))?;
    let mountpoint = mountpoint.canonicalize()?;
    let cfg = NodeConfig::load(&data)?;
    let hi = std::env::current_exe()?.with_file_name("hi");
    let hi = if hi.exists() { hi } else { PathBuf::from("hi") };
    let mut child = match std::process::Command::new(&hi)
        .arg("mount")
        .arg("--hive")
        .arg(format!("{}:{}", cfg.listen, node.meta_port))
        .arg("--token-file")
        .arg(data.join("admin.token"))
        .arg("--ca")
        .arg(config::ca_fingerprint(&data)?)
        .arg("--volume")
        .arg("default")
        .arg(&mountpoint)
        .stdout(std::process::Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            let _ = node.shutdown();
            bail!(
                "starting {} (build it with `cargo build --release`): {e}",
                hi.display()
            );
        }
    };
    let stdout = child.stdout.take().context("hi stdout")?;
    let mut line = String::new();
    let mounted = std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)
        .map(|n| n > 0 && line.starts_with("mounted"))
        .unwrap_or(false);
    if !mounted {
        let _ = child.kill();
        let _ = child.wait();
        let _ = node.shutdown();
        bail!(
            "`hi mount` did not mount {} (see its messages above)",
            mountpoint.display()
        );
    }
    println!(
        "hive: volume default is mounted at {}",
        mountpoint.display()
    );
    println!(
        "hive: hive status: `hive status --data {}`; metadata at {}:{}; Ctrl-C to unmount and stop",
        data.display(),
        cfg.listen,
        node.meta_port
    );
    loop {
        if STOP.load(Ordering::SeqCst) {
            break;
        }
        if let Ok(Some(st)) = child.try_wait() {
            eprintln!("hive: hi exited ({st}); stopping");
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    if child.try_wait()?.is_none() {
        // SAFETY: signalling our own child, not yet reaped.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let _ = child.wait();
    }
    node.shutdown()?;
    println!("hive: unmounted and stopped");
    Ok(())
}

/// `hive status`'s network lines: the transport, and with DPDK each shard's packets and
/// the port's counters (shard 0 reports them).
fn print_net(shards: &[serde_json::Value]) {
    let Some(first) = shards.first() else {
        return;
    };
    if first["net"]["transport"].as_str() != Some("dpdk") {
        println!("network: kernel TCP");
        return;
    }
    println!(
        "network: DPDK ({}), userspace TCP per shard",
        first["net"]["driver"].as_str().unwrap_or("?")
    );
    for v in shards {
        let n = &v["net"];
        let g = |k: &str| n[k].as_u64().unwrap_or(0);
        println!(
            "  shard {}: packets rx {} tx {}, handed to other shards {}, dropped {}, sockets {}{}",
            v["shard"].as_u64().unwrap_or(0),
            g("rx_packets"),
            g("tx_packets"),
            g("handed_over"),
            g("dropped"),
            g("sockets"),
            if n["own_queue"].as_bool() == Some(true) {
                ""
            } else {
                " (no queue of its own: packets handed to it)"
            }
        );
    }
    if let Some(p) = shards.iter().find_map(|v| v["net"].get("port")) {
        let g = |k: &str| p[k].as_u64().unwrap_or(0);
        println!(
            "  port: rx {} packets ({} missed, {} errors, {} without a buffer), tx {} packets ({} errors)",
            g("rx_packets"),
            g("rx_missed"),
            g("rx_errors"),
            g("rx_no_mbuf"),
            g("tx_packets"),
            g("tx_errors")
        );
    }
}

fn status(dir: &std::path::Path, json: bool, insecure: bool) -> Result<()> {
    let cfg = NodeConfig::load(dir)?;
    let mut shards = Vec::new();
    for s in 0..cfg.shards {
        let mut link = Link::open(dir, &cfg, cfg.base_port + s, insecure, "hive status")
            .with_context(|| format!("shard {s}"))?;
        match link.call(&Request::Stats)? {
            Response::StatsReply { json } => {
                shards.push(serde_json::from_str::<serde_json::Value>(&json)?)
            }
            other => bail!("shard {s}: unexpected {:?}", other.opcode()),
        }
    }
    let ratio = |a: u64, b: u64| if b == 0 { 1.0 } else { a as f64 / b as f64 };
    for v in shards.iter_mut() {
        let g = |k: &str| v[k].as_u64().unwrap_or(0);
        let (dedupe, compression) = (
            ratio(g("offered_bytes"), g("logical_bytes")),
            ratio(g("logical_bytes"), g("stored_bytes")),
        );
        v["dedupe_ratio"] = serde_json::json!(dedupe);
        v["compression_ratio"] = serde_json::json!(compression);
    }
    let sum = |k: &str| {
        shards
            .iter()
            .map(|v| v[k].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    let total = serde_json::json!({
        "chunks": sum("chunks"),
        "logical_bytes": sum("logical_bytes"),
        "stored_bytes": sum("stored_bytes"),
        "offered_bytes": sum("offered_bytes"),
        "dedupe_ratio": ratio(sum("offered_bytes"), sum("logical_bytes")),
        "compression_ratio": ratio(sum("logical_bytes"), sum("stored_bytes")),
        "device_bytes_used": sum("device_bytes_used"),
        "device_bytes_total": sum("device_bytes_total"),
        "puts_rejected": sum("puts_rejected"),
        "gets_corrupt": sum("gets_corrupt"),
        "segments_used": sum("segments_used"),
        "segments_free": sum("segments_free"),
        "segments_total": sum("segments_total"),
        "live_bytes": sum("live_bytes"),
        "dead_bytes": sum("dead_bytes"),
        "puts_no_space": sum("puts_no_space"),
        "segments_compacted": sum("segments_compacted"),
        "compaction_chunks_moved": sum("compaction_chunks_moved"),
        "compaction_bytes_moved": sum("compaction_bytes_moved"),
        "compaction_tombstones_carried": sum("compaction_tombstones_carried"),
        "compaction_tombstones_dropped": sum("compaction_tombstones_dropped"),
    });
    let cluster = cluster_status(dir, insecure);
    // The CA clients pin, and the one before it (still accepted: cross-signed) after a
    // `hive ca rotate`.
    let fp_of = |f: &str| {
        std::fs::read_to_string(dir.join(f))
            .ok()
            .and_then(|pem| hivefs_net::tls::fingerprint_pem(&pem).ok())
    };
    let (ca, ca_previous) = (fp_of("ca.pem"), fp_of("ca.prev.pem"));
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "node_id": cfg.node_id,
                "shards": shards,
                "total": total,
                "cluster": cluster,
                "repair": hivefs_engine::repair::RepairProgress::load(dir),
                "ca": ca,
                "ca_previous": ca_previous,
                "replication": {
                    "copies": cfg.copies,
                    "min_copies": cfg.min_copies,
                    "owed_since_start": sum("repl_owed"),
                },
            }))?
        );
        return Ok(());
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    println!(
        "node {}  device {}",
        cfg.node_id,
        shards
            .first()
            .and_then(|v| v["device"].as_str())
            .unwrap_or("?")
    );
    println!(
        "{:>6} {:>12} {:>12} {:>12} {:>8} {:>8} {:>14} {:>10} {:>10} {:>10}",
        "shard",
        "chunks",
        "logical GiB",
        "stored GiB",
        "dedupe",
        "compr",
        "device used",
        "dead GiB",
        "free segs",
        "compacted"
    );
    for v in &shards {
        let g = |k: &str| v[k].as_u64().unwrap_or(0);
        println!(
            "{:>6} {:>12} {:>12.3} {:>12.3} {:>8.2} {:>8.2} {:>13.1}% {:>10.3} {:>10} {:>10}{}",
            g("shard"),
            g("chunks"),
            gib(g("logical_bytes")),
            gib(g("stored_bytes")),
            ratio(g("offered_bytes"), g("logical_bytes")),
            ratio(g("logical_bytes"), g("stored_bytes")),
            100.0 * ratio(g("device_bytes_used"), g("device_bytes_total").max(1)),
            gib(g("dead_bytes")),
            format!("{}/{}", g("segments_free"), g("segments_total")),
            g("segments_compacted"),
            v["failed"]
                .as_str()
                .map(|f| format!("  FAILED: {f}"))
                .unwrap_or_default()
        );
    }
    let t = |k: &str| total[k].as_u64().unwrap_or(0);
    println!(
        "{:>6} {:>12} {:>12.3} {:>12.3} {:>8.2} {:>8.2} {:>13.1}% {:>10.3} {:>10} {:>10}",
        "total",
        t("chunks"),
        gib(t("logical_bytes")),
        gib(t("stored_bytes")),
        total["dedupe_ratio"].as_f64().unwrap_or(1.0),
        total["compression_ratio"].as_f64().unwrap_or(1.0),
        100.0 * ratio(t("device_bytes_used"), t("device_bytes_total").max(1)),
        gib(t("dead_bytes")),
        format!("{}/{}", t("segments_free"), t("segments_total")),
        t("segments_compacted")
    );
    println!("(dedupe = bytes offered by puts and has hits since start / unique bytes stored)");
    print_net(&shards);
    println!(
        "(compaction since start: {} chunks, {:.3} GiB moved; {} puts refused for lack of space)",
        t("compaction_chunks_moved"),
        gib(t("compaction_bytes_moved")),
        t("puts_no_space")
    );
    print_cluster(&cluster);
    if let Some(ca) = &ca {
        match &ca_previous {
            Some(prev) => println!(
                "hive CA {ca} (rotated; clients pinning the previous {prev} are still accepted)"
            ),
            None => println!("hive CA {ca}"),
        }
    }
    let repair = hivefs_engine::repair::RepairProgress::load(dir);
    println!("{}", repair.describe());
    println!(
        "replication: {} copies, {} before acknowledging (a hive of fewer nodes keeps one per node); {} copies owed by puts since start (repair makes them)",
        cfg.copies,
        cfg.min_copies,
        sum("repl_owed")
    );
    Ok(())
}
