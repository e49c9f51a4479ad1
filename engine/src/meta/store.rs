//! The namespace store: the metadata state machine, applied to redb.
//!
//! Raft ([`super::raft`]) hands committed [`MetaCommand`]s to [`MetaStore::apply_batch`],
//! which applies a whole batch in one redb write transaction together with Raft's own
//! bookkeeping, so after a crash the store and the log agree on what was applied.
//!
//! # Keys and versions
//! Every key starts with a group id (group 0 is the cluster map; every volume lives in
//! [`VOLUME_GROUP`] for now, and the code already speaks in groups so more Raft groups need
//! no format change), then the volume id. Namespace records are *multi-version*: the key ends
//! with the record's birth epoch and the value starts with its death epoch ([`LIVE`] while
//! current). A change to a record born in the volume's current epoch rewrites it; a change
//! to an older one (kept by a snapshot) ends it at the current epoch and writes a new
//! version. A read at epoch `e` sees the version with `birth <= e < death`. Until snapshots
//! exist the epoch stays 1, but the layout is the one they need.
//!
//! | table     | key (after group, volume)         | value                            |
//! |-----------|-----------------------------------|----------------------------------|
//! | inodes    | ino, birth                        | death, [`InodeRec`]              |
//! | dirents   | parent, name len, name, birth     | death, ino, kind, cookie         |
//! | cookies   | parent, cookie, birth             | death, name                      |
//! | extents   | ino, file offset, birth           | death, len, chunk id, chunk off  |
//! | xattrs    | ino, name len, name, birth        | death, value                     |
//! | orphans   | ino                               | (unlinked, awaiting `Reclaim`)   |
//! | sessions  | client, seq                       | the reply it got                 |
//! | volumes   | name (group 0)                    | [`VolumeRec`]                    |
//! | nodes     | node id (group 0)                 | [`NodeSpec`], state (the map)    |
//! | tokens    | SHA-256 of the secret (group 0)   | scope, expiry, revoked, label    |
//! | sys       | name                              | gc epoch, map epoch, raft state, counters |
//!
//! # Invariants (checked by [`MetaStore::check`], which `hive fsck` runs)
//! - Every live dirent names a live inode of its kind; every directory has exactly one
//!   dirent naming it (the root none) and its `parent` is that dirent's directory.
//! - A directory's nlink is 2 + its subdirectories; a file's nlink is the number of dirents
//!   naming it; an inode with nlink 0 is a directory being removed (never stored) or a file
//!   listed in `orphans`.
//! - Live extents of a file do not overlap; the volume's `logical_bytes` is their total.
//! - A mutation's `(client, seq)` is applied at most once: its reply is stored in the same
//!   transaction, and a retry gets the stored reply.
//! - Applying is deterministic: nothing here reads a clock or randomness.

use anyhow::{bail, Context, Result};
use hivefs_net::chunk::ChunkId;
use hivefs_net::frame::PROTOCOL_VERSION_MIN;
use hivefs_net::meta::{
    self, Answer, Attr, CaRotation, DirEntry, DirEntryPlus, Errno, Extent, FileKind, MetaCommand,
    MetaReply, Mutation, NodeEntry, NodeSpec, Query, RenameMode, SetAttr, SetTime, StatFs,
    Timespec, TokenInfo, TokenScope, VolumeInfo, XattrMode, MAX_PLUS_XATTR_NAMES_BYTES, ROOT_INO,
};
use hivefs_net::placement::NodeState;
use redb::{Database, Durability, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::mpsc;

/// The metadata group every volume belongs to for now (group 0 is the cluster map).
pub const VOLUME_GROUP: u32 = 1;
/// Death epoch of a current record.
pub const LIVE: u64 = u64::MAX;

type Tbl = TableDefinition<'static, &'static [u8], &'static [u8]>;
const INODES: Tbl = TableDefinition::new("inodes");
const DIRENTS: Tbl = TableDefinition::new("dirents");
const COOKIES: Tbl = TableDefinition::new("cookies");
const EXTENTS: Tbl = TableDefinition::new("extents");
const XATTRS: Tbl = TableDefinition::new("xattrs");
const ORPHANS: Tbl = TableDefinition::new("orphans");
const SESSIONS: Tbl = TableDefinition::new("sessions");
const VOLUMES: Tbl = TableDefinition::new("volumes");
const SYS: Tbl = TableDefinition::new("sys");
const NODES: Tbl = TableDefinition::new("nodes");
const TOKENS: Tbl = TableDefinition::new("tokens");
/// `(volume, inode)` -> the lowest write-lease token a commit to it may carry (u64 LE).
const FENCES: Tbl = TableDefinition::new("fences");
const ALL_TABLES: [Tbl; 11] = [
    INODES, DIRENTS, COOKIES, EXTENTS, XATTRS, ORPHANS, SESSIONS, VOLUMES, SYS, NODES, TOKENS,
];

const SYS_RAFT: &[u8] = b"raft_state";
const SYS_GC_EPOCH: &[u8] = b"gc_epoch";
/// The last CA rotation ([`CaRotation`]), if any.
const SYS_CA: &[u8] = b"ca_rotation";
/// Raised by every leader before its first write lease (`leases.rs`).
const SYS_LEASE_EPOCH: &[u8] = b"lease_epoch";
const SYS_NEXT_VOLUME: &[u8] = b"next_volume";
const SYS_NEXT_NODE: &[u8] = b"next_node";
const SYS_MAP_EPOCH: &[u8] = b"map_epoch";
/// Raised by every token change (readers reload their token registry when it moves).
const SYS_TOKENS_EPOCH: &[u8] = b"tokens_epoch";
const SYS_FORMAT: &[u8] = b"format";
/// The metadata log version ([`Mutation::SetLogVersion`]; absent: version 2, the first).
const SYS_LOG_VERSION: &[u8] = b"log_version";
/// On-disk format of this store (bumped on any incompatible change).
pub const FORMAT_VERSION: u32 = 1;

/// First cookie handed to a directory entry (0 = start, 1 and 2 are `.` and `..`).
const FIRST_COOKIE: u64 = 3;

/// An inode as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InodeRec {
    pub gen: u64,
    pub kind: FileKind,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub atime: Timespec,
    pub mtime: Timespec,
    pub ctime: Timespec,
    pub crtime: Timespec,
    pub rdev: u32,
    /// Symlink target.
    pub target: Vec<u8>,
    /// Directories: the directory holding their one name (the root: itself).
    pub parent: u64,
    /// Directories: the cookie the next entry gets.
    pub next_cookie: u64,
}

impl InodeRec {
    fn attr(&self, ino: u64) -> Attr {
        Attr {
            ino,
            gen: self.gen,
            kind: self.kind,
            perm: self.perm,
            nlink: self.nlink,
            uid: self.uid,
            gid: self.gid,
            size: self.size,
            atime: self.atime,
            mtime: self.mtime,
            ctime: self.ctime,
            crtime: self.crtime,
            rdev: self.rdev,
        }
    }
}

/// A volume as stored (group 0, keyed by name).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRec {
    pub id: u32,
    pub name: String,
    pub copies: u8,
    /// The epoch new records are born in (snapshots advance it).
    pub epoch: u64,
    pub next_ino: u64,
    pub next_gen: u64,
    pub files: u64,
    pub logical_bytes: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct DirentVal {
    ino: u64,
    kind: FileKind,
    cookie: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct ExtentVal {
    len: u32,
    #[serde(with = "hivefs_net::meta::chunk_id_serde")]
    chunk: ChunkId,
    chunk_offset: u32,
}

fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).expect("postcard encodes store records")
}

fn dec<'a, T: Deserialize<'a>>(b: &'a [u8], what: &str) -> Result<T> {
    postcard::from_bytes(b).with_context(|| format!("corrupt {what} record in the metadata store"))
}

// ---- keys ----------------------------------------------------------------------------

fn k_vol(vol: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(64);
    k.extend_from_slice(&VOLUME_GROUP.to_be_bytes());
    k.extend_from_slice(&vol.to_be_bytes());
    k
}

fn k_ino(vol: u32, ino: u64) -> Vec<u8> {
    let mut k = k_vol(vol);
    k.extend_from_slice(&ino.to_be_bytes());
    k
}

fn k_named(vol: u32, ino: u64, name: &[u8]) -> Vec<u8> {
    let mut k = k_ino(vol, ino);
    k.extend_from_slice(&(name.len() as u16).to_be_bytes());
    k.extend_from_slice(name);
    k
}

fn k_num(vol: u32, ino: u64, n: u64) -> Vec<u8> {
    let mut k = k_ino(vol, ino);
    k.extend_from_slice(&n.to_be_bytes());
    k
}

fn k_volume_name(name: &str) -> Vec<u8> {
    let mut k = 0u32.to_be_bytes().to_vec();
    k.extend_from_slice(name.as_bytes());
    k
}

fn k_node(id: u64) -> Vec<u8> {
    let mut k = 0u32.to_be_bytes().to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

/// Every key starting with `prefix`: `prefix ..= prefix ++ [0xff; 10]` covers the
/// fixed-width suffixes used here (numbers and births).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut e = prefix.to_vec();
    e.extend_from_slice(&[0xff; 16]);
    e
}

// ---- versioned records ---------------------------------------------------------------

/// The current version of the record at `base`: (birth, payload).
fn current<T: ReadableTable<&'static [u8], &'static [u8]>>(
    t: &T,
    base: &[u8],
) -> Result<Option<(u64, Vec<u8>)>> {
    let end = prefix_end(base);
    let mut r = t.range::<&[u8]>(base..end.as_slice())?;
    if let Some(item) = r.next_back() {
        let (k, v) = item?;
        let (k, v) = (k.value(), v.value());
        if k.len() == base.len() + 8 && v.len() >= 8 {
            let death = u64::from_le_bytes(v[..8].try_into().expect("8"));
            if death == LIVE {
                return Ok(Some((be_u64(&k[base.len()..]), v[8..].to_vec())));
            }
        }
    }
    Ok(None)
}

fn versioned_key(base: &[u8], birth: u64) -> Vec<u8> {
    let mut k = base.to_vec();
    k.extend_from_slice(&birth.to_be_bytes());
    k
}

fn versioned_val(death: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + payload.len());
    v.extend_from_slice(&death.to_le_bytes());
    v.extend_from_slice(payload);
    v
}

/// Make `payload` the current version at `base` in `epoch`.
fn put_v(t: &mut redb::Table<&[u8], &[u8]>, base: &[u8], epoch: u64, payload: &[u8]) -> Result<()> {
    if let Some((birth, old)) = current(t, base)? {
        if birth != epoch {
            let k = versioned_key(base, birth);
            t.insert(k.as_slice(), versioned_val(epoch, &old).as_slice())?;
        }
    }
    let k = versioned_key(base, epoch);
    t.insert(k.as_slice(), versioned_val(LIVE, payload).as_slice())?;
    Ok(())
}

/// End the current version at `base` (if any) in `epoch`.
fn kill_v(t: &mut redb::Table<&[u8], &[u8]>, base: &[u8], epoch: u64) -> Result<bool> {
    let Some((birth, old)) = current(t, base)? else {
        return Ok(false);
    };
    let k = versioned_key(base, birth);
    if birth == epoch {
        t.remove(k.as_slice())?;
    } else {
        t.insert(k.as_slice(), versioned_val(epoch, &old).as_slice())?;
    }
    Ok(true)
}

/// Live records under `prefix` whose key suffix (after `prefix`, before the birth) is
/// `>= from`, in key order: (suffix, payload). At most `max`.
fn live_under<T: ReadableTable<&'static [u8], &'static [u8]>>(
    t: &T,
    prefix: &[u8],
    from: &[u8],
    max: usize,
) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut start = prefix.to_vec();
    start.extend_from_slice(from);
    let end = prefix_end(prefix);
    let mut out = Vec::new();
    for item in t.range::<&[u8]>(start.as_slice()..end.as_slice())? {
        let (k, v) = item?;
        let (k, v) = (k.value(), v.value());
        if !k.starts_with(prefix) || k.len() < prefix.len() + 8 || v.len() < 8 {
            continue;
        }
        if u64::from_le_bytes(v[..8].try_into().expect("8")) != LIVE {
            continue;
        }
        out.push((k[prefix.len()..k.len() - 8].to_vec(), v[8..].to_vec()));
        if out.len() >= max {
            break;
        }
    }
    Ok(out)
}

/// The live xattr names under `prefix` (an inode's), or `None` if they take more than
/// `limit` bytes (each counted with one byte more, as listxattr(2) lists them).
fn xattr_names_within<T: ReadableTable<&'static [u8], &'static [u8]>>(
    t: &T,
    prefix: &[u8],
    limit: usize,
) -> Result<Option<Vec<Vec<u8>>>> {
    let end = prefix_end(prefix);
    let (mut names, mut bytes) = (Vec::new(), 0usize);
    for item in t.range::<&[u8]>(prefix..end.as_slice())? {
        let (k, v) = item?;
        let (k, v) = (k.value(), v.value());
        // Key: prefix, 2 bytes, the name, 8 bytes of birth epoch (as `ListXattr` reads it).
        if !k.starts_with(prefix) || k.len() < prefix.len() + 2 + 8 || v.len() < 8 {
            continue;
        }
        if u64::from_le_bytes(v[..8].try_into().expect("8")) != LIVE {
            continue;
        }
        let name = &k[prefix.len() + 2..k.len() - 8];
        bytes += name.len() + 1;
        if bytes > limit {
            return Ok(None);
        }
        names.push(name.to_vec());
    }
    Ok(Some(names))
}

// ---- the store -----------------------------------------------------------------------

/// A snapshot: every table's name and rows.
type Snapshot = Vec<(String, Vec<(Vec<u8>, Vec<u8>)>)>;

/// The namespace store. See the module docs.
pub struct MetaStore {
    db: Database,
    /// Apply batches committed since the last durable (fsynced) commit.
    lazy_batches: std::sync::atomic::AtomicU32,
    /// Background writeback of the file's dirty pages (none on a caller's backend).
    writeback: Option<PageWriteback>,
}

