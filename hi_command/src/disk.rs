//! The client disk as `hi` uses it: `hi format` and what `hi mount DISK` opens (the
//! format itself is in `localdisk/`).
//!
//! The access token is never written to the disk: `hi format` keeps it in a root-only
//! file, `SECRETS/client-<client id>.token` (directory 0700, file 0600; SECRETS defaults
//! to `/etc/hivefs`), where `hi mount DISK` finds it by the superblock's client id.
//!
//! `hi format` refuses, without `--force`: a disk whose block 0 it cannot read as a client
//! superblock but is not empty (another filesystem, a damaged or newer superblock), and a
//! client disk whose journal still holds writes not committed to the hive (mount it to
//! commit them).

use anyhow::{bail, Context, Result};
use hivefs_localdisk::{Journal, Layout, Superblock, SuperblockError};
use hivefs_nvme::{open_device, run_sync, AlignedBuf, BlockDevice, IoOp, IoRequest, UringOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Where tokens are kept unless `--secrets` says otherwise.
pub const DEFAULT_SECRETS: &str = "/etc/hivefs";

/// `"64M"`, `"1G"`, `"4096"`, `"512K"` -> bytes.
pub fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => bail!("size {s:?}: unknown unit {c:?} (K, M, G, T)"),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .with_context(|| format!("size {s:?}: not a number"))?;
    n.checked_mul(mult)
        .with_context(|| format!("size {s:?} is too large"))
}

/// The token file of client `id`.
pub fn token_path(secrets: &Path, id: u64) -> PathBuf {
    secrets.join(format!("client-{id:016x}.token"))
}

fn is_block_device(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

fn read_block0(dev: &mut dyn BlockDevice) -> Result<Vec<u8>> {
    let got = run_sync(
        dev,
        vec![IoRequest {
            tag: 0,
            op: IoOp::Read {
                offset: 0,
                buf: AlignedBuf::new(hivefs_nvme::BLOCK_SIZE),
            },
        }],
    )?;
    let c = got.into_iter().next().context("no completion")?;
    c.result?;
    Ok(c.buf.context("no buffer")?.to_vec())
}

/// An open client disk: its superblock and its device.
pub struct Disk {
    pub sb: Superblock,
    pub dev: Box<dyn BlockDevice>,
}

/// Open `path` and read its superblock; every refusal says what is wrong. With
/// `power_loss` (fault injection), writes stay in memory until flushed.
pub fn open(path: &Path, power_loss: bool) -> Result<Disk> {
    if !path.exists() {
        bail!(
            "{}: no such file or device (create a client disk with `hi format`)",
            path.display()
        );
    }
    let mut dev = open_device(path, None, UringOptions::default())
        .with_context(|| format!("opening {}", path.display()))?;
    let block = read_block0(dev.as_mut())?;
    let sb = Superblock::decode(&block).with_context(|| format!("{}", path.display()))?;
    if sb.layout.capacity > dev.capacity_bytes() {
        bail!(
            "{}: the superblock says {} bytes, the device has {}: refusing a truncated disk",
            path.display(),
            sb.layout.capacity,
            dev.capacity_bytes()
        );
    }
    if power_loss {
        tracing::warn!("fault injection: client disk writes are volatile until flushed");
        dev = Box::new(hivefs_nvme::VolatileUntilFlush::new(dev));
    }
    Ok(Disk { sb, dev })
}

/// What `hi format` is asked to do.
pub struct FormatSpec<'a> {
    pub path: &'a Path,
    pub journal: u64,
    /// `None`: the rest of a block device, or 256 MiB in a new file.
    pub cache: Option<u64>,
    pub hive: Vec<String>,
    pub ca: Option<String>,
    pub volume: String,
    pub token: String,
    pub secrets: &'a Path,
    pub force: bool,
}

/// Format a client disk (see the module docs). Returns the superblock written.
pub fn format(spec: &FormatSpec<'_>) -> Result<Superblock> {
    let blockdev = is_block_device(spec.path);
    let cache = match (spec.cache, blockdev) {
        (Some(c), _) => c,
        (None, false) => 256 << 20,
        (None, true) => {
            let dev = open_device(spec.path, None, UringOptions::default())?;
            let header = Layout::new(spec.journal, 0)?.capacity;
            dev.capacity_bytes().saturating_sub(header)
        }
    };
    let layout = Layout::new(spec.journal, cache)?;
    let existed = spec.path.exists();
    let mut dev = open_device(
        spec.path,
        (!blockdev).then_some(layout.capacity),
        UringOptions::default(),
    )
    .with_context(|| format!("opening {}", spec.path.display()))?;
    if dev.capacity_bytes() < layout.capacity {
        bail!(
            "{}: {} bytes, {} needed for a journal of {} and a cache of {}",
            spec.path.display(),
            dev.capacity_bytes(),
            layout.capacity,
            spec.journal,
            cache
        );
    }
    if existed {
        match Superblock::decode(&read_block0(dev.as_mut())?) {
            Err(SuperblockError::NotFormatted) => {}
            Ok(old) => {
                let rec = Journal::inspect(dev, &old.layout)
                    .with_context(|| format!("reading the journal of {}", spec.path.display()))?;
                let (pending, bytes) = pending_of(&rec.records);
                if pending > 0 && !spec.force {
                    bail!(
                        "{} holds {pending} journal records ({bytes} bytes) not yet committed \
                         to the hive (volume {}): mount it to commit them, or --force to \
                         throw them away",
                        spec.path.display(),
                        old.volume
                    );
                }
                eprintln!(
                    "hi: reformatting {} (was client {:016x}, volume {}{})",
                    spec.path.display(),
                    old.client_id,
                    old.volume,
                    if pending > 0 {
                        format!(", {pending} uncommitted journal records discarded")
                    } else {
                        String::new()
                    }
                );
                dev = open_device(spec.path, None, UringOptions::default())?;
            }
            Err(e) if spec.force => {
                eprintln!("hi: --force: overwriting {} ({e})", spec.path.display())
            }
            Err(e) => bail!("{}: {e}", spec.path.display()),
        }
    }
    let mut id = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut id))
        .context("reading /dev/urandom")?;
    let sb = Superblock {
        client_id: u64::from_le_bytes(id) | 1,
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        hive: spec.hive.clone(),
        ca: spec.ca.clone(),
        volume: spec.volume.clone(),
        layout,
    };
    // The token first: a disk is never left formatted for a client whose token is lost.
    write_token(spec.secrets, sb.client_id, &spec.token)?;
    Journal::format(dev.as_mut(), &layout)?;
    let img = sb.encode()?;
    let mut buf = AlignedBuf::new(img.len());
    buf.copy_from_slice(&img);
    let done = run_sync(
        dev.as_mut(),
        vec![
            IoRequest {
                tag: 0,
                op: IoOp::Write { offset: 0, buf },
            },
            IoRequest {
                tag: 1,
                op: IoOp::Flush,
            },
        ],
    )?;
    for c in done {
        c.result?;
    }
    Ok(sb)
}

