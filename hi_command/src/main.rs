//! `hi`: the HiveFS client host command.
//!
//! - `hi format DISK --hive HOST:PORT --token T --ca FINGERPRINT --volume NAME`: makes a
//!   block device or a file a client disk (superblock, journal, cache; disk.rs).
//! - `hi mount DISK MOUNTPOINT [--writeback]`: mounts the disk's volume, replaying what
//!   its journal holds first; or, without a disk, `hi mount --hive HOST:PORT --token T
//!   --ca FINGERPRINT --volume NAME MOUNTPOINT` (or `--config FILE`), writes in memory
//!   only. Serves until SIGINT/SIGTERM or `hi umount`, then unmounts cleanly.
//! - `hi umount MOUNTPOINT`
//! - `hi volume create|list --hive ... [NAME]`

mod cache;
mod disk;
mod fetch;
mod fs;
mod hints;
mod invalidate;
mod journal;
mod leases;
mod locks;
mod offline;
mod reclaim;
mod writeback;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use fs::{HiveFs, Mounted};
use hivefs_client::hive::ClientOptions;
use hivefs_client::meta::MetaClient;
use hivefs_net::meta::{Answer, Mutation, Query};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "hi", about = "HiveFS client host command")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// How to reach the hive (command line, or a TOML file with the same keys).
#[derive(Args, Clone, Debug, Default)]
struct HiveArgs {
    /// The hive's metadata address, HOST:PORT.
    #[arg(long)]
    hive: Option<String>,
    /// The access token.
    #[arg(long)]
    token: Option<String>,
    /// A file holding the access token.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// SHA-256 fingerprint of the hive CA (pinned).
    #[arg(long)]
    ca: Option<String>,
    /// Plain TCP (only for nodes run with --insecure).
    #[arg(long)]
    insecure: bool,
    /// A TOML file with hive, token (or token_file), ca, volume.
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Make a block device or a file a client disk: superblock, journal, chunk cache.
    Format {
        #[command(flatten)]
        hive: HiveArgs,
        /// The volume this disk mounts.
        #[arg(long)]
        volume: Option<String>,
        /// Journal size (K, M, G): what may be written here before the hive has it.
        #[arg(long, default_value = "256M", value_parser = disk::parse_size)]
        journal: u64,
        /// Chunk cache size (default: the rest of a block device, 256M in a file).
        #[arg(long, value_parser = disk::parse_size)]
        cache: Option<u64>,
        /// Directory for the root-only token file.
        #[arg(long, default_value = disk::DEFAULT_SECRETS)]
        secrets: PathBuf,
        /// Overwrite what is there: another filesystem, a damaged superblock, or journal
        /// records not yet committed.
        #[arg(long)]
        force: bool,
        /// The block device or file.
        disk: PathBuf,
    },
    /// Mount a volume and serve it until interrupted: `hi mount DISK MOUNTPOINT`, or
    /// `hi mount --hive ... --volume NAME MOUNTPOINT` without a client disk.
    Mount {
        #[command(flatten)]
        hive: HiveArgs,
        /// The volume to mount (without a client disk).
        #[arg(long)]
        volume: Option<String>,
        /// FUSE worker threads.
        #[arg(long, default_value_t = 4)]
        threads: usize,
        /// fsync and close return once the client disk's journal holds the writes (the
        /// hive gets them in the background).
        #[arg(long)]
        writeback: bool,
        /// How long a write waits for room in a full journal before it fails (seconds).
        #[arg(long, default_value_t = 300)]
        journal_wait: u64,
        /// Directory of the token file (`hi format --secrets`).
        #[arg(long, default_value = disk::DEFAULT_SECRETS)]
        secrets: PathBuf,
        /// Fault injection for tests: the client disk keeps writes in memory until they are
        /// flushed, so killing `hi` loses what a power cut would.
        #[arg(long, hide = true)]
        fault_power_loss: bool,
        /// [DISK] MOUNTPOINT
        #[arg(num_args = 1..=2, required = true)]
        paths: Vec<PathBuf>,
    },
    /// Unmount a mounted volume.
    Umount { mountpoint: PathBuf },
    /// The chunk cache of a client disk (live figures while it is mounted).
    Cache {
        #[command(subcommand)]
        cmd: CacheCmd,
    },
    /// Read every file under PATH (in a mount) so its chunks are cached, with progress.
    Warmup { path: PathBuf },
    /// What a client disk holds: its volume and hive, and the journal records not yet
    /// committed (live figures while it is mounted).
    Status {
        /// Directory of the token and status files (`hi format --secrets`).
        #[arg(long, default_value = disk::DEFAULT_SECRETS)]
        secrets: PathBuf,
        disk: PathBuf,
    },
    /// Volumes: create, list.
    Volume {
        #[command(subcommand)]
        cmd: VolumeCmd,
    },
}