/// Starts the kernel's writeback of the store file's dirty pages soon after each batch
/// committed without an fsync, on a thread of its own (`meta-writeback`,
/// `sync_file_range(SYNC_FILE_RANGE_WRITE)`: it starts I/O and waits for none).
///
/// Why: a batch committed without an fsync leaves its pages (about 18 per create) dirty
/// until the durable commit every [`DURABLE_EVERY_BATCHES`] batches, whose `fdatasync` then
/// wrote them all (~18 MB) on the Raft thread: one create in 256 took ~18 ms
/// (`hive-perf fs meta`: p99.9 18 ms). Written back as they come, the durable commit finds
/// little left to write. Durability is unchanged: what is durable is still what an fsync
/// covered.
struct PageWriteback {
    /// `None` only while dropping (closing it ends the thread).
    kick: Option<mpsc::SyncSender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PageWriteback {
    fn start(path: &Path) -> std::io::Result<PageWriteback> {
        use std::os::fd::AsRawFd;
        let file = std::fs::File::open(path)?;
        // One kick pending is enough: the writeback that follows covers every batch
        // committed before it.
        let (tx, rx) = mpsc::sync_channel::<()>(1);
        let thread = std::thread::Builder::new()
            .name("meta-writeback".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    // SAFETY: a valid descriptor, owned by this thread for its life.
                    let rc = unsafe {
                        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE)
                    };
                    if rc != 0 {
                        let e = std::io::Error::last_os_error();
                        tracing::debug!("metadata store writeback: {e}");
                    }
                }
            })?;
        Ok(PageWriteback {
            kick: Some(tx),
            thread: Some(thread),
        })
    }

    fn kick(&self) {
        if let Some(tx) = &self.kick {
            let _ = tx.try_send(());
        }
    }
}

