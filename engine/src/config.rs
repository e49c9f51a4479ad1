//! A node's configuration (`DIR/hive.toml`) and `hive init`: keys, certificates, token,
//! device format.
//!
//! Files in the data directory:
//! - `hive.toml`: this config;
//! - `ca.pem` (the hive CA certificate; its SHA-256 is the fingerprint clients pin),
//!   `ca.key` (kept for issuing node certificates; mode 0600), `node.pem`, `node.key`;
//!   after a CA rotation (`hive ca rotate`, [`install_ca`]) also `ca.prev.pem`, the
//!   previous CA, still trusted for peers, and `node.pem` carries the whole chain
//!   *node certificate, new CA, cross certificate, previous CA*;
//! - `admin.token` (mode 0600): the admin token in clear, for the local CLI; the config
//!   holds only its SHA-256.
//! - the chunk device (`chunks.dev` unless `--device` names a file or block device).

use crate::format::Superblock;
use crate::shard::ShardCore;
use anyhow::{bail, Context, Result};
use hivefs_net::chunk::DedupeKey;
use hivefs_net::meta::JoinGrant;
use hivefs_net::tls::CaMaterial;
use hivefs_nvme::{open_device, AlignedBuf, IoOp, IoRequest, UringOptions, BLOCK_SIZE};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

pub const CONFIG_FILE: &str = "hive.toml";
pub const DEFAULT_BASE_PORT: u16 = 7400;
pub const DEFAULT_BUCKETS: u32 = 1 << 12;
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;
pub const DEFAULT_DEVICE_BYTES: u64 = 16 << 30;
/// Requests a connection may have in flight (flow-control credits).
pub const DEFAULT_CREDITS: u32 = 64;
/// Bounds on `credits` and `commit_max_bytes` in hive.toml.
pub const MAX_CREDITS: u32 = 1024;
pub const MIN_COMMIT_BYTES: usize = 64 << 10;
pub const MAX_COMMIT_BYTES: usize = 64 << 20;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeConfig {
    pub node_id: String,
    pub device: PathBuf,
    pub listen: String,
    pub base_port: u16,
    /// The metadata service's port (the hive's front door for mounts); absent: the port
    /// just below `base_port` (0 with an ephemeral `base_port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta_port: Option<u16>,
    pub shards: u16,
    pub bucket_count: u32,
    pub segment_bytes: u64,
    pub commit_max_bytes: usize,
    pub credits: u32,
    /// Pin shard `i` to core `i % cores`.
    pub pin_cores: bool,
    pub sqpoll: bool,
    pub iopoll: bool,
    /// SHA-256 (hex) of the admin token.
    pub admin_token_sha256: String,
    pub dedupe_key: String,
    /// This node's id in the cluster map and the metadata Raft group (the first node is 1;
    /// a joining node gets the next from the leader).
    #[serde(default = "first_node_id")]
    pub raft_id: u64,
    /// Whether a brand-new metadata log starts a one-member cluster (`hive init`), or
    /// waits to be added by the hive's leader (`hive join`).
    #[serde(default = "yes")]
    pub bootstrap: bool,
    /// The host other nodes and clients use to reach this node (default: `listen`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// Failure zone (replicas go to distinct zones first).
    #[serde(default = "default_zone")]
    pub zone: String,
    /// Relative share of new data; absent: the device's size in GiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// A node silent this long is out of the map (its buckets move); see `meta/health.rs`.
    #[serde(default = "default_out_after")]
    pub out_after_secs: u64,
    /// The copies of a volume created without its own (3 by default, 2 = a mirror, 1 =
    /// tests only; each volume keeps its own `copies`). The same on every node: a joining
    /// node takes the hive's.
    #[serde(default = "default_copies")]
    pub copies: u8,
    /// Copies durable before a put is acknowledged (2 where `copies` >= 2).
    #[serde(default = "default_min_copies")]
    pub min_copies: u8,
    /// Repair and rebalance copy at most this many MiB per second (see `repair.rs`).
    #[serde(default = "default_repair_rate")]
    pub repair_mib_per_sec: u64,
    /// A scrub (every chunk re-read and checked) starts this long after the last one
    /// (0: only when asked, `hive scrub`); it reads at most `scrub_mib_per_sec`.
    #[serde(default = "default_scrub_every")]
    pub scrub_every_secs: u64,
    #[serde(default = "default_scrub_rate")]
    pub scrub_mib_per_sec: u64,
    /// How the shards' ports are served (kernel TCP, or DPDK with a userspace stack).
    /// Last: a TOML table follows the plain values.
    #[serde(default, skip_serializing_if = "NetConfig::is_kernel")]
    pub net: NetConfig,
}