#[derive(Subcommand)]
enum CacheCmd {
    Status {
        /// Directory of the token and status files (`hi format --secrets`).
        #[arg(long, default_value = disk::DEFAULT_SECRETS)]
        secrets: PathBuf,
        disk: PathBuf,
    },
}

#[derive(Subcommand)]
enum VolumeCmd {
    Create {
        #[command(flatten)]
        hive: HiveArgs,
        name: String,
        /// Copies of every chunk (the hive's default, `hive init --copies`, when not
        /// given: 3 unless changed; 2 = mirror, 1 = no redundancy: tests only). A chunk
        /// shared with another volume keeps the most copies either asks.
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=hivefs_net::proto::MAX_LEVEL as i64))]
        copies: Option<u8>,
    },
    List {
        #[command(flatten)]
        hive: HiveArgs,
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
            tracing_subscriber::EnvFilter::try_from_env("HI_LOG").unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = real_main() {
        eprintln!("hi: {e:#}");
        std::process::exit(1);
    }
}

/// Settings from the command line, completed from `--config`.
struct Resolved {
    opts: ClientOptions,
    port: u16,
    volume: Option<String>,
}

fn resolve(h: &HiveArgs, volume: Option<String>) -> Result<Resolved> {
    let mut h = h.clone();
    let mut volume = volume;
    if let Some(path) = &h.config {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let v: toml::Table =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
        h.hive = h.hive.or(s("hive"));
        h.token = h.token.or(s("token"));
        h.token_file = h.token_file.or(s("token_file").map(PathBuf::from));
        h.ca = h.ca.or(s("ca"));
        h.insecure |= v.get("insecure").and_then(|x| x.as_bool()).unwrap_or(false);
        volume = volume.or(s("volume"));
    }
    let hive = h
        .hive
        .context("--hive HOST:PORT is required (or hive = in --config)")?;
    let (host, port) = hive
        .rsplit_once(':')
        .with_context(|| format!("--hive {hive:?}: expected HOST:PORT"))?;
    let port: u16 = port
        .parse()
        .with_context(|| format!("bad port in {hive:?}"))?;
    let token = match (&h.token, &h.token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("reading {}", f.display()))?
            .trim()
            .to_string(),
        (None, None) => bail!("--token or --token-file is required"),
    };
    let ca = match (&h.ca, h.insecure) {
        (Some(c), false) => Some(c.as_str()),
        (None, false) => bail!("--ca FINGERPRINT is required (or --insecure for plain TCP nodes)"),
        (_, true) => None,
    };
    let mut opts = ClientOptions::new(host, 0, &token, ca);
    opts.client_name = format!("hi/{}", std::process::id());
    Ok(Resolved { opts, port, volume })
}

fn connect(r: &Resolved) -> Result<MetaClient> {
    MetaClient::connect(&r.opts, r.port)
        .with_context(|| format!("connecting to the hive at {}:{}", r.opts.host, r.port))
}