fn write_token(secrets: &Path, id: u64, token: &str) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(secrets)
        .with_context(|| format!("creating {}", secrets.display()))?;
    let path = token_path(secrets, id);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(token.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// The cache region of the client disk at `path` (indexed by a scan of the region).
pub fn open_cache(path: &Path, sb: &Superblock) -> Result<Option<hivefs_localdisk::DiskCache>> {
    if sb.layout.cache_len == 0 {
        return Ok(None);
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {} for its cache", path.display()))?;
    let c = hivefs_localdisk::DiskCache::open(f, sb.layout.cache_offset, sb.layout.cache_len)
        .with_context(|| format!("reading the cache of {}", path.display()))?;
    Ok(Some(c))
}

/// `hi status` lines of a chunk cache.
pub fn cache_lines(c: &hivefs_localdisk::CacheStats) -> String {
    format!(
        "cache {} chunks, {} of {} bytes; {} hits, {} misses, {} inserted, {} damaged dropped",
        c.entries, c.bytes, c.capacity, c.hits, c.misses, c.inserts, c.damaged
    )
}

/// Where a mount of client `id` keeps its figures for `hi status`.
pub fn status_path(secrets: &Path, id: u64) -> PathBuf {
    secrets.join(format!("client-{id:016x}.status"))
}

/// Write a mounted disk's figures (`key value` lines; replaced atomically).
pub fn write_status(
    path: &Path,
    volume: &str,
    mountpoint: &Path,
    mode: &str,
    j: &crate::journal::JournalStatus,
    cache: Option<&hivefs_localdisk::CacheStats>,
    offline: &crate::offline::OfflineStatus,
) {
    let hive = match offline.unreachable_for {
        None => "reachable".to_string(),
        Some(d) => format!(
            "UNREACHABLE for {} s: offline (reads of what was seen; writes to files \
             leased here, renames, removals and attribute changes into the journal; \
             creates fail)",
            d.as_secs()
        ),
    };
    let text = format!(
        "pid {}\nmounted {} ({mode}, volume {volume})\nhive {hive}\npending {} journal \
         records not yet committed\nchanges {} namespace changes waiting for the hive; {} \
         made offline since mount, {} of them refused by the hive (conflicts)\njournal {} \
         of {} bytes in use; {} groups, {} records written since mount\nstate {}\n",
        std::process::id(),
        mountpoint.display(),
        j.pending,
        offline.pending,
        offline.journaled,
        offline.conflicts,
        j.used,
        j.capacity,
        j.groups,
        j.records,
        j.failed.as_deref().unwrap_or("ok"),
    ) + &cache.map(|c| cache_lines(c) + "\n").unwrap_or_default();
    let tmp = path.with_extension("status.tmp");
    if std::fs::write(&tmp, text).is_ok() {
        let _ = std::fs::rename(&tmp, path);
    }
}

/// A live mount's figures: `None` when there is no status file or its `hi` is gone.
pub fn read_status(path: &Path) -> Option<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path).ok()?;
    let lines: Vec<(String, String)> = text
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let pid: i32 = lines.iter().find(|(k, _)| k == "pid")?.1.parse().ok()?;
    // SAFETY: signal 0 only asks whether the process exists.
    let alive = unsafe { libc::kill(pid, 0) } == 0;
    alive.then_some(lines)
}

/// The token of client `id`, from `secrets`.
pub fn read_token(secrets: &Path, id: u64) -> Result<String> {
    let path = token_path(secrets, id);
    let t = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading the token of client {id:016x} from {} (kept there by `hi format`; \
             --secrets DIR if elsewhere)",
            path.display()
        )
    })?;
    Ok(t.trim().to_string())
}

/// What a recovered journal still holds for the hive: records not named by a `Done`
/// record (committed already), and their bytes.
pub fn pending_of(records: &[hivefs_localdisk::Record]) -> (usize, usize) {
    use hivefs_localdisk::replay::{plan, Step};
    let p = plan(records);
    let mut n = 0;
    let mut bytes = 0;
    for s in &p.steps {
        match s {
            Step::Commit {
                ranges, records, ..
            } => {
                n += records;
                bytes += ranges.iter().map(|r| r.1.len()).sum::<usize>();
            }
            Step::Op { op, .. } => {
                n += 1;
                bytes += op.len();
            }
        }
    }
    (n, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