/// The transport of the shards' ports (`[net]` in hive.toml; `hive run --net` overrides).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    pub mode: NetMode,
    /// The DPDK port, by device name: a virtual device named in `eal_args`
    /// (`--vdev net_af_xdp0,iface=eth0` is port `net_af_xdp0`) or a PCI address.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub dpdk_port: String,
    /// EAL arguments, e.g. `--no-huge -m 512 --file-prefix hive1 --vdev ...`, or
    /// `--in-memory` with reserved hugepages (never both `--no-huge` and `--in-memory`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub eal_args: Vec<String>,
    /// The node's IPv4 address on the DPDK port, with its prefix (`10.0.0.5/24`). The
    /// userspace stack owns it: no kernel interface may carry it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub dpdk_addr: String,
    /// Default gateway on the DPDK port (for peers outside the prefix).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dpdk_gateway: Option<String>,
    /// How long a shard keeps polling its queue without sleeping after its last packet,
    /// in microseconds (default [`DEFAULT_SPIN_US`]). Long on dedicated cores; short
    /// where shards share cores with other work (see ARCHITECTURE.md, DPDK).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spin_us: Option<u64>,
}

/// See [`NetConfig::spin_us`].
pub const DEFAULT_SPIN_US: u64 = 2000;
/// The longest spin accepted (a second of polling after a packet is a misconfiguration).
pub const MAX_SPIN_US: u64 = 1_000_000;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetMode {
    /// Kernel TCP (mio sockets): the default.
    #[default]
    Kernel,
    /// DPDK: each shard polls its queue and runs TCP in userspace (cargo feature `dpdk`).
    Dpdk,
}

impl std::str::FromStr for NetMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<NetMode, String> {
        match s {
            "kernel" => Ok(NetMode::Kernel),
            "dpdk" => Ok(NetMode::Dpdk),
            other => Err(format!("unknown transport {other:?} (kernel or dpdk)")),
        }
    }
}

impl NetConfig {
    pub fn is_kernel(&self) -> bool {
        self.mode == NetMode::Kernel
    }

    /// The DPDK settings are complete and consistent.
    pub fn check(&self) -> Result<()> {
        if self.mode == NetMode::Kernel {
            return Ok(());
        }
        if self.dpdk_port.is_empty() {
            bail!("net mode dpdk needs a port (dpdk_port / --dpdk-port, e.g. net_af_xdp0)");
        }
        if self.eal_args.iter().any(|a| a == "--no-huge")
            && self.eal_args.iter().any(|a| a == "--in-memory")
        {
            bail!("EAL arguments: --no-huge and --in-memory together are not supported");
        }
        self.dpdk_ipv4()?;
        if self.spin_us.is_some_and(|s| s > MAX_SPIN_US) {
            bail!("spin_us: at most {MAX_SPIN_US}");
        }
        if let Some(g) = &self.dpdk_gateway {
            g.parse::<std::net::Ipv4Addr>()
                .with_context(|| format!("dpdk_gateway {g:?} is not an IPv4 address"))?;
        }
        Ok(())
    }

    /// How long a shard polls its queue after its last packet before it sleeps.
    pub fn spin(&self) -> std::time::Duration {
        std::time::Duration::from_micros(self.spin_us.unwrap_or(DEFAULT_SPIN_US))
    }

    /// `dpdk_addr` as address and prefix length.
    pub fn dpdk_ipv4(&self) -> Result<(std::net::Ipv4Addr, u8)> {
        let (a, p) = self.dpdk_addr.split_once('/').with_context(|| {
            format!(
                "dpdk_addr {:?} must be ADDRESS/PREFIX, e.g. 10.0.0.5/24",
                self.dpdk_addr
            )
        })?;
        let addr = a
            .parse()
            .with_context(|| format!("dpdk_addr {a:?} is not an IPv4 address"))?;
        let prefix: u8 = p
            .parse()
            .ok()
            .filter(|p| (1..=32).contains(p))
            .with_context(|| format!("dpdk_addr prefix {p:?} must be 1..32"))?;
        Ok((addr, prefix))
    }
}

fn default_scrub_every() -> u64 {
    7 * 24 * 3600
}

fn default_scrub_rate() -> u64 {
    32
}

fn default_repair_rate() -> u64 {
    64
}