fn real_main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Format {
            hive,
            volume,
            journal,
            cache,
            secrets,
            force,
            disk,
        } => {
            let r = resolve(&hive, volume)?;
            let name = r.volume.clone().context("--volume NAME is required")?;
            // The volume must exist: a disk is formatted for it.
            lookup_volume(&connect(&r)?, &name)?;
            let sb = disk::format(&disk::FormatSpec {
                path: &disk,
                journal,
                cache,
                hive: vec![format!("{}:{}", r.opts.host, r.port)],
                ca: r.opts.ca_fingerprint.clone(),
                volume: name,
                token: r.opts.token.clone(),
                secrets: &secrets,
                force,
            })?;
            println!(
                "formatted {}: client {:016x}, volume {}, journal {} MiB, cache {} MiB; token in {}",
                disk.display(),
                sb.client_id,
                sb.volume,
                sb.layout.journal_len >> 20,
                sb.layout.cache_len >> 20,
                disk::token_path(&secrets, sb.client_id).display()
            );
            Ok(())
        }
        Cmd::Mount {
            hive,
            volume,
            threads,
            writeback,
            journal_wait,
            secrets,
            fault_power_loss,
            paths,
        } => match paths.as_slice() {
            [mountpoint] => {
                if writeback {
                    bail!("--writeback needs a client disk: hi mount DISK MOUNTPOINT");
                }
                mount(&resolve(&hive, volume)?, None, threads, mountpoint)
            }
            [disk, mountpoint] => {
                let opened = disk::open(disk, fault_power_loss)?;
                let sb = &opened.sb;
                let token = disk::read_token(&secrets, sb.client_id)?;
                let hive_args = HiveArgs {
                    hive: sb.hive.first().cloned(),
                    token: Some(token),
                    ca: sb.ca.clone(),
                    insecure: sb.ca.is_none(),
                    ..HiveArgs::default()
                };
                let r = resolve(&hive_args, Some(sb.volume.clone()))?;
                let cache = disk::open_cache(disk, sb)?;
                let local = Local {
                    cache,
                    status_file: disk::status_path(&secrets, sb.client_id),
                    disk: opened,
                    write_back: writeback,
                    journal_wait: Duration::from_secs(journal_wait),
                };
                mount(&r, Some(local), threads, mountpoint)
            }
            _ => bail!("hi mount [DISK] MOUNTPOINT"),
        },
        Cmd::Umount { mountpoint } => umount(&mountpoint),
        Cmd::Status { secrets, disk } => status(&disk, &secrets),
        Cmd::Cache {
            cmd: CacheCmd::Status { secrets, disk },
        } => cache_status(&disk, &secrets),
        Cmd::Warmup { path } => warmup(&path),
        Cmd::Volume {
            cmd: VolumeCmd::Create { hive, name, copies },
        } => {
            let meta = connect(&resolve(&hive, None)?)?;
            match fs::answer(meta.mutate(
                0,
                Mutation::CreateVolume {
                    name: name.clone(),
                    copies: copies.unwrap_or(0),
                },
            )?)? {
                Answer::Volume(v) if v.copies == 1 => {
                    eprintln!(
                        "hi: warning: volume {} keeps ONE copy of its data: no redundancy",
                        v.name
                    );
                    println!("volume {} created (id {}, copies 1)", v.name, v.id)
                }
                Answer::Volume(v) => println!(
                    "volume {} created (id {}, copies {})",
                    v.name, v.id, v.copies
                ),
                other => bail!("unexpected answer {other:?}"),
            }
            Ok(())
        }
        Cmd::Volume {
            cmd: VolumeCmd::List { hive },
        } => {
            let meta = connect(&resolve(&hive, None)?)?;
            match fs::answer(meta.query(0, Query::Volumes)?)? {
                Answer::Volumes(vs) => {
                    for v in vs {
                        println!("{}\tid {}\tcopies {}", v.name, v.id, v.copies);
                    }
                }
                other => bail!("unexpected answer {other:?}"),
            }
            Ok(())
        }
    }
}

fn lookup_volume(meta: &MetaClient, name: &str) -> Result<hivefs_net::meta::VolumeInfo> {
    match meta.query(
        0,
        Query::Volume {
            name: name.to_string(),
        },
    )? {
        Ok(Answer::Volume(v)) => Ok(v),
        Ok(other) => bail!("unexpected answer {other:?}"),
        Err(e) if e == hivefs_net::meta::Errno::NOENT => {
            bail!("volume {name:?} does not exist (create it with `hi volume create`)")
        }
        Err(e) => bail!("looking up volume {name:?}: {e}"),
    }
}

/// A mount's client disk.
struct Local {
    disk: disk::Disk,
    /// Where the mount keeps its figures for `hi status`.
    status_file: PathBuf,
    cache: Option<hivefs_localdisk::DiskCache>,
    write_back: bool,
    journal_wait: Duration,
}