impl Drop for PageWriteback {
    fn drop(&mut self) {
        drop(self.kick.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An apply batch is committed durably at least once every this many batches; the ones
/// between are committed without an fsync (see [`MetaStore::apply_batch`]).
const DURABLE_EVERY_BATCHES: u32 = 256;

/// What one operation is refused with: an errno for the caller, or a store failure that
/// aborts the whole batch (and stops the metadata service).
enum OpError {
    Errno(Errno),
    Store(anyhow::Error),
}

impl From<Errno> for OpError {
    fn from(e: Errno) -> OpError {
        OpError::Errno(e)
    }
}

macro_rules! store {
    ($e:expr) => {
        $e.map_err(|e| OpError::Store(anyhow::Error::from(e)))?
    };
}

type OpResult<T> = std::result::Result<T, OpError>;

/// Tables open in one write transaction.
struct Tables<'t> {
    inodes: redb::Table<'t, &'static [u8], &'static [u8]>,
    dirents: redb::Table<'t, &'static [u8], &'static [u8]>,
    cookies: redb::Table<'t, &'static [u8], &'static [u8]>,
    extents: redb::Table<'t, &'static [u8], &'static [u8]>,
    xattrs: redb::Table<'t, &'static [u8], &'static [u8]>,
    orphans: redb::Table<'t, &'static [u8], &'static [u8]>,
    sessions: redb::Table<'t, &'static [u8], &'static [u8]>,
    volumes: redb::Table<'t, &'static [u8], &'static [u8]>,
    sys: redb::Table<'t, &'static [u8], &'static [u8]>,
    nodes: redb::Table<'t, &'static [u8], &'static [u8]>,
    tokens: redb::Table<'t, &'static [u8], &'static [u8]>,
    fences: redb::Table<'t, &'static [u8], &'static [u8]>,
}

impl<'t> Tables<'t> {
    fn open(tx: &'t redb::WriteTransaction) -> Result<Tables<'t>> {
        Ok(Tables {
            inodes: tx.open_table(INODES)?,
            dirents: tx.open_table(DIRENTS)?,
            cookies: tx.open_table(COOKIES)?,
            extents: tx.open_table(EXTENTS)?,
            xattrs: tx.open_table(XATTRS)?,
            orphans: tx.open_table(ORPHANS)?,
            sessions: tx.open_table(SESSIONS)?,
            volumes: tx.open_table(VOLUMES)?,
            sys: tx.open_table(SYS)?,
            nodes: tx.open_table(NODES)?,
            tokens: tx.open_table(TOKENS)?,
            fences: tx.open_table(FENCES)?,
        })
    }

    fn sys_u64(&self, key: &[u8], default: u64) -> Result<u64> {
        Ok(match self.sys.get(key)? {
            Some(v) => u64::from_le_bytes(v.value().try_into().context("sys counter")?),
            None => default,
        })
    }

    fn set_sys_u64(&mut self, key: &[u8], v: u64) -> Result<()> {
        self.sys.insert(key, v.to_le_bytes().as_slice())?;
        Ok(())
    }
}

/// What a new inode is, as its creator asked.
struct NewEntry {
    kind: FileKind,
    perm: u16,
    uid: u32,
    gid: u32,
}

/// One mutation's view: the volume and the inodes it touched, written back at the end.
struct Op<'a, 't> {
    t: &'a mut Tables<'t>,
    vol: VolumeRec,
    now: Timespec,
    inodes: BTreeMap<u64, Option<InodeRec>>,
    dirty: HashSet<u64>,
}

impl<'a, 't> Op<'a, 't> {
    fn epoch(&self) -> u64 {
        self.vol.epoch
    }

    fn inode(&mut self, ino: u64) -> OpResult<&mut InodeRec> {
        if !self.inodes.contains_key(&ino) {
            let rec = match store!(current(&self.t.inodes, &k_ino(self.vol.id, ino))) {
                Some((_, b)) => Some(store!(dec::<InodeRec>(&b, "inode"))),
                None => None,
            };
            self.inodes.insert(ino, rec);
        }
        match self.inodes.get_mut(&ino).expect("loaded") {
            Some(r) => Ok(r),
            None => Err(Errno::NOENT.into()),
        }
    }

    fn touch(&mut self, ino: u64) -> OpResult<&mut InodeRec> {
        self.inode(ino)?;
        self.dirty.insert(ino);
        Ok(self
            .inodes
            .get_mut(&ino)
            .expect("loaded")
            .as_mut()
            .expect("live"))
    }

    fn dir(&mut self, ino: u64) -> OpResult<&mut InodeRec> {
        let d = self.inode(ino)?;
        if d.kind != FileKind::Dir {
            return Err(Errno::NOTDIR.into());
        }
        if d.nlink == 0 {
            // Removed, still open somewhere: nothing may be made in it (as on Linux).
            return Err(Errno::NOENT.into());
        }
        Ok(d)
    }

    fn dirent(&self, parent: u64, name: &[u8]) -> OpResult<Option<DirentVal>> {
        match store!(current(
            &self.t.dirents,
            &k_named(self.vol.id, parent, name)
        )) {
            Some((_, b)) => Ok(Some(store!(dec(&b, "dirent")))),
            None => Ok(None),
        }
    }

    /// Add `name -> ino` to directory `parent` (which must be loaded and live).
    fn link_name(&mut self, parent: u64, name: &[u8], ino: u64, kind: FileKind) -> OpResult<()> {
        let epoch = self.epoch();
        let now = self.now;
        let p = self.touch(parent)?;
        let cookie = p.next_cookie.max(FIRST_COOKIE);
        p.next_cookie = cookie + 1;
        p.mtime = now;
        p.ctime = now;
        self.put_dirent(parent, name, DirentVal { ino, kind, cookie })?;
        let k = k_num(self.vol.id, parent, cookie);
        store!(put_v(&mut self.t.cookies, &k, epoch, name));
        Ok(())
    }

    /// Write the entry `name` of `parent` (its cookie index is the caller's business).
    fn put_dirent(&mut self, parent: u64, name: &[u8], d: DirentVal) -> OpResult<()> {
        let (k, epoch) = (k_named(self.vol.id, parent, name), self.epoch());
        store!(put_v(&mut self.t.dirents, &k, epoch, &enc(&d)));
        Ok(())
    }

    /// Remove the name `name` (with its `cookie`) from `parent`.
    fn unlink_name(&mut self, parent: u64, name: &[u8], cookie: u64) -> OpResult<()> {
        let epoch = self.epoch();
        let now = self.now;
        let p = self.touch(parent)?;
        p.mtime = now;
        p.ctime = now;
        let vol = self.vol.id;
        store!(kill_v(
            &mut self.t.dirents,
            &k_named(vol, parent, name),
            epoch
        ));
        store!(kill_v(
            &mut self.t.cookies,
            &k_num(vol, parent, cookie),
            epoch
        ));
        Ok(())
    }

    fn dir_is_empty(&self, ino: u64) -> OpResult<bool> {
        let prefix = k_ino(self.vol.id, ino);
        Ok(store!(live_under(&self.t.cookies, &prefix, &[], 1)).is_empty())
    }

    /// Is `ino` equal to `ancestor` or below it? (Walks parent pointers up to the root.)
    fn within(&mut self, mut ino: u64, ancestor: u64) -> OpResult<bool> {
        for _ in 0..100_000 {
            if ino == ancestor {
                return Ok(true);
            }
            if ino == ROOT_INO {
                return Ok(false);
            }
            ino = self.dir(ino)?.parent;
        }
        Err(OpError::Store(anyhow::anyhow!(
            "directory parent chain does not reach the root"
        )))
    }

    fn new_inode(&mut self, kind: FileKind, perm: u16, uid: u32, gid: u32) -> (u64, InodeRec) {
        let ino = self.vol.next_ino;
        self.vol.next_ino += 1;
        let gen = self.vol.next_gen;
        self.vol.next_gen += 1;
        self.vol.files += 1;
        let now = self.now;
        (
            ino,
            InodeRec {
                gen,
                kind,
                perm: perm & 0o7777,
                nlink: if kind == FileKind::Dir { 2 } else { 1 },
                uid,
                gid,
                size: 0,
                atime: now,
                mtime: now,
                ctime: now,
                crtime: now,
                rdev: 0,
                target: Vec::new(),
                parent: 0,
                next_cookie: FIRST_COOKIE,
            },
        )
    }

    /// Make a new inode and name it `name` in `parent` (create, mknod, mkdir, symlink).
    /// BSD group semantics in a setgid directory: the entry takes the directory's group,
    /// and a new subdirectory is setgid too. `fill` sets what only its kind has.
    fn add_entry(
        &mut self,
        parent: u64,
        name: &[u8],
        new: NewEntry,
        fill: impl FnOnce(&mut InodeRec),
    ) -> OpResult<Answer> {
        let (pperm, pgid) = {
            let p = self.dir(parent)?;
            (p.perm, p.gid)
        };
        if self.dirent(parent, name)?.is_some() {
            return Err(Errno::EXIST.into());
        }
        let (perm, gid) = if pperm & 0o2000 != 0 {
            let sgid = if new.kind == FileKind::Dir { 0o2000 } else { 0 };
            (new.perm | sgid, pgid)
        } else {
            (new.perm, new.gid)
        };
        let (ino, mut rec) = self.new_inode(new.kind, perm, new.uid, gid);
        fill(&mut rec);
        if new.kind == FileKind::Dir {
            rec.parent = parent;
            self.touch(parent)?.nlink += 1;
        }
        self.inodes.insert(ino, Some(rec));
        self.dirty.insert(ino);
        self.link_name(parent, name, ino, new.kind)?;
        Ok(Answer::Attr(self.inode(ino)?.attr(ino)))
    }

    /// Drop a file's link; at nlink 0 it becomes an orphan (its bytes stay readable through
    /// open handles until `Reclaim`).
    fn drop_link(&mut self, ino: u64) -> OpResult<()> {
        let now = self.now;
        let r = self.touch(ino)?;
        r.nlink = r.nlink.saturating_sub(1);
        r.ctime = now;
        if r.nlink == 0 {
            let k = k_ino(self.vol.id, ino);
            store!(self.t.orphans.insert(k.as_slice(), [].as_slice()));
        }
        Ok(())
    }

    /// A removed directory keeps its record, with nlink 0, as an orphan until `Reclaim`:
    /// a process may still hold it open (fstat of it must work, as on a local filesystem).
    fn orphan_dir(&mut self, ino: u64) -> OpResult<()> {
        let now = self.now;
        let r = self.touch(ino)?;
        r.nlink = 0;
        r.ctime = now;
        let k = k_ino(self.vol.id, ino);
        store!(self.t.orphans.insert(k.as_slice(), [].as_slice()));
        Ok(())
    }

    /// Remove an inode and everything it owns (extents, xattrs).
    fn destroy(&mut self, ino: u64) -> OpResult<()> {
        let epoch = self.epoch();
        let vol = self.vol.id;
        let freed = self.truncate_extents(ino, 0)?;
        self.vol.logical_bytes = self.vol.logical_bytes.saturating_sub(freed);
        let prefix = k_ino(vol, ino);
        let names = store!(live_under(&self.t.xattrs, &prefix, &[], usize::MAX));
        for (suffix, _) in names {
            let mut base = prefix.clone();
            base.extend_from_slice(&suffix);
            store!(kill_v(&mut self.t.xattrs, &base, epoch));
        }
        store!(kill_v(&mut self.t.inodes, &prefix, epoch));
        store!(self.t.orphans.remove(prefix.as_slice()));
        store!(self.t.fences.remove(prefix.as_slice()));
        self.inodes.insert(ino, None);
        self.dirty.remove(&ino);
        self.vol.files = self.vol.files.saturating_sub(1);
        Ok(())
    }

    /// The lowest write-lease token a commit to `ino` may carry (0: any).
    fn fence(&self, ino: u64) -> OpResult<u64> {
        let key = k_ino(self.vol.id, ino);
        Ok(match store!(self.t.fences.get(key.as_slice())) {
            Some(v) => u64::from_le_bytes(
                v.value()
                    .try_into()
                    .map_err(|_| OpError::Store(anyhow::anyhow!("fence record")))?,
            ),
            None => 0,
        })
    }

    /// Live extents of `ino` overlapping `[from, to)`, in offset order.
    fn extents_in(&self, ino: u64, from: u64, to: u64) -> OpResult<Vec<Extent>> {
        extents_in(&self.t.extents, self.vol.id, ino, from, to, usize::MAX)
            .map(|(v, _)| v)
            .map_err(OpError::Store)
    }

    fn put_extent(&mut self, ino: u64, e: &Extent) -> OpResult<()> {
        let epoch = self.epoch();
        let v = enc(&ExtentVal {
            len: e.len,
            chunk: e.chunk,
            chunk_offset: e.chunk_offset,
        });
        store!(put_v(
            &mut self.t.extents,
            &k_num(self.vol.id, ino, e.offset),
            epoch,
            &v
        ));
        Ok(())
    }

    /// Cut `[from, to)` out of `ino`'s extents, keeping what lies outside; returns the bytes
    /// removed.
    fn punch(&mut self, ino: u64, from: u64, to: u64) -> OpResult<u64> {
        let epoch = self.epoch();
        let mut removed = 0u64;
        for e in self.extents_in(ino, from, to)? {
            store!(kill_v(
                &mut self.t.extents,
                &k_num(self.vol.id, ino, e.offset),
                epoch
            ));
            let (start, end) = (e.offset.max(from), e.end().min(to));
            removed += end - start;
            if e.offset < from {
                self.put_extent(
                    ino,
                    &Extent {
                        len: (from - e.offset) as u32,
                        ..e
                    },
                )?;
            }
            if e.end() > to {
                let cut = (to - e.offset) as u32;
                self.put_extent(
                    ino,
                    &Extent {
                        offset: to,
                        len: e.len - cut,
                        chunk: e.chunk,
                        chunk_offset: e.chunk_offset + cut,
                    },
                )?;
            }
        }
        Ok(removed)
    }

    fn truncate_extents(&mut self, ino: u64, size: u64) -> OpResult<u64> {
        self.punch(ino, size, u64::MAX)
    }

    fn finish(mut self) -> OpResult<()> {
        let vol = self.vol.id;
        let epoch = self.epoch();
        for ino in std::mem::take(&mut self.dirty) {
            if let Some(Some(r)) = self.inodes.get(&ino) {
                store!(put_v(&mut self.t.inodes, &k_ino(vol, ino), epoch, &enc(r)));
            }
        }
        store!(self.t.volumes.insert(
            k_volume_name(&self.vol.name).as_slice(),
            enc(&self.vol).as_slice()
        ));
        Ok(())
    }
}

/// The volume with id `id`. A scan of the volume table (keyed by name): volumes are few;
/// an id index comes when they are not.
fn volume_by_id<T: ReadableTable<&'static [u8], &'static [u8]>>(
    t: &T,
    id: u32,
) -> Result<Option<VolumeRec>> {
    for item in t.iter()? {
        let (_, v) = item?;
        let rec: VolumeRec = dec(v.value(), "volume")?;
        if rec.id == id {
            return Ok(Some(rec));
        }
    }
    Ok(None)
}

/// Live extents of `ino` overlapping `[from, to)` in offset order (at most `max`), and
/// whether more follow.
fn extents_in<T: ReadableTable<&'static [u8], &'static [u8]>>(
    t: &T,
    vol: u32,
    ino: u64,
    from: u64,
    to: u64,
    max: usize,
) -> Result<(Vec<Extent>, bool)> {
    let prefix = k_ino(vol, ino);
    let mut out = Vec::new();
    // The extent starting at or before `from` may reach into the range: find the last live
    // one that starts at or before it.
    let mut back_end = prefix.clone();
    back_end.extend_from_slice(&from.to_be_bytes());
    back_end.extend_from_slice(&[0xff; 8]);
    let mut first = None;
    for item in t
        .range::<&[u8]>(prefix.as_slice()..=back_end.as_slice())?
        .rev()
    {
        let (k, v) = item?;
        let (k, v) = (k.value(), v.value());
        if k.len() != prefix.len() + 16 || v.len() < 8 {
            continue;
        }
        if u64::from_le_bytes(v[..8].try_into().expect("8")) != LIVE {
            continue;
        }
        let off = be_u64(&k[prefix.len()..]);
        let ev: ExtentVal = dec(&v[8..], "extent")?;
        first = Some(Extent {
            offset: off,
            len: ev.len,
            chunk: ev.chunk,
            chunk_offset: ev.chunk_offset,
        });
        break;
    }
    if let Some(e) = first {
        if e.end() > from && e.offset < to {
            out.push(e);
        }
    }
    // `first` is the last live extent starting at or before `from`: the rest start after.
    let after = from.saturating_add(1);
    if after < to {
        for (suffix, payload) in live_under(t, &prefix, &after.to_be_bytes(), usize::MAX)? {
            let off = be_u64(&suffix);
            if off >= to {
                break;
            }
            if out.len() >= max {
                return Ok((out, true));
            }
            let ev: ExtentVal = dec(&payload, "extent")?;
            out.push(Extent {
                offset: off,
                len: ev.len,
                chunk: ev.chunk,
                chunk_offset: ev.chunk_offset,
            });
        }
    }
    Ok((out, false))
}

impl MetaStore {
    /// Open (or create) the store at `path`.
    pub fn open(path: &Path) -> Result<MetaStore> {
        let db = Database::create(path)
            .with_context(|| format!("opening metadata store {}", path.display()))?;
        let mut store = Self::init(db, &path.display().to_string())?;
        store.writeback = Some(
            PageWriteback::start(path)
                .with_context(|| format!("metadata store writeback of {}", path.display()))?,
        );
        Ok(store)
    }

    /// Open (or create) the store on a redb storage backend of the caller's (the GC
    /// simulator's in-memory disk, which loses what was not synced when it crashes).
    pub fn open_backend(backend: impl redb::StorageBackend) -> Result<MetaStore> {
        let db = redb::Builder::new()
            .create_with_backend(backend)
            .context("opening metadata store on its backend")?;
        Self::init(db, "(backend)")
    }

    /// Create the tables and check the format of a freshly opened database.
    fn init(db: Database, what: &str) -> Result<MetaStore> {
        let tx = db.begin_write()?;
        {
            for t in ALL_TABLES {
                tx.open_table(t)?;
            }
            let mut sys = tx.open_table(SYS)?;
            let stored = sys.get(SYS_FORMAT)?.map(|v| v.value().to_vec());
            match stored {
                None => {
                    sys.insert(SYS_FORMAT, FORMAT_VERSION.to_le_bytes().as_slice())?;
                }
                Some(v) if v == FORMAT_VERSION.to_le_bytes() => {}
                Some(v) => bail!(
                    "metadata store {what} has format {:?}; this build reads format {FORMAT_VERSION}",
                    v
                ),
            }
        }
        tx.commit()?;
        Ok(MetaStore {
            db,
            lazy_batches: std::sync::atomic::AtomicU32::new(0),
            writeback: None,
        })
    }

    /// Make every commit so far durable (one fsync).
    pub fn persist(&self) -> Result<()> {
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::Immediate);
        tx.commit()?;
        self.lazy_batches
            .store(0, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Raft's bookkeeping stored with the last applied batch.
    pub fn raft_state(&self) -> Result<Option<Vec<u8>>> {
        let tx = self.db.begin_read()?;
        let sys = tx.open_table(SYS)?;
        Ok(sys.get(SYS_RAFT)?.map(|v| v.value().to_vec()))
    }

    /// Apply committed commands in order and record `raft_state`, in one transaction.
    /// `cmds[i]` is `None` for log entries with nothing to apply. Returns one encoded
    /// [`MetaReply`] per entry (empty for `None`).
    ///
    /// Durability: the entries are already durable in the Raft log, so most batches commit
    /// without an fsync (redb `Durability::None`: atomic and visible at once, but a crash
    /// rolls the store back to its last durable commit, `raft_state` included, and Raft
    /// applies the entries after it again, exactly once). Every
    /// [`DURABLE_EVERY_BATCHES`]th batch, and [`MetaStore::export`] (a snapshot, before
    /// Raft may purge its log behind it), commit durably. This halves the fsyncs of a
    /// mutation (log append + apply -> log append).
    pub fn apply_batch(&self, cmds: &[Option<&[u8]>], raft_state: &[u8]) -> Result<Vec<Vec<u8>>> {
        let mut tx = self.db.begin_write()?;
        let lazy = self
            .lazy_batches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        if lazy >= DURABLE_EVERY_BATCHES {
            tx.set_durability(Durability::Immediate);
            self.lazy_batches
                .store(0, std::sync::atomic::Ordering::Relaxed);
        } else {
            tx.set_durability(Durability::None);
        }
        let mut out = Vec::with_capacity(cmds.len());
        {
            let mut t = Tables::open(&tx)?;
            for c in cmds {
                let Some(bytes) = c else {
                    out.push(Vec::new());
                    continue;
                };
                // Only a leader's own encoding of a checked request is ever proposed, and
                // the log's envelope carries a checksum: a committed command that does not
                // decode here was written by a build that knows more variants (a node not
                // yet upgraded, in a cluster being upgraded). Answering it with an error
                // would leave this node's namespace different from those that applied it;
                // stop instead (nothing of the batch is kept), loudly, until upgraded.
                let cmd = meta::decode::<MetaCommand>(bytes).map_err(|e| {
                    anyhow::anyhow!(
                        "a committed metadata command does not decode with this build \
                         (written by a newer one?): {e}; not applying it, nor anything after it"
                    )
                })?;
                let reply = apply_one(&mut t, &cmd)?;
                out.push(meta::encode(&reply));
            }
            t.sys.insert(SYS_RAFT, raft_state)?;
        }
        tx.commit()?;
        if lazy < DURABLE_EVERY_BATCHES {
            if let Some(w) = &self.writeback {
                w.kick();
            }
        }
        Ok(out)
    }

    /// Answer a query against the current state.
    /// The hive's last CA rotation, if it had one.
    pub fn ca_rotation(&self) -> Result<Option<CaRotation>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(SYS)?;
        Ok(match t.get(SYS_CA)? {
            Some(v) => Some(meta::decode(v.value()).context("CA rotation record")?),
            None => None,
        })
    }

    pub fn query(&self, volume: u32, q: &Query) -> Result<MetaReply> {
        if let Query::Open { ino, max, .. } = *q {
            // The leader recalled the write leases (server.rs); what is read is extents.
            let q = Query::Extents {
                ino,
                from: 0,
                to: u64::MAX,
                max,
            };
            return self.query(volume, &q);
        }
        let tx = self.db.begin_read()?;
        let inodes = tx.open_table(INODES)?;
        let vols = tx.open_table(VOLUMES)?;
        let load = |ino: u64| -> Result<Option<InodeRec>> {
            match current(&inodes, &k_ino(volume, ino))? {
                Some((_, b)) => Ok(Some(dec(&b, "inode")?)),
                None => Ok(None),
            }
        };
        let volume_info = |rec: VolumeRec| -> Result<Option<VolumeInfo>> {
            let Some(root) = (match current(&inodes, &k_ino(rec.id, ROOT_INO))? {
                Some((_, b)) => Some(dec::<InodeRec>(&b, "inode")?),
                None => None,
            }) else {
                return Ok(None);
            };
            Ok(Some(VolumeInfo {
                id: rec.id,
                name: rec.name.clone(),
                copies: rec.copies,
                root: root.attr(ROOT_INO),
            }))
        };
        Ok(match q {
            Query::Volume { name } => match vols.get(k_volume_name(name).as_slice())? {
                Some(v) => match volume_info(dec(v.value(), "volume")?)? {
                    Some(i) => Ok(Answer::Volume(i)),
                    None => Err(Errno::NOENT),
                },
                None => Err(Errno::NOENT),
            },
            Query::Volumes => {
                let mut all = Vec::new();
                for item in vols.iter()? {
                    let (_, v) = item?;
                    if let Some(i) = volume_info(dec(v.value(), "volume")?)? {
                        all.push(i);
                    }
                }
                Ok(Answer::Volumes(all))
            }
            Query::Lookup { parent, name } => {
                let Some(p) = load(*parent)? else {
                    return Ok(Err(Errno::NOENT));
                };
                if p.kind != FileKind::Dir {
                    return Ok(Err(Errno::NOTDIR));
                }
                let dirents = tx.open_table(DIRENTS)?;
                match current(&dirents, &k_named(volume, *parent, name))? {
                    Some((_, b)) => {
                        let d: DirentVal = dec(&b, "dirent")?;
                        match load(d.ino)? {
                            Some(r) => Ok(Answer::Attr(r.attr(d.ino))),
                            None => bail!("dirent names inode {} which is gone", d.ino),
                        }
                    }
                    None => Err(Errno::NOENT),
                }
            }
            Query::GetAttr { ino } => match load(*ino)? {
                Some(r) => Ok(Answer::Attr(r.attr(*ino))),
                None => Err(Errno::NOENT),
            },
            Query::ReadDir { ino, after, max } | Query::ReadDirPlus { ino, after, max } => {
                let Some(d) = load(*ino)? else {
                    return Ok(Err(Errno::NOENT));
                };
                if d.kind != FileKind::Dir {
                    return Ok(Err(Errno::NOTDIR));
                }
                let cookies = tx.open_table(COOKIES)?;
                let dirents = tx.open_table(DIRENTS)?;
                let from = after.saturating_add(1).max(FIRST_COOKIE);
                let rows = live_under(
                    &cookies,
                    &k_ino(volume, *ino),
                    &from.to_be_bytes(),
                    *max as usize + 1,
                )?;
                let end = rows.len() <= *max as usize;
                let mut entries = Vec::with_capacity(rows.len().min(*max as usize));
                for (suffix, name) in rows.into_iter().take(*max as usize) {
                    let cookie = be_u64(&suffix);
                    let Some((_, b)) = current(&dirents, &k_named(volume, *ino, &name))? else {
                        bail!("cookie {cookie} of directory {ino} names a missing entry");
                    };
                    let dv: DirentVal = dec(&b, "dirent")?;
                    entries.push(DirEntry {
                        name,
                        ino: dv.ino,
                        kind: dv.kind,
                        cookie,
                    });
                }
                if matches!(q, Query::ReadDir { .. }) {
                    return Ok(Ok(Answer::Dir { entries, end }));
                }
                let x = tx.open_table(XATTRS)?;
                let mut plus = Vec::with_capacity(entries.len());
                for entry in entries {
                    let Some(r) = load(entry.ino)? else {
                        bail!(
                            "dirent {:?} names inode {} which is gone",
                            entry.name,
                            entry.ino
                        );
                    };
                    plus.push(DirEntryPlus {
                        attr: r.attr(entry.ino),
                        xattr_names: xattr_names_within(
                            &x,
                            &k_ino(volume, entry.ino),
                            MAX_PLUS_XATTR_NAMES_BYTES,
                        )?,
                        entry,
                    });
                }
                Ok(Answer::DirPlus { entries: plus, end })
            }
            Query::ReadLink { ino } => match load(*ino)? {
                Some(r) if r.kind == FileKind::Symlink => Ok(Answer::Link(r.target)),
                Some(_) => Err(Errno::INVAL),
                None => Err(Errno::NOENT),
            },
            Query::GetXattr { ino, name } => {
                if load(*ino)?.is_none() {
                    return Ok(Err(Errno::NOENT));
                }
                let x = tx.open_table(XATTRS)?;
                match current(&x, &k_named(volume, *ino, name))? {
                    Some((_, v)) => Ok(Answer::Xattr(v)),
                    None => Err(Errno::NODATA),
                }
            }
            Query::ListXattr { ino } => {
                if load(*ino)?.is_none() {
                    return Ok(Err(Errno::NOENT));
                }
                let x = tx.open_table(XATTRS)?;
                let names = live_under(&x, &k_ino(volume, *ino), &[], usize::MAX)?
                    .into_iter()
                    .map(|(suffix, _)| suffix[2..].to_vec())
                    .collect();
                Ok(Answer::XattrNames(names))
            }
            Query::Open { .. } => unreachable!("answered as Extents above"),
            Query::Extents { ino, from, to, max } => {
                let Some(r) = load(*ino)? else {
                    return Ok(Err(Errno::NOENT));
                };
                if r.kind != FileKind::File {
                    return Ok(Err(if r.kind == FileKind::Dir {
                        Errno::ISDIR
                    } else {
                        Errno::INVAL
                    }));
                }
                let ext = tx.open_table(EXTENTS)?;
                let (extents, more) = extents_in(&ext, volume, *ino, *from, *to, *max as usize)?;
                Ok(Answer::Extents {
                    extents,
                    size: r.size,
                    more,
                })
            }
            Query::StatFs => match volume_by_id(&vols, volume)? {
                Some(v) => Ok(Answer::StatFs(StatFs {
                    files: v.files,
                    logical_bytes: v.logical_bytes,
                    device_bytes: 0,
                    device_free_bytes: 0,
                })),
                None => Err(Errno::NOENT),
            },
            // The server runs these (they need the shards).
            Query::Fsck { .. } | Query::Gc | Query::Members => Err(Errno::NOTSUP),
            Query::Tokens => {
                let mut out = Vec::new();
                for item in tx.open_table(TOKENS)?.iter()? {
                    let (k, v) = item?;
                    let rec: StoredToken = dec(v.value(), "token")?;
                    let sha256: [u8; 32] = k.value()[4..].try_into().context("token key")?;
                    out.push(TokenInfo {
                        id: hex::encode(&sha256[..8]),
                        sha256,
                        scope: rec.scope,
                        expires_ms: rec.expires_ms,
                        revoked: rec.revoked,
                        label: rec.label,
                        created_ms: rec.created_ms,
                    });
                }
                Ok(Answer::Tokens(out))
            }
            Query::Nodes => {
                let sys = tx.open_table(SYS)?;
                let map_epoch = match sys.get(SYS_MAP_EPOCH)? {
                    Some(v) => u64::from_le_bytes(v.value().try_into().context("map epoch")?),
                    None => 0,
                };
                let nodes = all_nodes(&tx.open_table(NODES)?)?
                    .into_iter()
                    .map(|(id, n)| NodeEntry {
                        id,
                        spec: n.spec,
                        state: n.state,
                    })
                    .collect();
                Ok(Answer::Nodes { map_epoch, nodes })
            }
            Query::LogVersion => Ok(Answer::LogVersion(log_version_in(&tx.open_table(SYS)?)?)),
            Query::GcEpoch => {
                let sys = tx.open_table(SYS)?;
                let e = match sys.get(SYS_GC_EPOCH)? {
                    Some(v) => u64::from_le_bytes(v.value().try_into().context("gc epoch")?),
                    None => 1,
                };
                Ok(Answer::GcEpoch(e))
            }
        })
    }

    /// The metadata log version this state has applied ([`Mutation::SetLogVersion`]).
    pub fn log_version(&self) -> Result<u16> {
        let tx = self.db.begin_read()?;
        log_version_in(&tx.open_table(SYS)?)
    }

    /// The tokens epoch: raised by every token change (cheap to poll).
    pub fn tokens_epoch(&self) -> Result<u64> {
        let tx = self.db.begin_read()?;
        let sys = tx.open_table(SYS)?;
        Ok(match sys.get(SYS_TOKENS_EPOCH)? {
            Some(v) => u64::from_le_bytes(v.value().try_into().context("tokens epoch")?),
            None => 0,
        })
    }

    /// Volume id by name (for token scopes), from the current state.
    pub fn volume_id(&self, name: &str) -> Result<Option<u32>> {
        let tx = self.db.begin_read()?;
        let vols = tx.open_table(VOLUMES)?;
        Ok(match vols.get(k_volume_name(name).as_slice())? {
            Some(v) => Some(dec::<VolumeRec>(v.value(), "volume")?.id),
            None => None,
        })
    }

    /// (volumes, live inodes in all of them).
    pub fn counts(&self) -> Result<(u64, u64)> {
        let tx = self.db.begin_read()?;
        let vols = tx.open_table(VOLUMES)?;
        let (mut n, mut files) = (0, 0);
        for item in vols.iter()? {
            let (_, v) = item?;
            let rec: VolumeRec = dec(v.value(), "volume")?;
            n += 1;
            files += rec.files;
        }
        Ok((n, files))
    }

    /// Every chunk id a live extent of any volume references (tests and simulators; the
    /// GC mark and fsck use [`Self::referenced_levels`], one scan for both).
    pub fn referenced_chunks(&self) -> Result<HashSet<ChunkId>> {
        Ok(self.referenced_levels()?.into_keys().collect())
    }

    /// Every chunk id a live extent references, with its level: the most `copies` of the
    /// volumes referencing it (fsck's copies check).
    pub fn referenced_levels(&self) -> Result<HashMap<ChunkId, u8>> {
        let tx = self.db.begin_read()?;
        let mut copies: HashMap<u32, u8> = HashMap::new();
        for item in tx.open_table(VOLUMES)?.iter()? {
            let (_, v) = item?;
            let rec: VolumeRec = dec(v.value(), "volume")?;
            copies.insert(rec.id, rec.copies);
        }
        let ext = tx.open_table(EXTENTS)?;
        let mut out = HashMap::new();
        for item in ext.iter()? {
            let (k, v) = item?;
            let (k, v) = (k.value(), v.value());
            if v.len() < 8 || k.len() < 8 {
                bail!("short extent record");
            }
            let vol = u32::from_be_bytes(k[4..8].try_into().expect("4 bytes"));
            let ev: ExtentVal = dec(&v[8..], "extent")?;
            let level = copies.get(&vol).copied().unwrap_or(1).max(1);
            let l = out.entry(ev.chunk).or_insert(0);
            *l = level.max(*l);
        }
        Ok(out)
    }

    /// The whole store as bytes (a Raft snapshot): every table's rows.
    pub fn export(&self) -> Result<Vec<u8>> {
        // A snapshot lets Raft purge the log behind it: what it holds must be durable here.
        self.persist()?;
        let tx = self.db.begin_read()?;
        let mut tables: Snapshot = Vec::new();
        for def in ALL_TABLES {
            let t = tx.open_table(def)?;
            let mut rows = Vec::new();
            for item in t.iter()? {
                let (k, v) = item?;
                rows.push((k.value().to_vec(), v.value().to_vec()));
            }
            tables.push((redb::TableHandle::name(&def).to_string(), rows));
        }
        Ok(postcard::to_allocvec(&tables)?)
    }

    /// Replace the whole store with a snapshot from [`export`](Self::export), recording
    /// `raft_state`, in one transaction.
    pub fn import(&self, data: &[u8], raft_state: &[u8]) -> Result<()> {
        let tables: Snapshot =
            postcard::from_bytes(data).context("metadata snapshot does not decode")?;
        let tx = self.db.begin_write()?;
        for def in ALL_TABLES {
            tx.delete_table(def)?;
            let mut t = tx.open_table(def)?;
            let name = redb::TableHandle::name(&def);
            if let Some((_, rows)) = tables.iter().find(|(n, _)| n == name) {
                for (k, v) in rows {
                    t.insert(k.as_slice(), v.as_slice())?;
                }
            }
        }
        {
            let mut sys = tx.open_table(SYS)?;
            // A snapshot from a log this build cannot read: keep the state we have.
            let at = log_version_in(&sys)?;
            let speaks = super::version::speaks();
            if at > speaks {
                bail!(
                    "the metadata snapshot is at log version {at}; this build speaks up to \
                     {speaks}: upgrade this node"
                );
            }
            sys.insert(SYS_RAFT, raft_state)?;
        }
        tx.commit()?;
        Ok(())
    }
}

/// The log version recorded in the `sys` table (absent: the first, [`PROTOCOL_VERSION_MIN`]).
fn log_version_in<T: ReadableTable<&'static [u8], &'static [u8]>>(sys: &T) -> Result<u16> {
    Ok(match sys.get(SYS_LOG_VERSION)? {
        Some(v) => {
            let v = u64::from_le_bytes(v.value().try_into().context("log version")?);
            u16::try_from(v).context("log version out of range")?
        }
        None => PROTOCOL_VERSION_MIN,
    })
}

/// [`Mutation::AddNode`]: the next node id (ids are never reused: a removed node's id stays
/// taken), a new map epoch. The same name at the same address is the same node (a retried
/// join); the same name elsewhere, or another name at the same address, is refused (EEXIST).
fn add_node(t: &mut Tables<'_>, spec: &NodeSpec) -> OpResult<Answer> {
    for (id, n) in store!(all_nodes(&t.nodes)) {
        let same_addr = n.spec.host == spec.host && n.spec.meta_port == spec.meta_port;
        if n.spec.name == spec.name && same_addr {
            let map_epoch = store!(t.sys_u64(SYS_MAP_EPOCH, 0));
            return Ok(Answer::Node { id, map_epoch });
        }
        if n.spec.name == spec.name || same_addr {
            return Err(Errno::EXIST.into());
        }
    }
    let id = store!(t.sys_u64(SYS_NEXT_NODE, 1));
    store!(t.set_sys_u64(SYS_NEXT_NODE, id + 1));
    let map_epoch = store!(t.sys_u64(SYS_MAP_EPOCH, 0)) + 1;
    store!(t.set_sys_u64(SYS_MAP_EPOCH, map_epoch));
    let rec = StoredNode {
        spec: spec.clone(),
        state: NodeState::Up,
    };
    store!(t.nodes.insert(k_node(id).as_slice(), enc(&rec).as_slice()));
    Ok(Answer::Node { id, map_epoch })
}

/// [`Mutation::SetNodeState`]: a new map epoch when the state changes.
fn set_node_state(t: &mut Tables<'_>, id: u64, state: NodeState) -> OpResult<Answer> {
    let key = k_node(id);
    let Some(v) = store!(t.nodes.get(key.as_slice())) else {
        return Err(Errno::NOENT.into());
    };
    let mut rec: StoredNode = store!(dec(v.value(), "node"));
    drop(v);
    if rec.state != state {
        rec.state = state;
        store!(t.nodes.insert(key.as_slice(), enc(&rec).as_slice()));
        let map_epoch = store!(t.sys_u64(SYS_MAP_EPOCH, 0)) + 1;
        store!(t.set_sys_u64(SYS_MAP_EPOCH, map_epoch));
    }
    Ok(Answer::Done)
}

/// A token as the `tokens` table holds it (keyed by the SHA-256 of its secret).
#[derive(Serialize, Deserialize)]
struct StoredToken {
    scope: TokenScope,
    expires_ms: u64,
    revoked: bool,
    label: String,
    created_ms: u64,
}

fn k_token(sha256: &[u8; 32]) -> Vec<u8> {
    let mut k = 0u32.to_be_bytes().to_vec();
    k.extend_from_slice(sha256);
    k
}

fn bump_tokens_epoch(t: &mut Tables<'_>) -> Result<()> {
    let e = t.sys_u64(SYS_TOKENS_EPOCH, 0)? + 1;
    t.set_sys_u64(SYS_TOKENS_EPOCH, e)
}

/// A node as the `nodes` table holds it.
#[derive(Serialize, Deserialize)]
struct StoredNode {
    spec: NodeSpec,
    state: NodeState,
}

fn all_nodes(
    tbl: &impl ReadableTable<&'static [u8], &'static [u8]>,
) -> Result<Vec<(u64, StoredNode)>> {
    let mut out = Vec::new();
    for item in tbl.iter()? {
        let (k, v) = item?;
        out.push((be_u64(&k.value()[4..]), dec(v.value(), "node")?));
    }
    Ok(out)
}

/// Apply one command: exactly once per `(client, seq)`.
fn apply_one(t: &mut Tables<'_>, cmd: &MetaCommand) -> Result<MetaReply> {
    let mut skey = 0u32.to_be_bytes().to_vec();
    skey.extend_from_slice(&cmd.client.to_be_bytes());
    let floor_key = {
        let mut k = skey.clone();
        k.extend_from_slice(&[0xff; 8]);
        k
    };
    let floor = match t.sessions.get(floor_key.as_slice())? {
        Some(v) => u64::from_le_bytes(v.value().try_into().context("session floor")?),
        None => 0,
    };
    if cmd.seq < floor {
        // The client said it holds this answer: a stale duplicate, not to be applied again.
        return Ok(Err(Errno::STALE));
    }
    let mut rkey = skey.clone();
    rkey.extend_from_slice(&cmd.seq.to_be_bytes());
    if let Some(v) = t.sessions.get(rkey.as_slice())? {
        return meta::decode::<MetaReply>(v.value()).context("stored session reply");
    }
    // Forget the answers the client no longer needs.
    if cmd.acked_below > floor {
        let mut lo = skey.clone();
        lo.extend_from_slice(&floor.to_be_bytes());
        let mut hi = skey.clone();
        hi.extend_from_slice(&cmd.acked_below.to_be_bytes());
        let stale: Vec<Vec<u8>> = t
            .sessions
            .range::<&[u8]>(lo.as_slice()..hi.as_slice())?
            .map(|r| r.map(|(k, _)| k.value().to_vec()))
            .collect::<std::result::Result<_, _>>()?;
        for k in stale {
            t.sessions.remove(k.as_slice())?;
        }
        t.sessions.insert(
            floor_key.as_slice(),
            cmd.acked_below.min(u64::MAX - 1).to_le_bytes().as_slice(),
        )?;
    }
    let reply = match mutate(t, cmd) {
        Ok(a) => Ok(a),
        Err(OpError::Errno(e)) => Err(e),
        Err(OpError::Store(e)) => return Err(e),
    };
    t.sessions
        .insert(rkey.as_slice(), meta::encode(&reply).as_slice())?;
    Ok(reply)
}

fn set_time(t: SetTime, now: Timespec) -> Timespec {
    match t {
        SetTime::Now => now,
        SetTime::At(ts) => ts,
    }
}

fn mutate(t: &mut Tables<'_>, cmd: &MetaCommand) -> OpResult<Answer> {
    let now = cmd.now;
    match &cmd.op {
        Mutation::CreateVolume { name, copies } => {
            if !(1..=hivefs_net::proto::MAX_LEVEL).contains(copies) {
                return Err(Errno::INVAL.into());
            }
            let key = k_volume_name(name);
            if store!(t.volumes.get(key.as_slice())).is_some() {
                return Err(Errno::EXIST.into());
            }
            let id = store!(t.sys_u64(SYS_NEXT_VOLUME, 1)) as u32;
            store!(t.set_sys_u64(SYS_NEXT_VOLUME, id as u64 + 1));
            let vol = VolumeRec {
                id,
                name: name.clone(),
                copies: *copies,
                epoch: 1,
                next_ino: ROOT_INO + 1,
                next_gen: 2,
                files: 1,
                logical_bytes: 0,
            };
            let root = InodeRec {
                gen: 1,
                kind: FileKind::Dir,
                perm: 0o755,
                nlink: 2,
                uid: 0,
                gid: 0,
                size: 0,
                atime: now,
                mtime: now,
                ctime: now,
                crtime: now,
                rdev: 0,
                target: Vec::new(),
                parent: ROOT_INO,
                next_cookie: FIRST_COOKIE,
            };
            store!(put_v(&mut t.inodes, &k_ino(id, ROOT_INO), 1, &enc(&root)));
            store!(t.volumes.insert(key.as_slice(), enc(&vol).as_slice()));
            return Ok(Answer::Volume(VolumeInfo {
                id,
                name: name.clone(),
                copies: *copies,
                root: root.attr(ROOT_INO),
            }));
        }
        Mutation::AdvanceGcEpoch => {
            let e = store!(t.sys_u64(SYS_GC_EPOCH, 1)) + 1;
            store!(t.set_sys_u64(SYS_GC_EPOCH, e));
            return Ok(Answer::GcEpoch(e));
        }
        Mutation::RotateCa(r) => {
            if let Some(cur) = store!(t.sys.get(SYS_CA)) {
                let cur: CaRotation = store!(meta::decode(cur.value()));
                if cur.ca_cert_pem != r.previous_cert_pem {
                    return Err(Errno::STALE.into()); // rotated meanwhile
                }
            }
            store!(t.sys.insert(SYS_CA, meta::encode(r).as_slice()));
            return Ok(Answer::Done);
        }
        Mutation::NewLeaseEpoch => {
            let e = store!(t.sys_u64(SYS_LEASE_EPOCH, 0)) + 1;
            store!(t.set_sys_u64(SYS_LEASE_EPOCH, e));
            return Ok(Answer::LeaseEpoch(e));
        }
        Mutation::SetLogVersion { version } => {
            let speaks = super::version::speaks();
            if *version > speaks {
                // The log now carries commands this build cannot know: stop, as for a
                // command that does not decode (see `apply_batch`).
                return Err(OpError::Store(anyhow::anyhow!(
                    "the metadata log is at version {version}; this build speaks up to \
                     {speaks}: upgrade this node"
                )));
            }
            let cur = store!(t.sys_u64(SYS_LOG_VERSION, PROTOCOL_VERSION_MIN as u64));
            store!(t.set_sys_u64(SYS_LOG_VERSION, cur.max(*version as u64)));
            return Ok(Answer::Done);
        }
        Mutation::AddNode(spec) => return add_node(t, spec),
        Mutation::SetNodeState { id, state } => return set_node_state(t, *id, *state),
        Mutation::CreateToken {
            sha256,
            scope,
            expires_ms,
            label,
            created_ms,
        } => {
            let key = k_token(sha256);
            if store!(t.tokens.get(key.as_slice())).is_some() {
                return Err(Errno::EXIST.into());
            }
            let rec = StoredToken {
                scope: scope.clone(),
                expires_ms: *expires_ms,
                revoked: false,
                label: label.clone(),
                created_ms: *created_ms,
            };
            store!(t.tokens.insert(key.as_slice(), enc(&rec).as_slice()));
            store!(bump_tokens_epoch(t));
            return Ok(Answer::Done);
        }
        Mutation::RevokeToken { id } => {
            let id = id.to_ascii_lowercase();
            let mut hits = Vec::new();
            for item in store!(t.tokens.iter()) {
                let (k, _) = store!(item);
                if hex::encode(&k.value()[4..]).starts_with(&id) {
                    hits.push(k.value().to_vec());
                }
            }
            let [key] = hits.as_slice() else {
                return Err(if hits.is_empty() {
                    Errno::NOENT
                } else {
                    Errno::INVAL
                }
                .into());
            };
            let v = store!(t.tokens.get(key.as_slice())).map(|v| v.value().to_vec());
            let Some(v) = v else {
                return Err(Errno::NOENT.into());
            };
            let mut rec: StoredToken = store!(dec(&v, "token"));
            rec.revoked = true;
            store!(t.tokens.insert(key.as_slice(), enc(&rec).as_slice()));
            store!(bump_tokens_epoch(t));
            return Ok(Answer::Done);
        }
        _ => {}
    }
    // Volume-scoped mutations.
    let Some(vol) = store!(volume_by_id(&t.volumes, cmd.volume)) else {
        return Err(Errno::NOENT.into());
    };
    let gc_epoch = store!(t.sys_u64(SYS_GC_EPOCH, 1));
    let mut op = Op {
        t,
        vol,
        now,
        inodes: BTreeMap::new(),
        dirty: HashSet::new(),
    };
    let answer = match &cmd.op {
        Mutation::CreateVolume { .. }
        | Mutation::AdvanceGcEpoch
        | Mutation::NewLeaseEpoch
        | Mutation::RotateCa(_)
        | Mutation::AddNode(_)
        | Mutation::SetNodeState { .. }
        | Mutation::CreateToken { .. }
        | Mutation::RevokeToken { .. }
        | Mutation::SetLogVersion { .. } => unreachable!("handled above"),
        Mutation::Create {
            parent,
            name,
            kind,
            perm,
            uid,
            gid,
            rdev,
        } => {
            let new = NewEntry {
                kind: *kind,
                perm: *perm,
                uid: *uid,
                gid: *gid,
            };
            op.add_entry(*parent, name, new, |rec| rec.rdev = *rdev)?
        }
        Mutation::Symlink {
            parent,
            name,
            target,
            uid,
            gid,
        } => {
            let new = NewEntry {
                kind: FileKind::Symlink,
                perm: 0o777,
                uid: *uid,
                gid: *gid,
            };
            op.add_entry(*parent, name, new, |rec| {
                rec.size = target.len() as u64;
                rec.target = target.clone();
            })?
        }
        Mutation::Link { ino, parent, name } => {
            let kind = op.inode(*ino)?.kind;
            if kind == FileKind::Dir {
                return Err(Errno::PERM.into());
            }
            op.dir(*parent)?;
            if op.dirent(*parent, name)?.is_some() {
                return Err(Errno::EXIST.into());
            }
            if op.inode(*ino)?.nlink >= 65_000 {
                return Err(Errno::MLINK.into());
            }
            let r = op.touch(*ino)?;
            let was_orphan = r.nlink == 0;
            r.nlink += 1;
            r.ctime = now;
            if was_orphan {
                store!(op.t.orphans.remove(k_ino(op.vol.id, *ino).as_slice()));
            }
            op.link_name(*parent, name, *ino, kind)?;
            Answer::Attr(op.inode(*ino)?.attr(*ino))
        }
        Mutation::Unlink { parent, name } => {
            op.dir(*parent)?;
            let Some(d) = op.dirent(*parent, name)? else {
                return Err(Errno::NOENT.into());
            };
            if d.kind == FileKind::Dir {
                return Err(Errno::ISDIR.into());
            }
            op.unlink_name(*parent, name, d.cookie)?;
            op.drop_link(d.ino)?;
            Answer::Attr(op.inode(d.ino)?.attr(d.ino))
        }
        Mutation::Rmdir { parent, name } => {
            op.dir(*parent)?;
            let Some(d) = op.dirent(*parent, name)? else {
                return Err(Errno::NOENT.into());
            };
            if d.kind != FileKind::Dir {
                return Err(Errno::NOTDIR.into());
            }
            if !op.dir_is_empty(d.ino)? {
                return Err(Errno::NOTEMPTY.into());
            }
            op.unlink_name(*parent, name, d.cookie)?;
            op.touch(*parent)?.nlink -= 1;
            op.orphan_dir(d.ino)?;
            Answer::Attr(op.inode(d.ino)?.attr(d.ino))
        }
        Mutation::Rename {
            parent,
            name,
            new_parent,
            new_name,
            mode,
        } => rename(&mut op, *parent, name, *new_parent, new_name, *mode)?,
        Mutation::SetAttr { ino, set } => setattr(&mut op, *ino, set)?,
        Mutation::SetXattr {
            ino,
            name,
            value,
            mode,
        } => {
            op.inode(*ino)?;
            let base = k_named(op.vol.id, *ino, name);
            let exists = store!(current(&op.t.xattrs, &base)).is_some();
            match (mode, exists) {
                (XattrMode::Create, true) => return Err(Errno::EXIST.into()),
                (XattrMode::Replace, false) => return Err(Errno::NODATA.into()),
                _ => {}
            }
            let epoch = op.epoch();
            store!(put_v(&mut op.t.xattrs, &base, epoch, value));
            op.touch(*ino)?.ctime = now;
            Answer::Done
        }
        Mutation::RemoveXattr { ino, name } => {
            op.inode(*ino)?;
            let base = k_named(op.vol.id, *ino, name);
            let epoch = op.epoch();
            if !store!(kill_v(&mut op.t.xattrs, &base, epoch)) {
                return Err(Errno::NODATA.into());
            }
            op.touch(*ino)?.ctime = now;
            Answer::Done
        }
        Mutation::CommitWrite {
            ino,
            extents,
            size_at_least,
            claim_epoch,
            lease,
        }
        | Mutation::CommitWriteThenSet {
            ino,
            extents,
            size_at_least,
            claim_epoch,
            lease,
            ..
        } => {
            let then: &[SetAttr] = match &cmd.op {
                Mutation::CommitWriteThenSet { then, .. } => then,
                _ => &[],
            };
            // Checked before anything changes (a refusal must leave nothing behind); the
            // request's check refuses a size already, so a log entry never holds one.
            if then.iter().any(|set| set.size.is_some()) {
                return Err(Errno::INVAL.into());
            }
            let c = Commit {
                extents,
                size_at_least: *size_at_least,
                claim_epoch: *claim_epoch,
                lease: *lease,
            };
            let mut a = commit_write(&mut op, *ino, &c, gc_epoch)?;
            for set in then {
                // Cannot fail: the inode exists, and no size is set.
                a = setattr(&mut op, *ino, set)?;
            }
            a
        }
        Mutation::Fence { ino, token } => {
            op.inode(*ino)?;
            if *token > op.fence(*ino)? {
                let key = k_ino(op.vol.id, *ino);
                store!(op
                    .t
                    .fences
                    .insert(key.as_slice(), token.to_le_bytes().as_slice()));
            }
            Answer::Done
        }
        Mutation::Reclaim { ino } => {
            match op.inode(*ino) {
                Ok(r) if r.nlink == 0 => op.destroy(*ino)?,
                Ok(_) | Err(OpError::Errno(_)) => {} // still linked, or already gone
                Err(e) => return Err(e),
            }
            Answer::Done
        }
    };
    op.finish()?;
    Ok(answer)
}

/// The fields of a commit-write ([`Mutation::CommitWrite`]) past its inode.
struct Commit<'a> {
    extents: &'a [Extent],
    size_at_least: u64,
    claim_epoch: u64,
    lease: u64,
}

/// New extents for exactly the written ranges, size and times: a commit-write, checked
/// (lease fence, kind, claim epoch) before anything changes.
fn commit_write(op: &mut Op<'_, '_>, ino: u64, c: &Commit<'_>, gc_epoch: u64) -> OpResult<Answer> {
    let now = op.now;
    let kind = op.inode(ino)?.kind;
    if c.lease != 0 && c.lease < op.fence(ino)? {
        // Written under a write lease that expired and was handed on.
        return Err(Errno::STALE.into());
    }
    match kind {
        FileKind::File => {}
        FileKind::Dir => return Err(Errno::ISDIR.into()),
        _ => return Err(Errno::INVAL.into()),
    }
    if c.claim_epoch != gc_epoch {
        // Claims from an older GC epoch may name chunks the sweep is removing.
        return Err(Errno::AGAIN.into());
    }
    let mut end = c.size_at_least;
    for e in c.extents {
        let removed = op.punch(ino, e.offset, e.end())?;
        op.put_extent(ino, e)?;
        op.vol.logical_bytes = op.vol.logical_bytes - removed + e.len as u64;
        end = end.max(e.end());
    }
    let r = op.touch(ino)?;
    r.size = r.size.max(end);
    r.mtime = now;
    r.ctime = now;
    Ok(Answer::Attr(op.inode(ino)?.attr(ino)))
}

fn setattr(op: &mut Op<'_, '_>, ino: u64, set: &SetAttr) -> OpResult<Answer> {
    let now = op.now;
    let kind = op.inode(ino)?.kind;
    if let Some(size) = set.size {
        match kind {
            FileKind::File => {}
            FileKind::Dir => return Err(Errno::ISDIR.into()),
            _ => return Err(Errno::INVAL.into()),
        }
        let old = op.inode(ino)?.size;
        if size < old {
            let freed = op.truncate_extents(ino, size)?;
            op.vol.logical_bytes = op.vol.logical_bytes.saturating_sub(freed);
        }
        let r = op.touch(ino)?;
        r.size = size;
        r.mtime = now;
    }
    let r = op.touch(ino)?;
    if let Some(p) = set.perm {
        r.perm = p & 0o7777;
    }
    if let Some(u) = set.uid {
        r.uid = u;
    }
    if let Some(g) = set.gid {
        r.gid = g;
    }
    if let Some(a) = set.atime {
        r.atime = set_time(a, now);
    }
    if let Some(m) = set.mtime {
        r.mtime = set_time(m, now);
    }
    r.ctime = now;
    Ok(Answer::Attr(r.attr(ino)))
}

fn rename(
    op: &mut Op<'_, '_>,
    parent: u64,
    name: &[u8],
    new_parent: u64,
    new_name: &[u8],
    mode: RenameMode,
) -> OpResult<Answer> {
    let now = op.now;
    op.dir(parent)?;
    op.dir(new_parent)?;
    let Some(src) = op.dirent(parent, name)? else {
        return Err(Errno::NOENT.into());
    };
    let dst = op.dirent(new_parent, new_name)?;
    if parent == new_parent && name == new_name {
        return match (mode, dst) {
            (RenameMode::NoReplace, Some(_)) => Err(Errno::EXIST.into()),
            _ => Ok(Answer::Renamed {
                moved: src.ino,
                replaced: None,
            }),
        };
    }
    // A directory may not move below itself.
    if src.kind == FileKind::Dir && op.within(new_parent, src.ino)? {
        return Err(Errno::INVAL.into());
    }
    match (mode, dst) {
        (RenameMode::NoReplace, Some(_)) => return Err(Errno::EXIST.into()),
        (RenameMode::Exchange, None) => return Err(Errno::NOENT.into()),
        (RenameMode::Exchange, Some(d)) => {
            if d.kind == FileKind::Dir && op.within(parent, d.ino)? {
                return Err(Errno::INVAL.into());
            }
            let a = DirentVal {
                ino: d.ino,
                kind: d.kind,
                cookie: src.cookie,
            };
            let b = DirentVal {
                ino: src.ino,
                kind: src.kind,
                cookie: d.cookie,
            };
            op.put_dirent(parent, name, a)?;
            op.put_dirent(new_parent, new_name, b)?;
            if parent != new_parent {
                if src.kind == FileKind::Dir {
                    op.touch(src.ino)?.parent = new_parent;
                    op.touch(parent)?.nlink -= 1;
                    op.touch(new_parent)?.nlink += 1;
                }
                if d.kind == FileKind::Dir {
                    op.touch(d.ino)?.parent = parent;
                    op.touch(new_parent)?.nlink -= 1;
                    op.touch(parent)?.nlink += 1;
                }
            }
            for ino in [src.ino, d.ino] {
                op.touch(ino)?.ctime = now;
            }
            for p in [parent, new_parent] {
                let r = op.touch(p)?;
                r.mtime = now;
                r.ctime = now;
            }
            return Ok(Answer::Renamed {
                moved: src.ino,
                replaced: Some(d.ino),
            });
        }
        _ => {}
    }
    let mut replaced = None;
    if let Some(d) = dst {
        if d.ino == src.ino {
            // Two names of one file: rename(2) does nothing and succeeds.
            return Ok(Answer::Renamed {
                moved: src.ino,
                replaced: None,
            });
        }
        match (src.kind == FileKind::Dir, d.kind == FileKind::Dir) {
            (true, false) => return Err(Errno::NOTDIR.into()),
            (false, true) => return Err(Errno::ISDIR.into()),
            (true, true) if !op.dir_is_empty(d.ino)? => return Err(Errno::NOTEMPTY.into()),
            _ => {}
        }
        op.unlink_name(new_parent, new_name, d.cookie)?;
        if d.kind == FileKind::Dir {
            op.touch(new_parent)?.nlink -= 1;
            op.orphan_dir(d.ino)?;
        } else {
            op.drop_link(d.ino)?;
        }
        replaced = Some(d.ino);
    }
    op.unlink_name(parent, name, src.cookie)?;
    op.link_name(new_parent, new_name, src.ino, src.kind)?;
    if src.kind == FileKind::Dir && parent != new_parent {
        op.touch(src.ino)?.parent = new_parent;
        op.touch(parent)?.nlink -= 1;
        op.touch(new_parent)?.nlink += 1;
    }
    op.touch(src.ino)?.ctime = now;
    Ok(Answer::Renamed {
        moved: src.ino,
        replaced,
    })
}

/// A problem [`MetaStore::check`] found.
pub type Finding = String;

impl MetaStore {
    /// Check the namespace invariants of every volume (see the module docs); returns what is
    /// wrong, empty when all hold. Used by `hive fsck` and by every test as its oracle.
    pub fn check(&self) -> Result<Vec<Finding>> {
        let tx = self.db.begin_read()?;
        let vols = tx.open_table(VOLUMES)?;
        let inodes_t = tx.open_table(INODES)?;
        let dirents_t = tx.open_table(DIRENTS)?;
        let cookies_t = tx.open_table(COOKIES)?;
        let extents_t = tx.open_table(EXTENTS)?;
        let orphans_t = tx.open_table(ORPHANS)?;
        let mut bad = Vec::new();
        for item in vols.iter()? {
            let (_, v) = item?;
            let vol: VolumeRec = dec(v.value(), "volume")?;
            let vp = k_vol(vol.id);
            let mut inodes: HashMap<u64, InodeRec> = HashMap::new();
            for (suffix, payload) in live_under(&inodes_t, &vp, &[], usize::MAX)? {
                inodes.insert(be_u64(&suffix), dec(&payload, "inode")?);
            }
            let mut names: HashMap<u64, u32> = HashMap::new();
            let mut subdirs: HashMap<u64, u32> = HashMap::new();
            let mut dir_parent: HashMap<u64, u64> = HashMap::new();
            let mut cookies_seen = 0usize;
            for (suffix, payload) in live_under(&dirents_t, &vp, &[], usize::MAX)? {
                let parent = be_u64(&suffix);
                let name = &suffix[10..];
                let d: DirentVal = dec(&payload, "dirent")?;
                let what = format!(
                    "volume {}: entry {:?} in directory {parent}",
                    vol.name,
                    String::from_utf8_lossy(name)
                );
                match inodes.get(&parent) {
                    Some(p) if p.kind == FileKind::Dir => {}
                    _ => bad.push(format!("{what}: its directory is not a live directory")),
                }
                match inodes.get(&d.ino) {
                    None => bad.push(format!("{what}: names missing inode {}", d.ino)),
                    Some(r) if r.kind != d.kind => bad.push(format!(
                        "{what}: kind {:?} but inode is {:?}",
                        d.kind, r.kind
                    )),
                    Some(_) => {}
                }
                *names.entry(d.ino).or_default() += 1;
                if d.kind == FileKind::Dir {
                    *subdirs.entry(parent).or_default() += 1;
                    if dir_parent.insert(d.ino, parent).is_some() {
                        bad.push(format!("{what}: directory {} has two names", d.ino));
                    }
                }
                let ck = k_num(vol.id, parent, d.cookie);
                match current(&cookies_t, &ck)? {
                    Some((_, n)) if n == name => cookies_seen += 1,
                    _ => bad.push(format!("{what}: cookie {} does not name it", d.cookie)),
                }
            }
            let all_cookies = live_under(&cookies_t, &vp, &[], usize::MAX)?.len();
            if all_cookies != cookies_seen {
                bad.push(format!(
                    "volume {}: {all_cookies} cookies for {cookies_seen} entries",
                    vol.name
                ));
            }
            let mut logical = 0u64;
            for (&ino, r) in &inodes {
                let what = format!("volume {}: inode {ino}", vol.name);
                let n = names.get(&ino).copied().unwrap_or(0);
                let orphan = orphans_t.get(k_ino(vol.id, ino).as_slice())?.is_some();
                match r.kind {
                    FileKind::Dir if orphan => {
                        if r.nlink != 0 || n != 0 {
                            bad.push(format!(
                                "{what}: removed directory with nlink {} and {n} names",
                                r.nlink
                            ));
                        }
                    }
                    FileKind::Dir => {
                        let want = 2 + subdirs.get(&ino).copied().unwrap_or(0);
                        if r.nlink != want {
                            bad.push(format!("{what}: directory nlink {} (want {want})", r.nlink));
                        }
                        if ino == ROOT_INO {
                            if n != 0 {
                                bad.push(format!("{what}: the root has a name"));
                            }
                        } else {
                            if n != 1 {
                                bad.push(format!("{what}: directory with {n} names"));
                            }
                            if dir_parent.get(&ino) != Some(&r.parent) {
                                bad.push(format!("{what}: parent pointer {} is wrong", r.parent));
                            }
                        }
                    }
                    _ => {
                        if r.nlink != n {
                            bad.push(format!("{what}: nlink {} but {n} names", r.nlink));
                        }
                        if (n == 0) != orphan {
                            bad.push(format!("{what}: orphan list disagrees (names {n})"));
                        }
                    }
                }
                // Extents: in order, not overlapping.
                let (ext, _) = extents_in(&extents_t, vol.id, ino, 0, u64::MAX, usize::MAX)?;
                let mut end = 0u64;
                for e in &ext {
                    if e.offset < end {
                        bad.push(format!("{what}: extents overlap at {}", e.offset));
                    }
                    end = e.end();
                    logical += e.len as u64;
                }
                if !ext.is_empty() && r.kind != FileKind::File {
                    bad.push(format!("{what}: a {:?} with extents", r.kind));
                }
            }
            // Reachability: every directory's parent chain reaches the root.
            for &ino in dir_parent.keys() {
                let mut cur = ino;
                let mut steps = 0;
                while cur != ROOT_INO && steps <= inodes.len() {
                    cur = dir_parent.get(&cur).copied().unwrap_or(ROOT_INO);
                    steps += 1;
                }
                if cur != ROOT_INO || steps > inodes.len() {
                    bad.push(format!(
                        "volume {}: directory {ino} is not below the root",
                        vol.name
                    ));
                }
            }
            if logical != vol.logical_bytes {
                bad.push(format!(
                    "volume {}: logical bytes {} recorded, {logical} in extents",
                    vol.name, vol.logical_bytes
                ));
            }
            if inodes.len() as u64 != vol.files {
                bad.push(format!(
                    "volume {}: {} files recorded, {} inodes live",
                    vol.name,
                    vol.files,
                    inodes.len()
                ));
            }
        }
        Ok(bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hivefs_net::chunk::CHUNK_ID_BYTES;
    use hivefs_net::frame::PROTOCOL_VERSION_MAX;
    use hivefs_nvme::rng::SplitMix64;

    /// A store in a fresh temp file, and a client that numbers its mutations.
    struct Fixture {
        store: MetaStore,
        path: std::path::PathBuf,
        vol: u32,
        client: u64,
        seq: u64,
        clock: i64,
        raft_n: u64,
        /// Hold `acked_below` here (answers the client has not confirmed yet).
        hold: Option<u64>,
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    fn fixture(tag: &str) -> Fixture {
        let path = std::env::temp_dir().join(format!(
            "hivefs-meta-{}-{tag}-{}.redb",
            std::process::id(),
            SplitMix64::new(tag.len() as u64 ^ 0x5eed).next_u64()
        ));
        let _ = std::fs::remove_file(&path);
        let store = MetaStore::open(&path).unwrap();
        let mut f = Fixture {
            store,
            path,
            vol: 0,
            client: 7,
            seq: 0,
            clock: 1_000,
            raft_n: 0,
            hold: None,
        };
        match f.m(Mutation::CreateVolume {
            name: "v".into(),
            copies: 1,
        }) {
            Ok(Answer::Volume(v)) => f.vol = v.id,
            other => panic!("create volume: {other:?}"),
        }
        f
    }

    impl Fixture {
        fn cmd(&mut self, op: Mutation) -> MetaCommand {
            self.seq += 1;
            self.clock += 1;
            MetaCommand {
                volume: self.vol,
                client: self.client,
                seq: self.seq,
                acked_below: self.hold.unwrap_or(self.seq),
                now: Timespec {
                    sec: self.clock,
                    nsec: 5,
                },
                op,
            }
        }

        fn apply(&mut self, c: &MetaCommand) -> MetaReply {
            self.raft_n += 1;
            let bytes = meta::encode(c);
            let out = self
                .store
                .apply_batch(&[Some(&bytes)], &self.raft_n.to_le_bytes())
                .unwrap();
            meta::decode(&out[0]).unwrap()
        }

        fn m(&mut self, op: Mutation) -> MetaReply {
            let c = self.cmd(op);
            self.apply(&c)
        }

        fn q(&self, q: Query) -> MetaReply {
            self.store.query(self.vol, &q).unwrap()
        }

        fn create(&mut self, parent: u64, name: &str, kind: FileKind) -> MetaReply {
            self.m(Mutation::Create {
                parent,
                name: name.into(),
                kind,
                perm: 0o644,
                uid: 1,
                gid: 2,
                rdev: 0,
            })
        }

        fn ino(&mut self, parent: u64, name: &str, kind: FileKind) -> u64 {
            match self.create(parent, name, kind) {
                Ok(Answer::Attr(a)) => a.ino,
                other => panic!("create {name}: {other:?}"),
            }
        }

        fn attr(&self, ino: u64) -> Attr {
            match self.q(Query::GetAttr { ino }) {
                Ok(Answer::Attr(a)) => a,
                other => panic!("getattr {ino}: {other:?}"),
            }
        }

        fn names(&self, dir: u64) -> Vec<String> {
            match self.q(Query::ReadDir {
                ino: dir,
                after: 0,
                max: 4096,
            }) {
                Ok(Answer::Dir { entries, .. }) => entries
                    .into_iter()
                    .map(|e| String::from_utf8(e.name).unwrap())
                    .collect(),
                other => panic!("readdir: {other:?}"),
            }
        }

        fn clean(&self) {
            let bad = self.store.check().unwrap();
            assert!(bad.is_empty(), "fsck findings: {bad:#?}");
        }

        fn rename(&mut self, p: u64, n: &str, np: u64, nn: &str, mode: RenameMode) -> MetaReply {
            self.m(Mutation::Rename {
                parent: p,
                name: n.into(),
                new_parent: np,
                new_name: nn.into(),
                mode,
            })
        }

        fn write(&mut self, ino: u64, offset: u64, len: u32, tag: u8) -> MetaReply {
            self.m(Mutation::CommitWrite {
                ino,
                extents: vec![ext(offset, len, tag, 0)],
                size_at_least: 0,
                claim_epoch: 1,
                lease: 0,
            })
        }

        fn extents(&self, ino: u64) -> Vec<Extent> {
            match self.q(Query::Extents {
                ino,
                from: 0,
                to: u64::MAX,
                max: 16384,
            }) {
                Ok(Answer::Extents { extents, .. }) => extents,
                other => panic!("extents: {other:?}"),
            }
        }
    }

    fn ext(offset: u64, len: u32, tag: u8, chunk_offset: u32) -> Extent {
        Extent {
            offset,
            len,
            chunk: ChunkId([tag; CHUNK_ID_BYTES]),
            chunk_offset,
        }
    }

    #[test]
    fn files_directories_and_errors() {
        let mut f = fixture("basic");
        let d = f.ino(ROOT_INO, "d", FileKind::Dir);
        let a = f.ino(d, "a", FileKind::File);
        assert_eq!(f.create(d, "a", FileKind::File), Err(Errno::EXIST));
        assert_eq!(f.create(a, "x", FileKind::File), Err(Errno::NOTDIR));
        assert_eq!(f.create(999, "x", FileKind::File), Err(Errno::NOENT));
        assert_eq!(f.attr(ROOT_INO).nlink, 3);
        assert_eq!(f.attr(d).nlink, 2);
        match f.q(Query::Lookup {
            parent: d,
            name: b"a".to_vec(),
        }) {
            Ok(Answer::Attr(at)) => {
                assert_eq!(
                    (at.ino, at.kind, at.perm, at.uid, at.gid),
                    (a, FileKind::File, 0o644, 1, 2)
                )
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            f.m(Mutation::Rmdir {
                parent: ROOT_INO,
                name: b"d".to_vec()
            }),
            Err(Errno::NOTEMPTY)
        );
        assert_eq!(
            f.m(Mutation::Unlink {
                parent: ROOT_INO,
                name: b"d".to_vec()
            }),
            Err(Errno::ISDIR)
        );
        // Symlink and readlink.
        let s = match f.m(Mutation::Symlink {
            parent: d,
            name: b"s".to_vec(),
            target: b"../a/b".to_vec(),
            uid: 0,
            gid: 0,
        }) {
            Ok(Answer::Attr(at)) => at.ino,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            f.q(Query::ReadLink { ino: s }),
            Ok(Answer::Link(b"../a/b".to_vec()))
        );
        assert_eq!(f.q(Query::ReadLink { ino: a }), Err(Errno::INVAL));
        // Hard links: attributes shared, nlink counted; unlinking the last makes an orphan.
        assert!(f
            .m(Mutation::Link {
                ino: a,
                parent: ROOT_INO,
                name: b"a2".to_vec()
            })
            .is_ok());
        assert_eq!(f.attr(a).nlink, 2);
        assert_eq!(
            f.m(Mutation::Link {
                ino: d,
                parent: ROOT_INO,
                name: b"d2".to_vec()
            }),
            Err(Errno::PERM)
        );
        f.clean();
        for (p, n) in [(d, "a"), (ROOT_INO, "a2")] {
            assert!(f
                .m(Mutation::Unlink {
                    parent: p,
                    name: n.into()
                })
                .is_ok());
        }
        assert_eq!(
            f.attr(a).nlink,
            0,
            "open handles still reach an unlinked file"
        );
        f.clean();
        assert_eq!(f.m(Mutation::Reclaim { ino: a }), Ok(Answer::Done));
        assert_eq!(f.q(Query::GetAttr { ino: a }), Err(Errno::NOENT));
        f.clean();
        f.m(Mutation::Unlink {
            parent: d,
            name: b"s".to_vec(),
        })
        .unwrap();
        f.m(Mutation::Reclaim { ino: s }).unwrap();
        f.m(Mutation::Rmdir {
            parent: ROOT_INO,
            name: b"d".to_vec(),
        })
        .unwrap();
        assert_eq!(f.attr(ROOT_INO).nlink, 2);
        assert!(f.names(ROOT_INO).is_empty());
        f.clean();
    }

    #[test]
    fn rename_modes() {
        let mut f = fixture("rename");
        let a = f.ino(ROOT_INO, "a", FileKind::Dir);
        let b = f.ino(ROOT_INO, "b", FileKind::Dir);
        let x = f.ino(a, "x", FileKind::File);
        let y = f.ino(b, "y", FileKind::File);
        let sub = f.ino(a, "sub", FileKind::Dir);
        // Into its own subtree: EINVAL.
        assert_eq!(
            f.rename(ROOT_INO, "a", sub, "a", RenameMode::Replace),
            Err(Errno::INVAL)
        );
        assert_eq!(
            f.rename(ROOT_INO, "a", a, "self", RenameMode::Replace),
            Err(Errno::INVAL)
        );
        // NOREPLACE over an existing name.
        f.ino(b, "x", FileKind::File);
        assert_eq!(
            f.rename(a, "x", b, "x", RenameMode::NoReplace),
            Err(Errno::EXIST)
        );
        // Replace a file: the old target loses its name.
        let r = f.rename(a, "x", b, "x", RenameMode::Replace).unwrap();
        assert!(matches!(r, Answer::Renamed { moved, replaced: Some(_) } if moved == x));
        assert_eq!(f.names(a), vec!["sub"]);
        // A file over a directory and a directory over a file.
        assert_eq!(
            f.rename(b, "x", a, "sub", RenameMode::Replace),
            Err(Errno::ISDIR)
        );
        assert_eq!(
            f.rename(a, "sub", b, "x", RenameMode::Replace),
            Err(Errno::NOTDIR)
        );
        // A directory moves across parents: nlinks follow.
        f.rename(a, "sub", b, "sub", RenameMode::Replace).unwrap();
        assert_eq!((f.attr(a).nlink, f.attr(b).nlink), (2, 3));
        // Over an empty directory: allowed; over a non-empty one: ENOTEMPTY.
        let e = f.ino(a, "e", FileKind::Dir);
        f.ino(e, "inner", FileKind::File);
        assert_eq!(
            f.rename(b, "sub", a, "e", RenameMode::Replace),
            Err(Errno::NOTEMPTY)
        );
        f.ino(a, "empty", FileKind::Dir);
        f.rename(b, "sub", a, "empty", RenameMode::Replace).unwrap();
        assert_eq!((f.attr(a).nlink, f.attr(b).nlink), (4, 2));
        f.clean();
        // EXCHANGE a file and a directory across parents.
        f.rename(b, "y", a, "e", RenameMode::Exchange).unwrap();
        assert_eq!(f.names(b).iter().filter(|n| *n == "y").count(), 1);
        match f.q(Query::Lookup {
            parent: b,
            name: b"y".to_vec(),
        }) {
            Ok(Answer::Attr(at)) => assert_eq!(at.ino, e),
            other => panic!("{other:?}"),
        }
        match f.q(Query::Lookup {
            parent: a,
            name: b"e".to_vec(),
        }) {
            Ok(Answer::Attr(at)) => assert_eq!(at.ino, y),
            other => panic!("{other:?}"),
        }
        assert_eq!((f.attr(a).nlink, f.attr(b).nlink), (3, 3));
        assert_eq!(
            f.rename(a, "nope", b, "y", RenameMode::Exchange),
            Err(Errno::NOENT)
        );
        assert_eq!(
            f.rename(a, "e", b, "nope", RenameMode::Exchange),
            Err(Errno::NOENT)
        );
        f.clean();
    }

    #[test]
    fn commit_write_splits_old_extents_and_truncate_trims() {
        let mut f = fixture("extents");
        let ino = f.ino(ROOT_INO, "f", FileKind::File);
        f.write(ino, 0, 100, 1).unwrap();
        f.write(ino, 30, 20, 2).unwrap(); // inside: splits into 3
        assert_eq!(
            f.extents(ino),
            vec![ext(0, 30, 1, 0), ext(30, 20, 2, 0), ext(50, 50, 1, 50)]
        );
        f.write(ino, 90, 20, 3).unwrap(); // over the end: trims the tail, grows the size
        assert_eq!(f.attr(ino).size, 110);
        f.write(ino, 1 << 33, 10, 4).unwrap(); // sparse, past 4 GiB
        assert_eq!(f.attr(ino).size, (1 << 33) + 10);
        // A write covering several extents exactly replaces them.
        f.write(ino, 0, 95, 5).unwrap();
        assert_eq!(
            f.extents(ino),
            vec![ext(0, 95, 5, 0), ext(95, 15, 3, 5), ext(1 << 33, 10, 4, 0)]
        );
        // Range query: only the overlapping extents.
        match f.q(Query::Extents {
            ino,
            from: 100,
            to: 101,
            max: 10,
        }) {
            Ok(Answer::Extents { extents, .. }) => assert_eq!(extents, vec![ext(95, 15, 3, 5)]),
            other => panic!("{other:?}"),
        }
        f.clean();
        // Truncate down through the middle of an extent, then up (a hole).
        f.m(Mutation::SetAttr {
            ino,
            set: SetAttr {
                size: Some(50),
                ..Default::default()
            },
        })
        .unwrap();
        assert_eq!(f.extents(ino), vec![ext(0, 50, 5, 0)]);
        f.m(Mutation::SetAttr {
            ino,
            set: SetAttr {
                size: Some(1000),
                ..Default::default()
            },
        })
        .unwrap();
        assert_eq!(f.attr(ino).size, 1000);
        assert_eq!(f.extents(ino), vec![ext(0, 50, 5, 0)]);
        f.clean();
        // An old GC epoch's claim is refused.
        assert_eq!(
            f.m(Mutation::CommitWrite {
                ino,
                extents: vec![ext(0, 1, 9, 0)],
                size_at_least: 0,
                claim_epoch: 0,
                lease: 0,
            }),
            Err(Errno::AGAIN)
        );
        let refs = f.store.referenced_chunks().unwrap();
        assert_eq!(refs, [ChunkId([5; CHUNK_ID_BYTES])].into_iter().collect());
    }

    /// Create file `d` in the root (for the tests of batches that must not apply).
    fn create_d() -> Mutation {
        Mutation::Create {
            parent: ROOT_INO,
            name: "d".into(),
            kind: FileKind::File,
            perm: 0o644,
            uid: 1,
            gid: 2,
            rdev: 0,
        }
    }

    fn assert_no_d(f: &Fixture) {
        assert!(matches!(
            f.q(Query::Lookup {
                parent: ROOT_INO,
                name: b"d".to_vec(),
            }),
            Err(Errno::NOENT)
        ));
    }

    #[test]
    fn a_command_this_build_cannot_decode_stops_the_batch_and_changes_nothing() {
        let mut f = fixture("undecodable");
        let before = f.store.raft_state().unwrap();
        let cmd = f.cmd(create_d());
        let good = meta::encode(&cmd);
        // What a later build would propose: the same command header, then a mutation
        // variant this build does not have (postcard: the variant index as a varint).
        let mut newer = postcard::to_allocvec(&(
            cmd.volume,
            cmd.client,
            cmd.seq + 1,
            cmd.acked_below,
            cmd.now,
        ))
        .unwrap();
        newer.extend_from_slice(&[0xc8, 0x01]); // variant 200
        assert!(meta::decode::<MetaCommand>(&newer).is_err());
        let r = f.store.apply_batch(&[Some(&good), Some(&newer)], b"after");
        let e = format!(
            "{:#}",
            r.expect_err("an undecodable command must not be answered")
        );
        assert!(e.contains("does not decode with this build"), "{e}");
        // Nothing of the batch is kept: not the good command, not the Raft state.
        assert_eq!(f.store.raft_state().unwrap(), before);
        assert_no_d(&f);
        // The same good command alone applies.
        assert!(matches!(
            f.store.apply_batch(&[Some(&good)], b"after"),
            Ok(r) if r.len() == 1
        ));
    }

    #[test]
    fn the_log_version_only_rises_and_a_version_beyond_this_build_stops_the_apply() {
        let mut f = fixture("log-version");
        assert_eq!(f.store.log_version().unwrap(), PROTOCOL_VERSION_MIN);
        let set = |version| Mutation::SetLogVersion { version };
        assert!(matches!(f.m(set(PROTOCOL_VERSION_MAX)), Ok(Answer::Done)));
        assert_eq!(f.store.log_version().unwrap(), PROTOCOL_VERSION_MAX);
        // A lower version (a retry raced by a later raise) leaves it where it is.
        assert!(matches!(f.m(set(PROTOCOL_VERSION_MIN)), Ok(Answer::Done)));
        assert_eq!(f.store.log_version().unwrap(), PROTOCOL_VERSION_MAX);
        // A version this build does not speak: the batch fails, nothing of it is kept.
        let before = f.store.raft_state().unwrap();
        let mk = f.cmd(create_d());
        let too_new = f.cmd(set(PROTOCOL_VERSION_MAX + 1));
        let (mk, too_new) = (meta::encode(&mk), meta::encode(&too_new));
        let e = f
            .store
            .apply_batch(&[Some(&mk), Some(&too_new)], b"after")
            .expect_err("a log version beyond this build must stop the apply");
        assert!(format!("{e:#}").contains("upgrade this node"), "{e:#}");
        assert_eq!(f.store.raft_state().unwrap(), before);
        assert_eq!(f.store.log_version().unwrap(), PROTOCOL_VERSION_MAX);
        assert_no_d(&f);
        // The version survives a snapshot; a snapshot above this build is refused whole.
        let snap = f.store.export().unwrap();
        let g = fixture("log-version-import");
        g.store.import(&snap, b"raft").unwrap();
        assert_eq!(g.store.log_version().unwrap(), PROTOCOL_VERSION_MAX);
        let mut tables: Snapshot = postcard::from_bytes(&snap).unwrap();
        for (name, rows) in tables.iter_mut() {
            if name == "sys" {
                for (k, v) in rows.iter_mut() {
                    if k.as_slice() == SYS_LOG_VERSION {
                        *v = (PROTOCOL_VERSION_MAX as u64 + 1).to_le_bytes().to_vec();
                    }
                }
            }
        }
        let newer = postcard::to_allocvec(&tables).unwrap();
        let e = g
            .store
            .import(&newer, b"raft2")
            .expect_err("newer snapshot");
        assert!(format!("{e:#}").contains("upgrade this node"), "{e:#}");
        assert_eq!(g.store.raft_state().unwrap(), Some(b"raft".to_vec()));
        g.clean();
        f.clean();
    }

    #[test]
    fn a_commit_with_setattrs_applies_them_after_its_bytes_or_nothing() {
        let mut f = fixture("commit-then-set");
        let ino = f.ino(ROOT_INO, "f", FileKind::File);
        let at = Timespec { sec: 77, nsec: 9 };
        let then = vec![
            SetAttr {
                uid: Some(40),
                gid: Some(41),
                ..Default::default()
            },
            SetAttr {
                perm: Some(0o600),
                ..Default::default()
            },
            SetAttr {
                atime: Some(SetTime::At(at)),
                mtime: Some(SetTime::At(at)),
                ..Default::default()
            },
        ];
        let op = |claim_epoch: u64, then: Vec<SetAttr>| Mutation::CommitWriteThenSet {
            ino,
            extents: vec![ext(0, 10 + claim_epoch as u32 * then.len() as u32, 1, 0)],
            size_at_least: 0,
            claim_epoch,
            lease: 0,
            then,
        };
        // A stale claim refuses the whole: no bytes, no attributes.
        assert_eq!(f.m(op(0, then.clone())), Err(Errno::AGAIN));
        assert_eq!(f.extents(ino), vec![]);
        assert_eq!((f.attr(ino).uid, f.attr(ino).perm), (1, 0o644));
        // Applied: the bytes, then each setattr in order (the mtime set after the commit's).
        let a = match f.m(op(1, then)) {
            Ok(Answer::Attr(a)) => a,
            other => panic!("{other:?}"),
        };
        assert_eq!(a, f.attr(ino));
        assert_eq!(f.extents(ino), vec![ext(0, 13, 1, 0)]);
        assert_eq!((a.size, a.uid, a.gid, a.perm), (13, 40, 41, 0o600));
        assert_eq!((a.atime, a.mtime), (at, at));
        // A size among them is never applied (the request check refuses it too).
        let truncate = SetAttr {
            size: Some(0),
            ..Default::default()
        };
        assert_eq!(f.m(op(1, vec![truncate])), Err(Errno::INVAL));
        assert_eq!(f.extents(ino), vec![ext(0, 13, 1, 0)]);
        f.clean();
    }

    #[test]
    fn fences_refuse_commits_under_older_leases() {
        let mut f = fixture("fences");
        let ino = f.ino(ROOT_INO, "f", FileKind::File);
        let commit = |f: &mut Fixture, lease: u64, tag: u8| {
            f.m(Mutation::CommitWrite {
                ino,
                extents: vec![ext(0, 10, tag, 0)],
                size_at_least: 0,
                claim_epoch: 1,
                lease,
            })
        };
        // No fence yet: any lease (and none) commits.
        commit(&mut f, 7, 1).unwrap();
        assert_eq!(f.m(Mutation::Fence { ino, token: 9 }), Ok(Answer::Done));
        // Below the fence: refused, and nothing changes.
        assert_eq!(commit(&mut f, 8, 2), Err(Errno::STALE));
        assert_eq!(f.extents(ino), vec![ext(0, 10, 1, 0)]);
        // At or above it, or without a lease: accepted.
        commit(&mut f, 9, 3).unwrap();
        commit(&mut f, 0, 4).unwrap();
        // A fence never goes down.
        f.m(Mutation::Fence { ino, token: 3 }).unwrap();
        assert_eq!(commit(&mut f, 8, 5), Err(Errno::STALE));
        // Fencing an inode that does not exist is refused (no record is left behind).
        assert_eq!(
            f.m(Mutation::Fence {
                ino: 999_999,
                token: 1
            }),
            Err(Errno::NOENT)
        );
        f.clean();
    }

    #[test]
    fn mutations_apply_exactly_once() {
        let mut f = fixture("once");
        let c = f.cmd(Mutation::Create {
            parent: ROOT_INO,
            name: b"once".to_vec(),
            kind: FileKind::File,
            perm: 0o600,
            uid: 0,
            gid: 0,
            rdev: 0,
        });
        let first = f.apply(&c);
        let again = f.apply(&c);
        assert!(first.is_ok());
        assert_eq!(first, again, "a retry gets the first answer");
        assert_eq!(f.names(ROOT_INO), vec!["once"]);
        assert_eq!(f.attr(ROOT_INO).nlink, 2);
        // A failing mutation's retry gets the same error, not a new attempt.
        f.hold = Some(f.seq + 1);
        let u = f.cmd(Mutation::Unlink {
            parent: ROOT_INO,
            name: b"missing".to_vec(),
        });
        assert_eq!(f.apply(&u), Err(Errno::NOENT));
        f.create(ROOT_INO, "missing", FileKind::File).unwrap();
        assert_eq!(f.apply(&u), Err(Errno::NOENT), "replayed, not re-run");
        f.hold = None;
        // Once the client says it has the answers, an old seq is stale.
        let next = f.cmd(Mutation::AdvanceGcEpoch);
        f.apply(&next).unwrap();
        assert_eq!(f.apply(&c), Err(Errno::STALE));
        f.clean();
    }

    #[test]
    fn readdir_pages_with_stable_cookies() {
        let mut f = fixture("readdir");
        let d = f.ino(ROOT_INO, "d", FileKind::Dir);
        for i in 0..250 {
            f.ino(d, &format!("f{i:03}"), FileKind::File);
        }
        let mut seen = Vec::new();
        let mut after = 0;
        let mut pages = 0;
        loop {
            let Ok(Answer::Dir { entries, end }) = f.q(Query::ReadDir {
                ino: d,
                after,
                max: 64,
            }) else {
                panic!("readdir");
            };
            pages += 1;
            if pages == 2 {
                // Changes during the listing: a removed entry vanishes, a new one comes last.
                f.m(Mutation::Unlink {
                    parent: d,
                    name: b"f200".to_vec(),
                })
                .unwrap();
                f.ino(d, "new", FileKind::File);
            }
            for e in &entries {
                assert!(e.cookie > after);
                after = e.cookie;
                seen.push(String::from_utf8(e.name.clone()).unwrap());
            }
            if end {
                break;
            }
        }
        assert_eq!(seen.len(), 250, "249 old names and the new one");
        assert!(!seen.contains(&"f200".to_string()));
        assert_eq!(seen.last().unwrap(), "new");
        f.clean();
    }

    #[test]
    fn xattrs_modes() {
        let mut f = fixture("xattr");
        let ino = f.ino(ROOT_INO, "f", FileKind::File);
        let set = |name: &str, v: &str, mode| Mutation::SetXattr {
            ino,
            name: name.into(),
            value: v.into(),
            mode,
        };
        assert_eq!(
            f.m(set("user.a", "1", XattrMode::Replace)),
            Err(Errno::NODATA)
        );
        f.m(set("user.a", "1", XattrMode::Create)).unwrap();
        assert_eq!(
            f.m(set("user.a", "2", XattrMode::Create)),
            Err(Errno::EXIST)
        );
        f.m(set("user.a", "3", XattrMode::Replace)).unwrap();
        f.m(set("trusted.b", "", XattrMode::Any)).unwrap();
        assert_eq!(
            f.q(Query::GetXattr {
                ino,
                name: b"user.a".to_vec()
            }),
            Ok(Answer::Xattr(b"3".to_vec()))
        );
        let Ok(Answer::XattrNames(mut names)) = f.q(Query::ListXattr { ino }) else {
            panic!("listxattr");
        };
        names.sort();
        assert_eq!(names, vec![b"trusted.b".to_vec(), b"user.a".to_vec()]);
        f.m(Mutation::RemoveXattr {
            ino,
            name: b"user.a".to_vec(),
        })
        .unwrap();
        assert_eq!(
            f.q(Query::GetXattr {
                ino,
                name: b"user.a".to_vec()
            }),
            Err(Errno::NODATA)
        );
        f.clean();
    }

    /// `ReadDirPlus` pages like `ReadDir` and carries what `GetAttr` and `ListXattr` answer
    /// for each entry, except names past the byte limit (then `None`); removed xattrs and
    /// entries are not listed.
    #[test]
    fn readdirplus_is_readdir_with_attrs_and_xattr_names() {
        let mut f = fixture("readdirplus");
        let mut inos = Vec::new();
        for i in 0..7 {
            inos.push(f.ino(ROOT_INO, &format!("f{i}"), FileKind::File));
        }
        let d = f.ino(ROOT_INO, "sub", FileKind::Dir);
        let set = |ino, name: String| Mutation::SetXattr {
            ino,
            name: name.into_bytes(),
            value: b"v".to_vec(),
            mode: XattrMode::Any,
        };
        f.m(set(inos[1], "user.a".into())).unwrap();
        f.m(set(inos[1], "user.b".into())).unwrap();
        f.m(Mutation::RemoveXattr {
            ino: inos[1],
            name: b"user.a".to_vec(),
        })
        .unwrap();
        // More names than one entry may carry.
        for n in 0..20 {
            f.m(set(inos[2], format!("user.{n:0>240}"))).unwrap();
        }
        f.m(Mutation::Unlink {
            parent: ROOT_INO,
            name: b"f3".to_vec(),
        })
        .unwrap();
        let (mut plain, mut plus, mut after) = (Vec::new(), Vec::new(), 0);
        loop {
            let Ok(Answer::DirPlus { entries, end }) = f.q(Query::ReadDirPlus {
                ino: ROOT_INO,
                after,
                max: 3,
            }) else {
                panic!("readdirplus");
            };
            assert!(entries.len() <= 3);
            let Ok(Answer::Dir { entries: e2, .. }) = f.q(Query::ReadDir {
                ino: ROOT_INO,
                after,
                max: 3,
            }) else {
                panic!("readdir");
            };
            plain.extend(e2);
            after = entries.last().map_or(after, |e| e.entry.cookie);
            plus.extend(entries);
            if end {
                break;
            }
        }
        assert_eq!(
            plus.iter().map(|e| e.entry.clone()).collect::<Vec<_>>(),
            plain
        );
        assert_eq!(plus.len(), 7, "f0..f6 less f3, and sub");
        for e in &plus {
            assert_eq!(
                f.q(Query::GetAttr { ino: e.entry.ino }),
                Ok(Answer::Attr(e.attr.clone())),
                "{:?}",
                e.entry.name
            );
            let Ok(Answer::XattrNames(names)) = f.q(Query::ListXattr { ino: e.entry.ino }) else {
                panic!("listxattr");
            };
            if e.entry.ino == inos[2] {
                assert_eq!(e.xattr_names, None, "20 names of 246 bytes are too many");
                assert_eq!(names.len(), 20);
            } else {
                assert_eq!(e.xattr_names.as_ref(), Some(&names));
            }
        }
        let one = plus.iter().find(|e| e.entry.ino == inos[1]).unwrap();
        assert_eq!(one.xattr_names, Some(vec![b"user.b".to_vec()]));
        assert!(plus
            .iter()
            .any(|e| e.entry.ino == d && e.attr.kind == FileKind::Dir));
        assert_eq!(
            f.q(Query::ReadDirPlus {
                ino: inos[0],
                after: 0,
                max: 3
            }),
            Err(Errno::NOTDIR)
        );
        f.clean();
    }

    /// Random operations on a small tree; the invariants hold after every one, and a
    /// snapshot export/import reproduces the state exactly.
    #[test]
    fn random_operations_keep_the_invariants() {
        for seed in 0..4u64 {
            let mut f = fixture(&format!("random{seed}"));
            let mut rng = SplitMix64::new(seed);
            let names = ["a", "b", "c", "d"];
            let mut dirs = vec![ROOT_INO];
            let mut files: Vec<u64> = Vec::new();
            for step in 0..600 {
                let p = dirs[rng.below(dirs.len() as u64) as usize];
                let n = names[rng.below(4) as usize];
                let p2 = dirs[rng.below(dirs.len() as u64) as usize];
                let n2 = names[rng.below(4) as usize];
                let r = match rng.below(10) {
                    0 | 1 => f.create(p, n, FileKind::File),
                    2 => f.create(p, n, FileKind::Dir),
                    3 => f.m(Mutation::Unlink {
                        parent: p,
                        name: n.into(),
                    }),
                    4 => f.m(Mutation::Rmdir {
                        parent: p,
                        name: n.into(),
                    }),
                    5 | 6 => {
                        let mode = [
                            RenameMode::Replace,
                            RenameMode::NoReplace,
                            RenameMode::Exchange,
                        ][rng.below(3) as usize];
                        f.rename(p, n, p2, n2, mode)
                    }
                    7 if !files.is_empty() => {
                        let ino = files[rng.below(files.len() as u64) as usize];
                        f.m(Mutation::Link {
                            ino,
                            parent: p,
                            name: n.into(),
                        })
                    }
                    8 if !files.is_empty() => {
                        let ino = files[rng.below(files.len() as u64) as usize];
                        let off = rng.below(1 << 20);
                        f.write(
                            ino,
                            off,
                            1 + rng.below(1 << 16) as u32,
                            rng.below(255) as u8,
                        )
                    }
                    _ if !files.is_empty() => {
                        let ino = files[rng.below(files.len() as u64) as usize];
                        f.m(Mutation::SetAttr {
                            ino,
                            set: SetAttr {
                                size: Some(rng.below(1 << 20)),
                                ..Default::default()
                            },
                        })
                    }
                    _ => Ok(Answer::Done),
                };
                if let Ok(Answer::Attr(a)) = &r {
                    match a.kind {
                        FileKind::Dir if !dirs.contains(&a.ino) => dirs.push(a.ino),
                        FileKind::File if !files.contains(&a.ino) => files.push(a.ino),
                        _ => {}
                    }
                }
                // Forget what is gone; reclaim orphans (no open handles here).
                let mut live_dirs = Vec::new();
                for &d in &dirs {
                    match f.q(Query::GetAttr { ino: d }) {
                        Ok(Answer::Attr(a)) if a.nlink == 0 => {
                            f.m(Mutation::Reclaim { ino: d }).unwrap();
                        }
                        Ok(_) => live_dirs.push(d),
                        Err(_) => {}
                    }
                }
                dirs = live_dirs;
                let mut live = Vec::new();
                for &ino in &files {
                    match f.q(Query::GetAttr { ino }) {
                        Ok(Answer::Attr(a)) if a.nlink == 0 => {
                            f.m(Mutation::Reclaim { ino }).unwrap();
                        }
                        Ok(_) => live.push(ino),
                        Err(_) => {}
                    }
                }
                files = live;
                let bad = f.store.check().unwrap();
                assert!(bad.is_empty(), "seed {seed} step {step}: {bad:#?}");
            }
            // Snapshot round trip.
            let snap = f.store.export().unwrap();
            let g = fixture(&format!("import{seed}"));
            g.store.import(&snap, b"rs").unwrap();
            assert_eq!(g.store.raft_state().unwrap(), Some(b"rs".to_vec()));
            assert!(g.store.check().unwrap().is_empty());
            for ino in &files {
                assert_eq!(
                    g.store.query(f.vol, &Query::GetAttr { ino: *ino }).unwrap(),
                    f.q(Query::GetAttr { ino: *ino })
                );
            }
        }
    }
}