pub fn default_copies() -> u8 {
    3
}

pub fn default_min_copies() -> u8 {
    2
}

fn default_out_after() -> u64 {
    crate::meta::health::DEFAULT_OUT_AFTER_SECS
}

fn first_node_id() -> u64 {
    1
}

fn yes() -> bool {
    true
}

pub fn default_zone() -> String {
    "default".into()
}

impl NodeConfig {
    pub fn load(dir: &Path) -> Result<NodeConfig> {
        let p = dir.join(CONFIG_FILE);
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        let cfg: NodeConfig =
            toml::from_str(&text).with_context(|| format!("parsing {}", p.display()))?;
        if cfg.shards == 0 || cfg.shards as u32 > crate::format::MAX_SHARDS {
            bail!(
                "{}: shards must be 1..={}",
                p.display(),
                crate::format::MAX_SHARDS
            );
        }
        // Both size buffers every shard allocates at start: refuse values that would not fit.
        if !(MIN_COMMIT_BYTES..=MAX_COMMIT_BYTES).contains(&cfg.commit_max_bytes) {
            bail!(
                "{}: commit_max_bytes must be {MIN_COMMIT_BYTES}..={MAX_COMMIT_BYTES}, not {}",
                p.display(),
                cfg.commit_max_bytes
            );
        }
        if !(1..=MAX_CREDITS).contains(&cfg.credits) {
            bail!(
                "{}: credits must be 1..={MAX_CREDITS}, not {}",
                p.display(),
                cfg.credits
            );
        }
        if cfg.copies == 0 || !(1..=cfg.copies).contains(&cfg.min_copies) {
            bail!(
                "{}: copies must be at least 1 and min_copies 1..=copies (copies {}, min_copies {})",
                p.display(),
                cfg.copies,
                cfg.min_copies
            );
        }
        Ok(cfg)
    }

    /// The host other nodes and clients reach this node at.
    pub fn advertise_host(&self) -> &str {
        self.advertise.as_deref().unwrap_or(&self.listen)
    }

    /// The host this node's own tools (`hive status`, `gc`, ...) reach it at. With DPDK
    /// the advertised address belongs to the userspace stack, which the node's own
    /// kernel cannot reach: its tools use the kernel listeners (loopback) instead.
    pub fn local_host(&self) -> &str {
        match self.net.mode {
            NetMode::Kernel => self.advertise_host(),
            NetMode::Dpdk if self.listen == "0.0.0.0" || self.listen == "::" => "127.0.0.1",
            NetMode::Dpdk => &self.listen,
        }
    }

    pub fn dedupe_key(&self) -> Result<DedupeKey> {
        DedupeKey::from_hex(&self.dedupe_key)
            .context("dedupe_key in hive.toml is not 64 hex digits")
    }

    pub fn uring_options(&self) -> UringOptions {
        UringOptions {
            sqpoll: self.sqpoll,
            iopoll: self.iopoll,
            ..Default::default()
        }
    }

    /// The metadata port (see the field).
    pub fn meta_port(&self) -> u16 {
        self.meta_port.unwrap_or(self.base_port.saturating_sub(1))
    }
}

/// What `hive init` is asked for.
#[derive(Clone, Debug)]
pub struct InitOptions {
    pub data_dir: PathBuf,
    pub device: Option<PathBuf>,
    pub size_bytes: Option<u64>,
    pub shards: u16,
    pub base_port: u16,
    pub meta_port: Option<u16>,
    pub listen: String,
    pub node_id: String,
    pub bucket_count: u32,
    pub segment_bytes: u64,
    /// Where others reach this node (default: `listen`).
    pub advertise: Option<String>,
    pub zone: String,
    /// Copies per chunk and copies before acknowledging (a joining node takes the hive's).
    pub copies: u8,
    pub min_copies: u8,
    /// The shards' transport (`[net]`; kernel TCP by default).
    pub net: NetConfig,
}

/// What a node joining an existing hive was given (`hive join`): the hive's CA, dedupe key
/// and bucket count, its node id, and the admin token it joined with.
#[derive(Clone, Debug)]
pub struct Joining {
    pub grant: JoinGrant,
    pub admin_token: String,
}

/// What `hive init` made, for printing.
pub struct InitOutcome {
    pub config: NodeConfig,
    pub admin_token: String,
    pub ca_fingerprint: String,
}

pub fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut b = [0u8; N];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("reading /dev/urandom")?;
    Ok(b)
}