fn mount(
    r: &Resolved,
    mut local: Option<Local>,
    threads: usize,
    mountpoint: &std::path::Path,
) -> Result<()> {
    let name = r.volume.clone().context("--volume NAME is required")?;
    let journal_wait = local
        .as_ref()
        .map_or(Duration::from_secs(300), |l| l.journal_wait);
    let status_file = local.as_ref().map(|l| l.status_file.clone());
    let disk_cache = local.as_mut().and_then(|l| l.cache.take());
    let (meta, journal, write_back) = match local {
        None => (Arc::new(connect(r)?), None, false),
        Some(l) => {
            let sb = l.disk.sb.clone();
            let (mut j, rec) = hivefs_localdisk::Journal::open(l.disk.dev, &sb.layout)
                .context("opening the client disk's journal")?;
            // The disk's client id, with mutation numbers no earlier mount used.
            let first_seq = (j.generation() as u64) << 32;
            let meta = Arc::new(
                MetaClient::connect_as(&r.opts, r.port, sb.client_id, first_seq).with_context(
                    || format!("connecting to the hive at {}:{}", r.opts.host, r.port),
                )?,
            );
            if !rec.records.is_empty() {
                let vol = lookup_volume(&meta, &name)?;
                let hive = fs::replay_hive(&meta, &vol)?;
                let t = std::time::Instant::now();
                let done = journal::replay(&hive, &rec.records).map_err(|e| {
                    anyhow::anyhow!(
                        "replaying the journal: {e:?} (nothing lost: it stays for the next mount)"
                    )
                })?;
                let tail = j.tail();
                j.set_head(tail).context("trimming the replayed journal")?;
                eprintln!(
                    "hi: journal replayed: {} records, {} bytes into {} files ({} dropped; {} \
                     records committed before already); {} namespace changes made offline \
                     ({} refused by the hive: conflicts) in {:.1?}",
                    done.records,
                    done.bytes,
                    done.files,
                    done.dropped_files,
                    done.already_done,
                    done.ops,
                    done.conflicts,
                    t.elapsed()
                );
            }
            let svc = journal::JournalService::start(j, l.journal_wait)?;
            (meta, Some(svc), l.write_back)
        }
    };
    let vol = lookup_volume(&meta, &name)?;
    let fs = HiveFs::new(Mounted {
        meta: meta.clone(),
        volume: vol.id,
        copies: vol.copies,
        journal: journal.clone(),
        write_back,
        journal_wait,
        disk_cache,
    })?;
    let hive = fs.hive.clone();
    let ended = fs.ended.clone();
    let hints = fs.hints.clone();
    let leases = fs.leases.clone();
    let notifier = fs.notifier.clone();
    let stale = fs.stale_marker();
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![
        fuser::MountOption::FSName(format!("hivefs:{name}")),
        fuser::MountOption::Subtype("hivefs".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::Dev,
        fuser::MountOption::Suid,
    ];
    cfg.acl = fuser::SessionACL::All;
    cfg.n_threads = Some(threads.max(1));
    // SAFETY: installing async-signal-safe handlers that only store to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let session = fuser::Session::new(fs, mountpoint, &cfg).with_context(|| {
        format!(
            "mounting {} (needs /dev/fuse and root)",
            mountpoint.display()
        )
    })?;
    let bg = session.spawn().context("starting the FUSE session")?;
    fs::raise_kernel_read_ahead(mountpoint);
    // Other mounts' changes, pushed by the hive, into this kernel's caches.
    let _ = notifier.set(bg.notifier());
    let invalidator = invalidate::Invalidator::start(
        &meta,
        vol.id,
        bg.notifier(),
        hints,
        leases,
        hive.offline.clone(),
        stale,
    );
    println!("mounted {name} at {}", mountpoint.display());
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let mut ticks = 0u64;
    while !STOP.load(Ordering::SeqCst) && !ended.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
        if let (Some(j), Some(path)) = (&journal, &status_file) {
            if ticks.is_multiple_of(10) {
                let mode = if write_back { "writeback" } else { "default" };
                let cache = hive.cache.disk_stats();
                let offline = hive.offline.as_ref().map(|o| o.status());
                disk::write_status(
                    path,
                    &name,
                    mountpoint,
                    mode,
                    &j.status(),
                    cache.as_ref(),
                    &offline.unwrap_or_default(),
                );
            }
        }
        ticks += 1;
    }
    if let Some(o) = &hive.offline {
        o.stop();
    }
    if let Some(path) = &status_file {
        let _ = std::fs::remove_file(path);
    }
    if let Some(inv) = invalidator {
        inv.stop();
    }
    if ended.load(Ordering::SeqCst) {
        let _ = bg.join();
    } else {
        bg.umount_and_join().context("unmounting")?;
    }
    eprintln!("hi: unmounted {}", mountpoint.display());
    Ok(())
}