fn write_private(path: &Path, data: &str) -> Result<()> {
    std::fs::write(path, data).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

/// Parse sizes like `8G`, `512M`, `64K`, `4096`.
pub fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let unit = s[i..].to_ascii_uppercase();
            let m = match unit.trim_end_matches("IB").trim_end_matches('B') {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1u64 << 40,
                _ => bail!("unknown size unit in {s:?}"),
            };
            (&s[..i], m)
        }
        None => (s, 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .with_context(|| format!("bad size {s:?}"))?;
    n.checked_mul(mult)
        .with_context(|| format!("size {s:?} overflows"))
}

/// `hive init`: create the data directory, keys, certificates and token, and format the
/// device. Refuses to overwrite an existing configuration.
pub fn init(o: &InitOptions) -> Result<InitOutcome> {
    init_node(o, None)
}

/// `hive join`: as [`init`], for a node of an existing hive: its CA, dedupe key, bucket
/// count, admin token and node id come from `joining`; the metadata log starts empty
/// (`bootstrap = false`) until the leader adds this node.
pub fn init_joined(o: &InitOptions, joining: &Joining) -> Result<InitOutcome> {
    joining
        .grant
        .validate()
        .map_err(|e| anyhow::anyhow!("the hive's join grant is malformed ({e})"))?;
    init_node(o, Some(joining))
}

fn init_node(o: &InitOptions, joining: Option<&Joining>) -> Result<InitOutcome> {
    o.net.check()?;
    std::fs::create_dir_all(&o.data_dir)
        .with_context(|| format!("creating {}", o.data_dir.display()))?;
    let dir = o.data_dir.canonicalize()?;
    if dir.join(CONFIG_FILE).exists() {
        bail!(
            "{} already holds a hive node (hive.toml exists)",
            dir.display()
        );
    }
    let device = o.device.clone().unwrap_or_else(|| dir.join("chunks.dev"));
    let is_block = std::fs::metadata(&device)
        .map(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()))
        .unwrap_or(false);
    let size = if is_block {
        None
    } else {
        Some(o.size_bytes.unwrap_or(DEFAULT_DEVICE_BYTES))
    };

    let (key, token, ca, bucket_count) = match joining {
        Some(j) => (
            DedupeKey::from_hex(&j.grant.dedupe_key).context("the hive's dedupe key")?,
            j.admin_token.trim().to_string(),
            CaMaterial {
                cert_pem: j.grant.ca_cert_pem.clone(),
                key_pem: j.grant.ca_key_pem.clone(),
            },
            j.grant.bucket_count,
        ),
        None => (
            DedupeKey(random_bytes::<32>()?),
            hex::encode(random_bytes::<32>()?),
            hivefs_net::tls::generate_ca(&format!("hive {}", o.node_id))
                .map_err(|e| anyhow::anyhow!("{e}"))?,
            o.bucket_count,
        ),
    };
    let sans = node_sans(&o.node_id, &o.listen, o.advertise.as_deref());
    let (node_pem, node_key) =
        hivefs_net::tls::issue_node_cert(&ca.cert_pem, &ca.key_pem, &o.node_id, &sans)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    let fingerprint =
        hivefs_net::tls::fingerprint_pem(&ca.cert_pem).map_err(|e| anyhow::anyhow!("{e}"))?;

    // Format the device: superblock, then every shard's control block and segment headers.
    let mut dev = open_device(&device, size, UringOptions::default())
        .with_context(|| format!("opening device {}", device.display()))?;
    let sb = Superblock::plan(
        dev.capacity_bytes(),
        o.shards,
        o.segment_bytes,
        bucket_count,
        key.0,
    )
    .map_err(|e| anyhow::anyhow!("cannot lay out {}: {e}", device.display()))?;
    for s in 0..o.shards {
        ShardCore::format(dev.as_mut(), &sb.shard_layout(s))?;
    }
    let mut b = AlignedBuf::new(BLOCK_SIZE);
    b.copy_from_slice(&sb.encode());
    for c in hivefs_nvme::run_sync(
        dev.as_mut(),
        vec![
            IoRequest {
                tag: 0,
                op: IoOp::Write { offset: 0, buf: b },
            },
            IoRequest {
                tag: 1,
                op: IoOp::Flush,
            },
        ],
    )? {
        c.result?;
    }
    drop(dev);

    let config = NodeConfig {
        node_id: o.node_id.clone(),
        device,
        listen: o.listen.clone(),
        base_port: o.base_port,
        meta_port: o.meta_port,
        shards: o.shards,
        bucket_count,
        segment_bytes: o.segment_bytes,
        commit_max_bytes: 4 << 20,
        credits: DEFAULT_CREDITS,
        pin_cores: true,
        sqpoll: false,
        iopoll: false,
        admin_token_sha256: hex::encode(Sha256::digest(token.as_bytes())),
        dedupe_key: key.to_hex(),
        raft_id: joining.map_or(1, |j| j.grant.id),
        bootstrap: joining.is_none(),
        advertise: o.advertise.clone(),
        zone: o.zone.clone(),
        weight: None,
        out_after_secs: default_out_after(),
        copies: joining.map_or(o.copies, |j| j.grant.copies),
        min_copies: joining.map_or(o.min_copies, |j| j.grant.min_copies),
        repair_mib_per_sec: default_repair_rate(),
        scrub_every_secs: default_scrub_every(),
        scrub_mib_per_sec: default_scrub_rate(),
        net: o.net.clone(),
    };
    std::fs::write(dir.join("ca.pem"), &ca.cert_pem)?;
    write_private(&dir.join("ca.key"), &ca.key_pem)?;
    std::fs::write(dir.join("node.pem"), &node_pem)?;
    write_private(&dir.join("node.key"), &node_key)?;
    write_private(&dir.join("admin.token"), &token)?;
    write_private(&dir.join(CONFIG_FILE), &toml::to_string_pretty(&config)?)?;
    Ok(InitOutcome {
        config,
        admin_token: token,
        ca_fingerprint: fingerprint,
    })
}

/// The names a node certificate is valid for: loopback, the node's name, where it
/// listens and where it is reached.
fn node_sans(node_id: &str, listen: &str, advertise: Option<&str>) -> Vec<String> {
    let mut sans = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        node_id.to_string(),
    ];
    for h in [Some(listen), advertise].into_iter().flatten() {
        if !sans.iter().any(|s| s == h) {
            sans.push(h.to_string());
        }
    }
    sans
}

/// `hive cert rotate`: a new key and node certificate from the hive CA, replacing
/// `node.key` and `node.pem` (each written whole, then renamed into place). A running
/// node presents it on its next connections within a second (`NodeIdentity`); until both
/// files are the new pair it keeps presenting the old one. Returns the new certificate's
/// SHA-256.
pub fn rotate_node_cert(dir: &Path) -> Result<String> {
    let cfg = NodeConfig::load(dir)?;
    let read =
        |f: &str| std::fs::read_to_string(dir.join(f)).with_context(|| format!("reading {f}"));
    let sans = node_sans(&cfg.node_id, &cfg.listen, cfg.advertise.as_deref());
    let ca = read("ca.pem")?;
    let (cert, key) = hivefs_net::tls::issue_node_cert(&ca, &read("ca.key")?, &cfg.node_id, &sans)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    // After a CA rotation the chain carries the cross certificate and the previous CA.
    let chain = match (read("ca.cross.pem"), read("ca.prev.pem")) {
        (Ok(cross), Ok(prev)) => rotated_chain(&cert, &ca, &cross, &prev),
        _ => cert.clone(),
    };
    replace_file(dir, "node.key", &key, true)?;
    replace_file(dir, "node.pem", &chain, false)?;
    std::fs::File::open(dir)?.sync_all()?;
    hivefs_net::tls::fingerprint_pem(&cert).map_err(|e| anyhow::anyhow!("{e}"))
}

/// What a node of a hive whose CA was rotated presents: its certificate, the CA, the
/// cross certificate (the CA signed by the previous one) and the previous CA.
fn rotated_chain(cert: &str, ca: &str, cross: &str, previous: &str) -> String {
    format!(
        "{}\n{}\n{}\n{}\n",
        cert.trim(),
        ca.trim(),
        cross.trim(),
        previous.trim()
    )
}

/// Write `text` to `dir/name` whole: a temporary file, fsynced, renamed into place.
fn replace_file(dir: &Path, name: &str, text: &str, private: bool) -> Result<()> {
    let tmp = dir.join(format!("{name}.new"));
    if private {
        write_private(&tmp, text)?;
    } else {
        std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    }
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, dir.join(name)).with_context(|| format!("replacing {name}"))?;
    Ok(())
}