fn status(path: &std::path::Path, secrets: &std::path::Path) -> Result<()> {
    let d = disk::open(path, false)?;
    let sb = d.sb.clone();
    println!("disk      {}", path.display());
    println!("client    {:016x}", sb.client_id);
    println!("hive      {}", sb.hive.join(", "));
    println!("volume    {}", sb.volume);
    println!(
        "journal   {} MiB, cache {} MiB",
        sb.layout.journal_len >> 20,
        sb.layout.cache_len >> 20
    );
    match disk::read_status(&disk::status_path(secrets, sb.client_id)) {
        Some(live) => {
            for (k, v) in live {
                println!("{k:<9} {v}");
            }
        }
        None => {
            let rec = hivefs_localdisk::Journal::inspect(d.dev, &sb.layout)?;
            let (pending, bytes) = disk::pending_of(&rec.records);
            println!("mounted   no");
            if let Some(c) = disk::open_cache(path, &sb)? {
                println!("{}", disk::cache_lines(&c.stats()));
            }
            println!(
                "pending   {pending} journal records ({bytes} bytes) not yet committed{}",
                if pending == 0 {
                    ""
                } else {
                    ": the next mount commits them"
                }
            );
        }
    }
    Ok(())
}

fn cache_status(path: &std::path::Path, secrets: &std::path::Path) -> Result<()> {
    let d = disk::open(path, false)?;
    let live = disk::read_status(&disk::status_path(secrets, d.sb.client_id));
    match live.and_then(|l| l.into_iter().find(|(k, _)| k == "cache")) {
        Some((_, v)) => println!("cache {v} (mounted)"),
        None => match disk::open_cache(path, &d.sb)? {
            Some(c) => println!("{} (not mounted)", disk::cache_lines(&c.stats())),
            None => println!("no cache region on {}", path.display()),
        },
    }
    Ok(())
}

/// Read every file under `root` once (1 MiB reads), printing progress by bytes.
fn warmup(root: &std::path::Path) -> Result<()> {
    use std::io::{Read, Write};
    let mut files = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(p) = todo.pop() {
        let md = std::fs::symlink_metadata(&p).with_context(|| format!("{}", p.display()))?;
        if md.is_dir() {
            for e in std::fs::read_dir(&p).with_context(|| format!("{}", p.display()))? {
                todo.push(e?.path());
            }
        } else if md.is_file() {
            files.push((p, md.len()));
        }
    }
    let total: u64 = files.iter().map(|f| f.1).sum();
    let (mut done, mut buf) = (0u64, vec![0u8; 1 << 20]);
    let t = std::time::Instant::now();
    let mut shown = std::time::Instant::now();
    for (p, _) in &files {
        let mut f = std::fs::File::open(p).with_context(|| format!("{}", p.display()))?;
        loop {
            let n = f
                .read(&mut buf)
                .with_context(|| format!("{}", p.display()))?;
            if n == 0 {
                break;
            }
            done += n as u64;
            if shown.elapsed() >= Duration::from_millis(250) {
                shown = std::time::Instant::now();
                let frac = done as f64 / total.max(1) as f64;
                let bar = "#".repeat((frac * 40.0) as usize);
                eprint!("\r[{bar:<40}] {:5.1}% {} MiB", frac * 100.0, done >> 20);
                let _ = std::io::stderr().flush();
            }
        }
    }
    eprintln!("\r[{}] 100.0% {} MiB", "#".repeat(40), done >> 20);
    println!(
        "warmed {} files, {} bytes in {:.1?}",
        files.len(),
        done,
        t.elapsed()
    );
    Ok(())
}

fn umount(mountpoint: &std::path::Path) -> Result<()> {
    let c = std::ffi::CString::new(mountpoint.as_os_str().as_encoded_bytes())
        .context("mountpoint path")?;
    // SAFETY: plain syscall with a NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    let st = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg(mountpoint)
        .status();
    match st {
        Ok(s) if s.success() => Ok(()),
        _ => bail!("unmounting {}: {err}", mountpoint.display()),
    }
}