/// The CAs this node trusts for peers: its CA and, after a rotation, the previous one
/// (a node not rotated yet presents a certificate of that one).
pub fn trust_bundle(dir: &Path) -> Result<String> {
    let mut pem = std::fs::read_to_string(dir.join("ca.pem")).context("reading ca.pem")?;
    match std::fs::read_to_string(dir.join("ca.prev.pem")) {
        Ok(prev) => pem.push_str(&prev),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).context("reading ca.prev.pem"),
    }
    Ok(pem)
}

/// Make this node's CA files and certificate those of the hive's CA rotation `rot`
/// (see [`hivefs_net::tls::rotate_ca`]): a new node key and certificate issued by the
/// new CA, presented as *certificate, new CA, cross certificate, previous CA*, so that
/// clients pinning either CA accept it; then the new CA as `ca.pem` (its key as `ca.key`)
/// and the previous one as `ca.prev.pem`. The running node presents the new pair on new
/// connections within a second (`NodeIdentity`); connections made before keep theirs.
/// Returns whether anything changed (nothing when already installed). Crash-safe: each
/// file is replaced whole, and `ca.pem` last, so an interrupted install is redone.
pub fn install_ca(dir: &Path, rot: &hivefs_net::meta::CaRotation) -> Result<bool> {
    let read =
        |f: &str| std::fs::read_to_string(dir.join(f)).with_context(|| format!("reading {f}"));
    let ca = read("ca.pem")?;
    let cross = rot.cross_cert_pem.trim();
    if ca == rot.ca_cert_pem && read("node.pem")?.contains(cross) {
        return Ok(false);
    }
    if ca != rot.ca_cert_pem && ca != rot.previous_cert_pem {
        bail!("this node's CA is neither the rotated CA nor the one it replaces");
    }
    let cfg = NodeConfig::load(dir)?;
    let sans = node_sans(&cfg.node_id, &cfg.listen, cfg.advertise.as_deref());
    let (leaf, key) =
        hivefs_net::tls::issue_node_cert(&rot.ca_cert_pem, &rot.ca_key_pem, &cfg.node_id, &sans)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    let chain = rotated_chain(&leaf, &rot.ca_cert_pem, cross, &rot.previous_cert_pem);
    replace_file(dir, "ca.prev.pem", &rot.previous_cert_pem, false)?;
    replace_file(dir, "ca.cross.pem", &rot.cross_cert_pem, false)?;
    replace_file(dir, "node.key", &key, true)?;
    replace_file(dir, "node.pem", &chain, false)?;
    replace_file(dir, "ca.key", &rot.ca_key_pem, true)?;
    replace_file(dir, "ca.pem", &rot.ca_cert_pem, false)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(true)
}

/// The CA fingerprint of a node's data directory.
pub fn ca_fingerprint(dir: &Path) -> Result<String> {
    let pem = std::fs::read_to_string(dir.join("ca.pem")).context("reading ca.pem")?;
    hivefs_net::tls::fingerprint_pem(&pem).map_err(|e| anyhow::anyhow!("{e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_bounds_are_checked() {
        let dir = std::env::temp_dir().join(format!("hive-cfg-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = NodeConfig {
            node_id: "n".into(),
            device: dir.join("dev"),
            listen: "127.0.0.1".into(),
            base_port: 1,
            meta_port: None,
            shards: 1,
            bucket_count: 16,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            commit_max_bytes: 4 << 20,
            credits: DEFAULT_CREDITS,
            pin_cores: false,
            sqpoll: false,
            iopoll: false,
            admin_token_sha256: String::new(),
            dedupe_key: String::new(),
            raft_id: 1,
            bootstrap: true,
            advertise: None,
            zone: default_zone(),
            weight: None,
            out_after_secs: default_out_after(),
            copies: 3,
            min_copies: 2,
            repair_mib_per_sec: 64,
            scrub_every_secs: 0,
            scrub_mib_per_sec: 32,
            net: NetConfig::default(),
        };
        let write = |c: &NodeConfig| {
            std::fs::write(dir.join(CONFIG_FILE), toml::to_string(c).unwrap()).unwrap()
        };
        write(&good);
        assert!(NodeConfig::load(&dir).is_ok());
        write(&NodeConfig {
            commit_max_bytes: 1 << 40,
            ..good.clone()
        });
        assert!(NodeConfig::load(&dir)
            .unwrap_err()
            .to_string()
            .contains("commit_max_bytes"));
        write(&NodeConfig {
            credits: 0,
            ..good.clone()
        });
        assert!(NodeConfig::load(&dir)
            .unwrap_err()
            .to_string()
            .contains("credits"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("8G").unwrap(), 8 << 30);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
