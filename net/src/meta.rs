//! Metadata messages: the namespace operations a client asks of the hive's metadata
//! service, and their answers.
//!
//! They travel as postcard-encoded bodies inside frames with opcode `Meta` / `MetaReply`
//! ([`crate::proto::Opcode`]); decoding is bounded by the frame body (at most
//! [`crate::frame::MAX_BODY_BYTES`]) and every name, value and list is checked against the
//! limits below by [`MetaRequest::validate`] before a node acts on it.
//!
//! A mutation ([`MetaCommand`]) is what goes into the metadata Raft log. It carries the
//! caller's `(client, seq)` and `acked_below` (every seq under it has its answer), so a
//! retried or replayed mutation applies exactly once and is answered with the answer it got
//! the first time. Time comes in the command (`now`, stamped by the leader when it proposes),
//! so applying a log is deterministic on every replica.
//!
//! Errors are Linux errno values ([`Errno`]): what a local filesystem would return, so the
//! FUSE client hands them to the kernel unchanged.

use crate::chunk::{ChunkId, CHUNK_ID_BYTES};
use crate::placement::{HiveMap, MapNode, NodeState};
use serde::{Deserialize, Serialize};

/// Inode number of every volume's root directory.
pub const ROOT_INO: u64 = 1;
/// Longest name in a directory (bytes), as on ext4.
pub const MAX_NAME_BYTES: usize = 255;
/// Longest symlink target (bytes), PATH_MAX less the NUL.
pub const MAX_SYMLINK_BYTES: usize = 4095;
/// Longest xattr name (bytes) and value (bytes), as Linux's VFS allows.
pub const MAX_XATTR_NAME_BYTES: usize = 255;
pub const MAX_XATTR_VALUE_BYTES: usize = 64 * 1024;
/// Most extents one commit-write carries.
pub const MAX_COMMIT_EXTENTS: usize = 8192;
/// Most setattrs one [`Mutation::CommitWriteThenSet`] carries.
pub const MAX_COMMIT_SETS: usize = 16;
/// Most entries one readdir answer carries.
pub const MAX_READDIR_ENTRIES: u32 = 4096;
/// Most entries one `ReadDirPlus` answer carries (each with its attributes and up to
/// [`MAX_PLUS_XATTR_NAMES_BYTES`] of xattr names: at most ~1.2 MiB).
pub const MAX_READDIRPLUS_ENTRIES: u32 = 256;
/// A `ReadDirPlus` entry carries its inode's xattr names only if they take at most this
/// many bytes (each name counted with one more byte); else `None`.
pub const MAX_PLUS_XATTR_NAMES_BYTES: usize = 4096;
/// Most extents one extent query answers (a client pages through larger files).
pub const MAX_EXTENTS_ANSWER: u32 = 16384;
/// Largest file offset + 1 (as ext4: 16 TiB with 4 KiB blocks; well within i64).
pub const MAX_FILE_BYTES: u64 = 16 << 40;
/// Longest volume name.
pub const MAX_VOLUME_NAME_BYTES: usize = 64;

/// A Linux errno value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Errno(pub i32);

impl Errno {
    pub const PERM: Errno = Errno(libc::EPERM);
    pub const NOENT: Errno = Errno(libc::ENOENT);
    pub const ACCES: Errno = Errno(libc::EACCES);
    pub const EXIST: Errno = Errno(libc::EEXIST);
    pub const XDEV: Errno = Errno(libc::EXDEV);
    pub const NOTDIR: Errno = Errno(libc::ENOTDIR);
    pub const ISDIR: Errno = Errno(libc::EISDIR);
    pub const INVAL: Errno = Errno(libc::EINVAL);
    pub const FBIG: Errno = Errno(libc::EFBIG);
    pub const NOSPC: Errno = Errno(libc::ENOSPC);
    pub const MLINK: Errno = Errno(libc::EMLINK);
    pub const RANGE: Errno = Errno(libc::ERANGE);
    pub const NAMETOOLONG: Errno = Errno(libc::ENAMETOOLONG);
    pub const NOTEMPTY: Errno = Errno(libc::ENOTEMPTY);
    pub const NODATA: Errno = Errno(libc::ENODATA);
    pub const STALE: Errno = Errno(libc::ESTALE);
    pub const AGAIN: Errno = Errno(libc::EAGAIN);
    pub const IO: Errno = Errno(libc::EIO);
    pub const NOTSUP: Errno = Errno(libc::EOPNOTSUPP);
    pub const E2BIG: Errno = Errno(libc::E2BIG);
    pub const NOLCK: Errno = Errno(libc::ENOLCK);
    /// Never sent by the hive: a client's own answer when no member could be reached.
    pub const HOSTDOWN: Errno = Errno(libc::EHOSTDOWN);
}

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let msg = std::io::Error::from_raw_os_error(self.0);
        write!(f, "errno {}: {msg}", self.0)
    }
}

/// Seconds and nanoseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Timespec {
    pub sec: i64,
    pub nsec: u32,
}

impl Timespec {
    /// The system clock now (only the proposer reads a clock; see the module docs).
    pub fn now() -> Timespec {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Timespec {
            sec: d.as_secs() as i64,
            nsec: d.subsec_nanos(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

/// A file's attributes. `perm` holds the permission bits and setuid/setgid/sticky (07777).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attr {
    pub ino: u64,
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
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SetTime {
    Now,
    At(Timespec),
}

/// The attributes a setattr changes (`None`: unchanged). ctime is always set to now.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetAttr {
    pub perm: Option<u16>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
}

/// File bytes `[offset, offset + len)` are bytes `[chunk_offset, chunk_offset + len)` of the
/// chunk's plaintext. Extents may reference part of a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    pub offset: u64,
    pub len: u32,
    #[serde(with = "chunk_id_serde")]
    pub chunk: ChunkId,
    pub chunk_offset: u32,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.offset + self.len as u64
    }
}

/// Serde for a [`ChunkId`] as 33 bytes (serde derives arrays only up to 32).
pub mod chunk_id_serde {
    use super::{ChunkId, CHUNK_ID_BYTES};
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(id: &ChunkId, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&id.0)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ChunkId, D::Error> {
        let b: &[u8] = Deserialize::deserialize(d)?;
        let a: [u8; CHUNK_ID_BYTES] = b
            .try_into()
            .map_err(|_| D::Error::invalid_length(b.len(), &"a 33-byte chunk id"))?;
        Ok(ChunkId(a))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub ino: u64,
    pub kind: FileKind,
    /// Resume a readdir after this entry with `ReadDir { after: cookie }`. Cookies of a
    /// directory only grow: entries added during a listing come after every older one.
    pub cookie: u64,
}

/// A directory entry as `ReadDirPlus` answers it: with its inode's attributes, and its
/// xattr names when they are few (`None`: more than [`MAX_PLUS_XATTR_NAMES_BYTES`]; ask
/// `ListXattr`). What `ls -l`, `find` or `cp -a` would otherwise ask per entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntryPlus {
    pub entry: DirEntry,
    pub attr: Attr,
    pub xattr_names: Option<Vec<Vec<u8>>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RenameMode {
    /// Replace an existing target (plain rename(2)).
    Replace,
    /// RENAME_NOREPLACE: fail with EEXIST if the target exists.
    NoReplace,
    /// RENAME_EXCHANGE: swap source and target atomically; both must exist.
    Exchange,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum XattrMode {
    Any,
    /// XATTR_CREATE: fail with EEXIST if it exists.
    Create,
    /// XATTR_REPLACE: fail with ENODATA if it does not.
    Replace,
}

/// A namespace change (what the metadata log holds, inside a [`MetaCommand`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mutation {
    CreateVolume {
        name: String,
        /// 1 to `proto::MAX_LEVEL`; 0 asks for the hive's default (the leader writes the
        /// number into the log).
        copies: u8,
    },
    /// create(2)/mknod(2)/mkdir(2): a new inode of `kind` under `parent`.
    Create {
        parent: u64,
        name: Vec<u8>,
        kind: FileKind,
        perm: u16,
        uid: u32,
        gid: u32,
        rdev: u32,
    },
    Symlink {
        parent: u64,
        name: Vec<u8>,
        target: Vec<u8>,
        uid: u32,
        gid: u32,
    },
    Link {
        ino: u64,
        parent: u64,
        name: Vec<u8>,
    },
    Unlink {
        parent: u64,
        name: Vec<u8>,
    },
    Rmdir {
        parent: u64,
        name: Vec<u8>,
    },
    Rename {
        parent: u64,
        name: Vec<u8>,
        new_parent: u64,
        new_name: Vec<u8>,
        mode: RenameMode,
    },
    SetAttr {
        ino: u64,
        set: SetAttr,
    },
    SetXattr {
        ino: u64,
        name: Vec<u8>,
        value: Vec<u8>,
        mode: XattrMode,
    },
    RemoveXattr {
        ino: u64,
        name: Vec<u8>,
    },
    /// New extents for exactly the written ranges (old extents are split around them), the
    /// size raised to at least `size_at_least`, mtime and ctime set to now. The chunks were
    /// claimed in GC epoch `claim_epoch`; only the current epoch is accepted (EAGAIN: claim
    /// again).
    ///
    /// `lease`: the write lease the committing client holds on `ino` ([`LockOp::Lease`]),
    /// 0 for none. A lease is checked twice: the leader refuses (`STALE`) a commit whose
    /// lease it does not hold live for this client, and the state machine refuses one
    /// whose token is below the inode's fence ([`Mutation::Fence`]).
    CommitWrite {
        ino: u64,
        extents: Vec<Extent>,
        size_at_least: u64,
        claim_epoch: u64,
        lease: u64,
    },
    /// Raise `ino`'s fence to `token` (never lowers it): from now on a commit carrying a
    /// lease token below it is refused. The leader writes it before it hands a file whose
    /// write lease expired (or was revoked) to anyone else.
    Fence {
        ino: u64,
        token: u64,
    },
    /// Drop an inode that no name references any more (nlink 0) once its last user is done
    /// with it; its extents become garbage. Refused (EBUSY-like EINVAL) while linked.
    Reclaim {
        ino: u64,
    },
    /// Start a new GC epoch (the GC coordinator's, before its mark).
    AdvanceGcEpoch,
    /// Rotate the hive CA (admin, `hive ca rotate`): every node installs the new CA and
    /// a new node certificate from it, presented with the cross certificate and the
    /// previous CA, so clients pinning either CA keep connecting. Refused (`STALE`)
    /// unless `rotation.previous_cert_pem` is the hive's current CA.
    RotateCa(CaRotation),
    /// Start a new lease epoch (a leader, before it grants its first write lease: its
    /// fencing tokens carry the epoch, so they are above every earlier leader's and every
    /// earlier boot's). Answer: [`Answer::LeaseEpoch`].
    NewLeaseEpoch,
    /// Record a node joining the hive in the cluster map (group 0): it gets the next node
    /// id (never reused) and the map a new epoch. Answered [`Answer::Node`]. A node already
    /// recorded under the same name and address gets its id again (a join retried after a
    /// lost answer is not a second node).
    AddNode(NodeSpec),
    /// Set a node's state in the cluster map (the leader's failure detector: up, down,
    /// out; an operator: draining). A new map epoch if it changed. Answered `Done`.
    SetNodeState {
        id: u64,
        state: NodeState,
    },
    /// Record an access token (group 0): only the SHA-256 of its secret is stored.
    /// `EXIST` if that hash is recorded already. Answered `Done`.
    CreateToken {
        sha256: [u8; 32],
        scope: TokenScope,
        /// Wall-clock expiry in ms since the Unix epoch; 0 = never.
        expires_ms: u64,
        label: String,
        created_ms: u64,
    },
    /// Revoke the token whose id (hex prefix of its hash, at least 8 digits) is `id`:
    /// `NOENT` if none, `INVAL` if several match. Answered `Done`.
    RevokeToken {
        id: String,
    },
    /// A [`Mutation::CommitWrite`] and then, in the same log entry, setattrs made after the
    /// written bytes (none changes the size; each `SetTime::Now` was fixed by the client
    /// when it was made): a mount sends a file's bytes with the chown, chmod and utimens
    /// made while it held them, so an untar costs one entry per file written, not four.
    /// The commit is checked as a commit-write and refuses the whole; the setattrs then
    /// apply in order. Answered with the attributes after the last.
    CommitWriteThenSet {
        ino: u64,
        extents: Vec<Extent>,
        size_at_least: u64,
        claim_epoch: u64,
        lease: u64,
        /// At most [`MAX_COMMIT_SETS`].
        then: Vec<SetAttr>,
    },
    /// Raise the hive's metadata log version to `version` (never lowers it): from then on
    /// the log may carry commands of that version, and only nodes that speak it may join.
    /// The leader proposes it once every member speaks it (the hive's own; no client may).
    SetLogVersion {
        version: u16,
    },
}

/// What a token may do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TokenScope {
    /// Everything, the hive's own operations included (gc, fsck, joins, tokens, nodes).
    Admin,
    /// A client host: any volume, no hive operations.
    Host,
    /// One volume; `read_only`: queries only.
    Volume { name: String, read_only: bool },
}

/// A recorded token, as `hive token list` shows it (never its secret).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    /// Hex of the first 8 bytes of the secret's SHA-256.
    pub id: String,
    pub sha256: [u8; 32],
    pub scope: TokenScope,
    pub expires_ms: u64,
    pub revoked: bool,
    pub label: String,
    pub created_ms: u64,
}

/// A node of the cluster map as the metadata service answers it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEntry {
    pub id: u64,
    pub spec: NodeSpec,
    pub state: NodeState,
}

/// The placement map of a cluster map (`bucket_count` is the hive's, fixed at init).
pub fn hive_map(map_epoch: u64, bucket_count: u32, nodes: &[NodeEntry]) -> HiveMap {
    HiveMap {
        epoch: map_epoch,
        bucket_count,
        nodes: nodes
            .iter()
            .map(|n| MapNode {
                id: n.id,
                name: n.spec.name.clone(),
                host: n.spec.host.clone(),
                meta_port: n.spec.meta_port,
                base_port: n.spec.base_port,
                shards: n.spec.shards,
                weight: n.spec.weight,
                zone: n.spec.zone.clone(),
                state: n.state,
            })
            .collect(),
    }
}

/// Longest node name and failure-zone name.
pub const MAX_NODE_NAME_BYTES: usize = 64;
/// Longest host name or address of a node.
pub const MAX_HOST_BYTES: usize = 255;
/// Longest PEM text (a certificate or a key) a join grant carries.
pub const MAX_PEM_BYTES: usize = 16 * 1024;

/// A hive node as the cluster map (group 0) records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSpec {
    /// Unique, `[A-Za-z0-9._-]`, 1..=64 bytes.
    pub name: String,
    /// Where the other nodes and clients reach it (an IP literal or a host name).
    pub host: String,
    pub meta_port: u16,
    /// Shard `i` listens on `base_port + i`.
    pub base_port: u16,
    pub shards: u16,
    /// Failure zone (replicas go to distinct zones first); 1..=64 bytes like a name.
    pub zone: String,
    /// Relative share of new data (0: none).
    pub weight: u32,
}

impl NodeSpec {
    pub fn validate(&self) -> Result<(), Errno> {
        let word = |s: &str| {
            !s.is_empty()
                && s.len() <= MAX_NODE_NAME_BYTES
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        };
        if !word(&self.name) || !word(&self.zone) {
            return Err(Errno::INVAL);
        }
        if self.host.is_empty()
            || self.host.len() > MAX_HOST_BYTES
            || !self
                .host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:[]".contains(&b))
        {
            return Err(Errno::INVAL);
        }
        if self.shards == 0 || self.meta_port == 0 || self.base_port == 0 {
            return Err(Errno::INVAL);
        }
        Ok(())
    }

    /// `host:meta_port` (brackets around an IPv6 literal).
    pub fn meta_addr(&self) -> String {
        Self::addr_of(&self.host, self.meta_port)
    }

    /// `host:port` (brackets around an IPv6 literal).
    pub fn addr_of(host: &str, port: u16) -> String {
        if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        }
    }
}

/// Which openraft RPC a [`PeerRequest::Raft`] carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RaftRpc {
    AppendEntries,
    Vote,
    InstallSnapshot,
}

/// What hive nodes ask each other on the metadata port (and what a joining node asks).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerRequest {
    /// An openraft RPC between members; `body` is the postcard-encoded openraft request
    /// (the engine's business; bounded by the frame). Only on a connection whose TLS
    /// client presented a node certificate of this hive. Answered [`Answer::Raft`].
    Raft { rpc: RaftRpc, body: Vec<u8> },
    /// A new node asks to join (admin token): recorded in the cluster map, answered
    /// [`Answer::Joined`] with its id and what it needs to serve (the CA, the dedupe key).
    Join(NodeSpec),
    /// A joined node, now serving, asks to become a member: a learner that catches up,
    /// then a voter while the hive has fewer than [`MAX_VOTERS`]. Answered
    /// [`Answer::Admitted`].
    Admit { id: u64 },
    /// Are you there? (the leader's failure detector, on a node link). Answered `Done`.
    Ping,
}

/// Most voting members of the metadata Raft group; further nodes are learners.
pub const MAX_VOTERS: usize = 5;

/// A hive CA rotation as the cluster map keeps it (group 0): the new CA (certificate and
/// key: every node issues its own certificate from it), the cross certificate (the new
/// CA signed by the previous one) and the previous CA.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaRotation {
    pub ca_cert_pem: String,
    pub ca_key_pem: String,
    pub cross_cert_pem: String,
    pub previous_cert_pem: String,
}

impl CaRotation {
    pub fn validate(&self) -> Result<(), Errno> {
        let fields = [
            &self.ca_cert_pem,
            &self.ca_key_pem,
            &self.cross_cert_pem,
            &self.previous_cert_pem,
        ];
        if fields
            .iter()
            .any(|f| f.is_empty() || f.len() > MAX_PEM_BYTES)
        {
            return Err(Errno::INVAL);
        }
        Ok(())
    }
}

/// What a node joining the hive gets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinGrant {
    /// Its node id (also its Raft id).
    pub id: u64,
    pub map_epoch: u64,
    /// The hive CA (certificate and key: every node can issue node certificates, so that
    /// any of them can lead).
    pub ca_cert_pem: String,
    pub ca_key_pem: String,
    /// The hive's dedupe key (hex) and bucket count: the same on every node.
    pub dedupe_key: String,
    pub bucket_count: u32,
    /// The hive's copies per chunk and copies before a put is acknowledged.
    pub copies: u8,
    pub min_copies: u8,
}

impl JoinGrant {
    pub fn validate(&self) -> Result<(), Errno> {
        if self.id == 0
            || self.ca_cert_pem.len() > MAX_PEM_BYTES
            || self.ca_key_pem.len() > MAX_PEM_BYTES
            || self.dedupe_key.len() != 64
            || !self.bucket_count.is_power_of_two()
            || self.copies == 0
            || !(1..=self.copies).contains(&self.min_copies)
        {
            return Err(Errno::INVAL);
        }
        Ok(())
    }
}

impl Mutation {
    /// The inodes whose attributes this mutation changes, as the request alone says (an
    /// unlink's or a rename's victim is known only from the answer). Shared by the hive's
    /// invalidations (`watch.rs`) and a mount's own hints (`hi_command/src/hints.rs`).
    pub fn changed_inodes(&self) -> Vec<u64> {
        match self {
            Mutation::Create { parent, .. }
            | Mutation::Symlink { parent, .. }
            | Mutation::Unlink { parent, .. }
            | Mutation::Rmdir { parent, .. } => vec![*parent],
            Mutation::Link { ino, parent, .. } => vec![*ino, *parent],
            Mutation::Rename {
                parent, new_parent, ..
            } if parent == new_parent => vec![*parent],
            Mutation::Rename {
                parent, new_parent, ..
            } => vec![*parent, *new_parent],
            Mutation::SetAttr { ino, .. }
            | Mutation::CommitWrite { ino, .. }
            | Mutation::CommitWriteThenSet { ino, .. }
            | Mutation::SetXattr { ino, .. }
            | Mutation::RemoveXattr { ino, .. }
            | Mutation::Reclaim { ino } => vec![*ino],
            Mutation::Fence { .. } => Vec::new(),
            Mutation::CreateVolume { .. }
            | Mutation::AdvanceGcEpoch
            | Mutation::NewLeaseEpoch
            | Mutation::RotateCa(_)
            | Mutation::AddNode(_)
            | Mutation::SetNodeState { .. }
            | Mutation::CreateToken { .. }
            | Mutation::RevokeToken { .. }
            | Mutation::SetLogVersion { .. } => Vec::new(),
        }
    }

    /// The metadata log version a hive must be at before this command may enter its log
    /// (a node of an older build cannot decode it: see `engine/src/meta/version.rs`).
    /// `SetLogVersion` is the leader's own, proposed only once every member speaks it.
    pub fn log_version(&self) -> u16 {
        match self {
            Mutation::CommitWriteThenSet { .. } => 3,
            _ => crate::frame::PROTOCOL_VERSION_MIN,
        }
    }

    /// The directory this mutation adds a name to or removes one from (not a rename: it
    /// may touch two).
    pub fn dir(&self) -> Option<u64> {
        match self {
            Mutation::Create { parent, .. }
            | Mutation::Symlink { parent, .. }
            | Mutation::Link { parent, .. }
            | Mutation::Unlink { parent, .. }
            | Mutation::Rmdir { parent, .. } => Some(*parent),
            _ => None,
        }
    }
}

/// A mutation as proposed to the log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaCommand {
    /// Volume id (ignored by volume-level and hive-level mutations).
    pub volume: u32,
    pub client: u64,
    /// This client's sequence number for the mutation (starts at 1).
    pub seq: u64,
    /// Every seq of this client below it has been answered and will not be retried.
    pub acked_below: u64,
    /// The leader's clock when it proposed.
    pub now: Timespec,
    pub op: Mutation,
}

/// A read of the namespace (answered by the leader after a read barrier: linearizable).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Query {
    Volume {
        name: String,
    },
    Volumes,
    Lookup {
        parent: u64,
        name: Vec<u8>,
    },
    GetAttr {
        ino: u64,
    },
    /// Entries with cookie > `after` (0: from the start; `.` and `..` are the client's).
    ReadDir {
        ino: u64,
        after: u64,
        max: u32,
    },
    ReadLink {
        ino: u64,
    },
    GetXattr {
        ino: u64,
        name: Vec<u8>,
    },
    ListXattr {
        ino: u64,
    },
    /// Extents overlapping `[from, to)`, at most `max`.
    Extents {
        ino: u64,
        from: u64,
        to: u64,
        max: u32,
    },
    /// What an open of `ino` by `client` reads: as `Extents` from offset 0, but first the
    /// leader recalls every other client's write lease on `ino` ([`LockOp::Lease`]), so
    /// the open sees what they wrote and had not committed yet. `AGAIN` while a recalled
    /// holder has not given its lease back (the client asks again; a holder that does not
    /// answer loses the lease one lease time after the recall).
    Open {
        ino: u64,
        client: u64,
        max: u32,
    },
    StatFs,
    GcEpoch,
    /// Check the whole hive (admin): the namespace invariants, and that every referenced
    /// chunk is stored; with `verify`, also read each back and check it against its id.
    Fsck {
        verify: bool,
    },
    /// Run one garbage collection (admin): new GC epoch, mark, sweep (see `hive gc`).
    Gc,
    /// The cluster map's nodes (group 0). Answered [`Answer::Nodes`].
    Nodes,
    /// The metadata cluster as the asked node sees it now (any node answers, leader or
    /// not, without a read barrier). Answered [`Answer::Members`].
    Members,
    /// Every recorded token (admin). Answered [`Answer::Tokens`].
    Tokens,
    /// As `ReadDir`, each entry with its attributes and xattr names
    /// ([`Answer::DirPlus`]; `max` at most [`MAX_READDIRPLUS_ENTRIES`]).
    ReadDirPlus {
        ino: u64,
        after: u64,
        max: u32,
    },
    /// The hive's metadata log version ([`Mutation::SetLogVersion`]; group 0). Answered
    /// [`Answer::LogVersion`]. Needs protocol version 3.
    LogVersion,
}

/// A member of the metadata Raft group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: u64,
    /// Its metadata port, `host:port`.
    pub addr: String,
    pub voter: bool,
}

/// What a client sends to the metadata service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaRequest {
    /// `now` in the command is ignored: the leader stamps its own.
    Mutate(MetaCommand),
    Query {
        volume: u32,
        query: Query,
    },
    /// A file-lock operation (volatile leader state, not through Raft; see [`LockOp`]).
    Lock(LockRequest),
    /// Turn this connection into a stream of [`WatchEvent`]s for `volume`: what other
    /// clients' mutations invalidate (`client`'s own are left out: its caches learn them
    /// from the answers). Answered `Done` (or an errno) like any request, then every later
    /// frame on the connection is a `MetaReply` frame with that request id whose body is a
    /// [`WatchEvent`] (decode with [`decode_watch_event`]); the client sends nothing more.
    Watch {
        volume: u32,
        client: u64,
    },
    /// As `Mutate`; and where the mutation adds or removes a name in a directory
    /// ([`Mutation::dir`]), an `Ok` answer comes as [`Answer::InDir`], with that directory's
    /// attributes as read right after the mutation applied: the kernel asks for them next
    /// (it drops its copy after every change to a directory), and the client can answer
    /// from this instead of another round trip.
    MutateInDir(MetaCommand),
    /// Between hive nodes, and from a node joining: see [`PeerRequest`].
    Peer(PeerRequest),
    /// A query that may be answered from the asked node's own copy of the namespace when
    /// no linearizable read is possible (no quorum, no leader): answered
    /// [`Answer::Stale`] saying how stale, or an errno (`AGAIN`) when the copy is older
    /// than `max_stale_ms`. Reads of existing files go on while the majority is gone.
    StaleQuery {
        volume: u32,
        query: Query,
        max_stale_ms: u64,
    },
}

/// Most items (entries plus inodes) one [`Invalidation`] carries.
pub const MAX_WATCH_BATCH: usize = 4096;
/// How often the hive sends [`WatchEvent::Heartbeat`] on a watch stream with nothing else
/// to send.
pub const WATCH_HEARTBEAT_MS: u64 = 1_000;
/// A watcher that has received nothing (not even a heartbeat) for this long takes the
/// stream for dead and reconnects (events in between are lost: as an overflow).
pub const WATCH_DEAD_MS: u64 = 5_000;

/// What a batch of other clients' mutations made stale: directory entries (a name under a
/// parent inode: it may now point elsewhere, or nowhere, or exist where a lookup found
/// nothing) and inodes (attributes, and for files the cached bytes).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invalidation {
    #[serde(deserialize_with = "de_bounded::<_, _, MAX_WATCH_BATCH>")]
    pub entries: Vec<(u64, Vec<u8>)>,
    #[serde(deserialize_with = "de_bounded::<_, _, MAX_WATCH_BATCH>")]
    pub inodes: Vec<u64>,
}

impl Invalidation {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.inodes.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len() + self.inodes.len()
    }
}

/// One frame of a watch stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WatchEvent {
    Invalidate(Invalidation),
    /// Nothing happened; the stream is alive (every [`WATCH_HEARTBEAT_MS`] when idle).
    Heartbeat,
    /// The hive dropped events for this watcher (it did not keep up): anything may have
    /// changed. The client cannot know what; its caches' TTL is the bound that remains.
    Overflow,
    /// Another client opened these inodes: commit what you wrote to them and give their
    /// write leases back ([`LockOp::ReleaseLease`]).
    Recall(#[serde(deserialize_with = "de_bounded::<_, u64, MAX_WATCH_BATCH>")] Vec<u64>),
}

impl WatchEvent {
    /// Check the bounds a watcher relies on: at most [`MAX_WATCH_BATCH`] items in all, names
    /// as [`check_name`] allows.
    pub fn validate(&self) -> Result<(), Errno> {
        match self {
            WatchEvent::Invalidate(inv) => {
                if inv.len() > MAX_WATCH_BATCH {
                    return Err(Errno::E2BIG);
                }
                for (_, name) in &inv.entries {
                    check_name(name)?;
                }
                Ok(())
            }
            WatchEvent::Recall(inos) if inos.len() > MAX_WATCH_BATCH => Err(Errno::E2BIG),
            WatchEvent::Heartbeat | WatchEvent::Overflow | WatchEvent::Recall(_) => Ok(()),
        }
    }
}

/// Decode and validate one watch-stream body.
pub fn decode_watch_event(b: &[u8]) -> Result<WatchEvent, MetaDecodeError> {
    let ev: WatchEvent = decode(b)?;
    ev.validate()
        .map_err(|e| MetaDecodeError(format!("watch event out of bounds: {e}")))?;
    Ok(ev)
}

/// A list of at most `MAX` items, refused from its length prefix, before anything is
/// allocated or read (postcard gives the exact length up front).
fn de_bounded<'de, D, T, const MAX: usize>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct V<T, const MAX: usize>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>, const MAX: usize> serde::de::Visitor<'de> for V<T, MAX> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "a list of at most {MAX} items")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let n = seq.size_hint().unwrap_or(0);
            if n > MAX {
                return Err(serde::de::Error::invalid_length(n, &self));
            }
            let mut out = Vec::with_capacity(n);
            while let Some(x) = seq.next_element()? {
                if out.len() == MAX {
                    return Err(serde::de::Error::invalid_length(MAX + 1, &self));
                }
                out.push(x);
            }
            Ok(out)
        }
    }
    d.deserialize_seq(V::<T, MAX>(std::marker::PhantomData))
}

/// A client's lock lease: the leader drops every lock of a client session that has sent
/// nothing for this long.
pub const LOCK_LEASE_MS: u64 = 10_000;
/// How often a client holding a lock session renews it.
pub const LOCK_KEEPALIVE_MS: u64 = 1_000;

/// Which lock family: POSIX record locks (`fcntl`) or BSD whole-file locks (`flock`). The
/// two never conflict with each other (as on Linux).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LockKind {
    Posix,
    Flock,
}

/// Shared (read, `LOCK_SH`) or exclusive (write, `LOCK_EX`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LockType {
    Read,
    Write,
}

/// A held lock as `F_GETLK` reports it: bytes `start..=end` (inclusive, as the kernel's
/// `struct file_lock`; a flock lock is `0..=u64::MAX`), and the pid its holder gave.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    pub typ: LockType,
    pub start: u64,
    pub end: u64,
    pub pid: u32,
}

/// A lock operation. Every operation but `Open` names the session `Open` returned; a
/// session the leader does not know (expired, or the leader restarted) is answered
/// [`Errno::STALE`]: every lock of that session is gone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockOp {
    /// Start a new session for this client id, ending (and releasing every lock of) any
    /// session it had. Answer: [`Answer::LockSession`].
    Open,
    /// Renew the session's lease. Answer: [`Answer::Recalls`], the write leases of this
    /// session another client's open is waiting for (also pushed on the watch stream).
    KeepAlive,
    /// Set (`typ: Some`) or remove (`None`) the lock of `owner` on `start..=end` (ignored
    /// for flock). Never waits: a conflict is `AGAIN`. POSIX locks of one owner replace,
    /// split and merge by range. Answer: [`Answer::LockHeld`].
    Set {
        ino: u64,
        kind: LockKind,
        owner: u64,
        typ: Option<LockType>,
        start: u64,
        end: u64,
        pid: u32,
    },
    /// The first lock (lowest start) of another owner that would conflict with this one.
    /// Answer: [`Answer::LockConflict`].
    Get {
        ino: u64,
        kind: LockKind,
        owner: u64,
        typ: LockType,
        start: u64,
        end: u64,
    },
    /// Remove every lock (both kinds) of `owner` on `ino`. Answer: `LockHeld(false)`.
    ReleaseOwner { ino: u64, owner: u64 },
    /// Remove every lock of the session and end it (unmount). Answer: `Done`.
    Close,
    /// The write lease on `ino`: this client may commit writes to it
    /// ([`Mutation::CommitWrite`] carries the token) until it gives it back, its session
    /// expires, or it does not give it back within a lease of a recall. One client holds
    /// it at a time; asking while another does recalls it (`AGAIN` meanwhile). Tokens
    /// grow with every grant, across leaders and restarts (a lease epoch is in the high bits).
    /// `reclaim`: the token of a lease this client held and the leader no longer knows
    /// (a new leader): granted again (a new token) only if nobody else was granted the
    /// file since, else answered [`Answer::LeaseLost`]. 0 for a plain request.
    /// Answer: [`Answer::Lease`].
    Lease { ino: u64, reclaim: u64 },
    /// Give the write lease `token` on `ino` back (everything written under it is
    /// committed). Answer: `Done` (also when it was not held any more).
    ReleaseLease { ino: u64, token: u64 },
}

/// A lock operation of one client session on one volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockRequest {
    pub volume: u32,
    pub client: u64,
    /// The session `Open` returned (ignored by `Open`).
    pub session: u64,
    pub op: LockOp,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub id: u32,
    pub name: String,
    pub copies: u8,
    pub root: Attr,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatFs {
    /// Inodes in use in the volume.
    pub files: u64,
    /// Logical bytes referenced by the volume's live extents.
    pub logical_bytes: u64,
    /// Device bytes in all and free (filled in by the node from its shards).
    pub device_bytes: u64,
    pub device_free_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Answer {
    Done,
    Attr(Attr),
    Volume(VolumeInfo),
    Volumes(Vec<VolumeInfo>),
    /// Up to `max` entries; `end` when none follow.
    Dir {
        entries: Vec<DirEntry>,
        end: bool,
    },
    Link(Vec<u8>),
    Xattr(Vec<u8>),
    XattrNames(Vec<Vec<u8>>),
    /// Extents in offset order, the file's size, and whether more extents follow in range.
    Extents {
        extents: Vec<Extent>,
        size: u64,
        more: bool,
    },
    StatFs(StatFs),
    /// Rename answers the inodes it touched (for the client's cache invalidation).
    Renamed {
        moved: u64,
        replaced: Option<u64>,
    },
    GcEpoch(u64),
    LeaseEpoch(u64),
    Fsck(FsckReport),
    Gc(GcReport),
    /// A new lock session.
    LockSession(u64),
    /// After a lock change: whether the owner still holds any lock on the inode.
    LockHeld(bool),
    /// `F_GETLK`: the first conflicting lock, if any.
    LockConflict(Option<LockInfo>),
    /// A write lease granted: its fencing token.
    Lease(u64),
    /// A reclaimed lease cannot be given back: another client was granted the file since.
    LeaseLost,
    /// Write leases of the session that are recalled (give them back).
    Recalls(#[serde(deserialize_with = "de_bounded::<_, u64, MAX_WATCH_BATCH>")] Vec<u64>),
    /// The answer to a [`MetaRequest::MutateInDir`] (`attr`: the inode named or unnamed, as
    /// `Attr` would carry it) and the directory's attributes read after it applied (they
    /// include this mutation, and maybe later ones).
    InDir {
        attr: Attr,
        dir: Attr,
    },
    /// A node recorded in the cluster map: its id, and the map's epoch after the change.
    Node {
        id: u64,
        map_epoch: u64,
    },
    /// The cluster map's nodes, by id.
    Nodes {
        map_epoch: u64,
        nodes: Vec<NodeEntry>,
    },
    /// The postcard-encoded openraft answer (`Result<response, openraft RaftError>`).
    Raft(Vec<u8>),
    Joined(JoinGrant),
    /// A node admitted as a member: a voter, or a learner (the hive has enough voters).
    Admitted {
        voter: bool,
    },
    Members {
        /// The node that answered.
        this: u64,
        leader: Option<u64>,
        term: u64,
        last_applied: Option<u64>,
        members: Vec<Member>,
    },
    /// The answer to a [`MetaRequest::StaleQuery`]: `stale_ms` 0 when it was read
    /// linearizably, else at most how old the answering node's copy is (the time since it
    /// last heard from a leader, or since its majority last answered it).
    Stale {
        stale_ms: u64,
        answer: Box<Answer>,
    },
    Tokens(Vec<TokenInfo>),
    /// As [`Answer::Dir`], for [`Query::ReadDirPlus`].
    DirPlus {
        entries: Vec<DirEntryPlus>,
        end: bool,
    },
    /// The metadata log version, for [`Query::LogVersion`].
    LogVersion(u16),
}

/// What one garbage collection did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcReport {
    /// The epoch this collection ran in (claims from older epochs are now refused).
    pub epoch: u64,
    /// Distinct chunks live extents reference (the mark).
    pub referenced_chunks: u64,
    /// Chunks the shards held when the sweep listed them.
    pub stored_chunks: u64,
    /// Unreferenced chunks removed (tombstoned), and their stored bytes.
    pub swept_chunks: u64,
    pub swept_bytes: u64,
    /// Unreferenced chunks kept because a client claimed them since the mark began.
    pub spared_chunks: u64,
}

/// A GC step a node's metadata service asks of a shard (opcode `ShardAdmin`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShardAdmin {
    /// Stamp claims with this epoch, no collection running (at start, and after a failed
    /// collection: it also closes any window left open).
    SetGcEpoch { epoch: u64 },
    /// A collection begins: claims are stamped `epoch` and recorded until `EndGc`.
    BeginGc { epoch: u64 },
    /// Verified chunk ids in id order after `after` (33-byte ids, concatenated), each with
    /// its level: answered `Listed`.
    ListIds { after: Option<Vec<u8>>, max: u32 },
    /// Like `ListIds`, only the chunks whose latest claim (put, duplicate put, `has` hit,
    /// or a collection's mark finding them live: `MarkedLive`) is of a GC epoch before
    /// `before_epoch` (fsck: garbage that outlived collections).
    /// Answered by `Ids`; at most `MAX_ADMIN_IDS` per answer.
    ListStale {
        before_epoch: u64,
        after: Option<Vec<u8>>,
        max: u32,
    },
    /// Remove these ids (concatenated) unless claimed since `BeginGc { epoch }`.
    Sweep { epoch: u64, ids: Vec<u8> },
    /// The collection of `epoch` is over: stop recording claims.
    EndGc { epoch: u64 },
    /// These ids (concatenated, at most `MAX_ADMIN_IDS`) were referenced at the mark of
    /// collection `epoch`: for fsck's stale rule they count as claimed in `epoch` (garbage
    /// is due at the first collection whose mark no longer finds it live, not two epochs
    /// after its last claim). Answered `Done`.
    MarkedLive { epoch: u64, ids: Vec<u8> },
    /// At which level the shard holds each of these ids (concatenated, at most
    /// `MAX_ADMIN_IDS`) verified: answered `Held`, one level per id asked, 0 for an id not
    /// held. Unlike `Has` this is not a claim: repair asks it of every copy, and a claim
    /// would keep garbage from being swept.
    Holding { ids: Vec<u8> },
    /// Scrub: read these ids (concatenated, at most `MAX_SCRUB_IDS`) back from the device
    /// and check each record's CRC and the chunk's id (decompress + hash). Nothing is
    /// removed: answered `Scrubbed` with the ids that failed.
    Scrub { ids: Vec<u8> },
    /// Remove these copies (at most `MAX_SCRUB_IDS`): a scrub found them bad and the caller
    /// holds a verified copy from another node, which it stores again next (a copy is never
    /// removed before a good one is in hand). Answered `Scrubbed { bad: removed }` once the
    /// removal is durable.
    DropCopies { ids: Vec<u8> },
    /// Repair is about to check which copies this shard holds beyond the replicas: from
    /// now on the shard records every id put or copied to it (answered `ReleaseWindow`
    /// with a token and the shard's map epoch). Opening a window closes the previous one.
    BeginRelease,
    /// Remove these copies (at most `MAX_ADMIN_IDS`): every replica of their buckets holds
    /// them at their level under map `map_epoch`, and this node is none of those replicas.
    /// Refused if the shard's map is no longer `map_epoch` or `token` is not the open
    /// window; ids put or copied here since the window opened are spared. Answered
    /// `Swept` once the removal is durable.
    Release {
        token: u64,
        map_epoch: u64,
        ids: Vec<u8>,
    },
}

/// Most ids one `ShardAdmin::Scrub` carries (each is a device read and a hash).
pub const MAX_SCRUB_IDS: u32 = 256;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShardAdminReply {
    Done,
    Ids {
        ids: Vec<u8>,
        more: bool,
    },
    /// `ListIds`: the ids (concatenated) and the level of each.
    Listed {
        ids: Vec<u8>,
        levels: Vec<u8>,
        more: bool,
    },
    /// `Holding`: the level each id asked is held at (0: not held), and the epoch of the
    /// shard's placement map.
    Held {
        levels: Vec<u8>,
        map_epoch: u64,
    },
    /// `BeginRelease`: the window's token and the shard's map epoch.
    ReleaseWindow {
        token: u64,
        map_epoch: u64,
    },
    Swept {
        removed: u64,
        spared: u64,
        bytes: u64,
    },
    Refused(String),
    /// What a `Scrub` found (copies read back and checked, bytes read, the ids whose copies
    /// failed, concatenated), or what a `DropCopies` removed.
    Scrubbed {
        checked: u64,
        bytes: u64,
        bad: Vec<u8>,
    },
}

/// Most ids one `ListIds`, `ListStale` or `Sweep` carries.
pub const MAX_ADMIN_IDS: u32 = 65536;

/// Split concatenated 33-byte ids; `None` if the length is not a multiple of 33.
pub fn split_ids(b: &[u8]) -> Option<Vec<ChunkId>> {
    if !b.len().is_multiple_of(CHUNK_ID_BYTES) {
        return None;
    }
    Some(
        b.chunks_exact(CHUNK_ID_BYTES)
            .map(|c| ChunkId(c.try_into().expect("33 bytes")))
            .collect(),
    )
}

/// Concatenate ids for a [`ShardAdmin`] message.
pub fn join_ids(ids: &[ChunkId]) -> Vec<u8> {
    ids.iter().flat_map(|i| i.0).collect()
}

/// What `hive fsck` found. Clean when `findings` is empty.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsckReport {
    pub volumes: u64,
    pub inodes: u64,
    /// Distinct chunk ids referenced by live extents.
    pub referenced_chunks: u64,
    /// Verified chunks the shards hold.
    pub stored_chunks: u64,
    /// Copies of referenced chunks read back and checked against their ids (`verify`).
    pub verified_chunks: u64,
    /// Stored chunks no live extent references and nobody claimed since before the epoch
    /// before the current one: garbage that outlived two collections (each is a finding).
    pub stale_chunks: u64,
    /// Referenced chunks held by fewer nodes than the highest `copies` of the volumes
    /// referencing them (or than the eligible nodes, where there are fewer), or held
    /// everywhere at a lower level: each is a finding; repair makes the missing copies.
    pub under_replicated: u64,
    /// The most copies any referenced chunk should have.
    pub copies_wanted: u64,
    pub findings: Vec<String>,
}

/// The answer to a [`MetaRequest`].
pub type MetaReply = Result<Answer, Errno>;

/// A request or reply body that does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad metadata message: {0}")]
pub struct MetaDecodeError(pub String);

pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).expect("postcard encodes every metadata message")
}

pub fn decode<'a, T: Deserialize<'a>>(b: &'a [u8]) -> Result<T, MetaDecodeError> {
    postcard::from_bytes(b).map_err(|e| MetaDecodeError(e.to_string()))
}

/// A name a directory entry may have: 1..=255 bytes, no `/`, no NUL, not `.` or `..`.
pub fn check_name(name: &[u8]) -> Result<(), Errno> {
    if name.len() > MAX_NAME_BYTES {
        return Err(Errno::NAMETOOLONG);
    }
    if name.is_empty() || name == b"." || name == b".." || name.iter().any(|&b| b == b'/' || b == 0)
    {
        return Err(Errno::INVAL);
    }
    Ok(())
}

/// The bounds of a commit-write's extents (see [`MetaRequest::validate`]).
fn check_commit(extents: &[Extent], size_at_least: u64) -> Result<(), Errno> {
    if extents.len() > MAX_COMMIT_EXTENTS {
        return Err(Errno::E2BIG);
    }
    if size_at_least > MAX_FILE_BYTES {
        return Err(Errno::FBIG);
    }
    for e in extents {
        if e.len == 0 {
            return Err(Errno::INVAL);
        }
        if e.offset
            .checked_add(e.len as u64)
            .is_none_or(|end| end > MAX_FILE_BYTES)
        {
            return Err(Errno::FBIG);
        }
        if e.chunk_offset.checked_add(e.len).is_none() {
            return Err(Errno::INVAL);
        }
    }
    Ok(())
}

impl MetaRequest {
    /// The lowest protocol version a node must speak to decode this request: a client
    /// answers a request its connection's node cannot read `NOTSUP` itself, unsent.
    pub fn needs_version(&self) -> u16 {
        match self {
            MetaRequest::Mutate(c) | MetaRequest::MutateInDir(c) => c.op.log_version(),
            MetaRequest::Query {
                query: Query::LogVersion,
                ..
            }
            | MetaRequest::StaleQuery {
                query: Query::LogVersion,
                ..
            } => 3,
            _ => crate::frame::PROTOCOL_VERSION_MIN,
        }
    }

    /// Check every bound a node relies on, before it acts on the request.
    pub fn validate(&self) -> Result<(), Errno> {
        let xname = |n: &[u8]| {
            if n.is_empty() {
                Err(Errno::INVAL)
            } else if n.len() > MAX_XATTR_NAME_BYTES {
                Err(Errno::RANGE)
            } else {
                Ok(())
            }
        };
        match self {
            MetaRequest::Mutate(c) | MetaRequest::MutateInDir(c) => match &c.op {
                Mutation::CreateVolume { name, copies } => {
                    if name.is_empty()
                        || name.len() > MAX_VOLUME_NAME_BYTES
                        || !name
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                    {
                        return Err(Errno::INVAL);
                    }
                    // 0: the hive's default (the leader writes the number in the log).
                    if *copies > crate::proto::MAX_LEVEL {
                        return Err(Errno::INVAL);
                    }
                    Ok(())
                }
                Mutation::Create { name, .. }
                | Mutation::Link { name, .. }
                | Mutation::Unlink { name, .. }
                | Mutation::Rmdir { name, .. } => check_name(name),
                Mutation::Symlink { name, target, .. } => {
                    check_name(name)?;
                    if target.is_empty() || target.contains(&0) {
                        return Err(Errno::INVAL);
                    }
                    if target.len() > MAX_SYMLINK_BYTES {
                        return Err(Errno::NAMETOOLONG);
                    }
                    Ok(())
                }
                Mutation::Rename { name, new_name, .. } => {
                    check_name(name)?;
                    check_name(new_name)
                }
                Mutation::SetAttr { set, .. } => match set.size {
                    Some(s) if s > MAX_FILE_BYTES => Err(Errno::FBIG),
                    _ => Ok(()),
                },
                Mutation::SetXattr { name, value, .. } => {
                    xname(name)?;
                    if value.len() > MAX_XATTR_VALUE_BYTES {
                        return Err(Errno::E2BIG);
                    }
                    Ok(())
                }
                Mutation::RemoveXattr { name, .. } => xname(name),
                Mutation::CommitWriteThenSet {
                    extents,
                    size_at_least,
                    then,
                    ..
                } => {
                    if then.len() > MAX_COMMIT_SETS {
                        return Err(Errno::E2BIG);
                    }
                    if then.iter().any(|s| s.size.is_some()) {
                        return Err(Errno::INVAL);
                    }
                    check_commit(extents, *size_at_least)
                }
                Mutation::CommitWrite {
                    extents,
                    size_at_least,
                    ..
                } => check_commit(extents, *size_at_least),
                Mutation::Reclaim { .. }
                | Mutation::AdvanceGcEpoch
                | Mutation::NewLeaseEpoch
                | Mutation::Fence { .. } => Ok(()),
                Mutation::AddNode(n) => n.validate(),
                Mutation::SetNodeState { .. } => Ok(()),
                Mutation::SetLogVersion { version } => {
                    if *version < crate::frame::PROTOCOL_VERSION_MIN {
                        return Err(Errno::INVAL);
                    }
                    Ok(())
                }
                Mutation::CreateToken { scope, label, .. } => {
                    if label.len() > MAX_NODE_NAME_BYTES {
                        return Err(Errno::INVAL);
                    }
                    match scope {
                        TokenScope::Volume { name, .. }
                            if name.is_empty() || name.len() > MAX_VOLUME_NAME_BYTES =>
                        {
                            Err(Errno::INVAL)
                        }
                        _ => Ok(()),
                    }
                }
                Mutation::RotateCa(r) => r.validate(),
                Mutation::RevokeToken { id } => {
                    if id.len() < 8 || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
                        Err(Errno::INVAL)
                    } else {
                        Ok(())
                    }
                }
            },
            MetaRequest::Query { query, .. } | MetaRequest::StaleQuery { query, .. } => match query
            {
                Query::Volume { name } if name.len() > MAX_VOLUME_NAME_BYTES => Err(Errno::INVAL),
                Query::Lookup { name, .. } => {
                    if name.len() > MAX_NAME_BYTES {
                        Err(Errno::NAMETOOLONG)
                    } else {
                        Ok(())
                    }
                }
                Query::GetXattr { name, .. } => xname(name),
                Query::ReadDir { max, .. } if *max == 0 || *max > MAX_READDIR_ENTRIES => {
                    Err(Errno::INVAL)
                }
                Query::ReadDirPlus { max, .. } if *max == 0 || *max > MAX_READDIRPLUS_ENTRIES => {
                    Err(Errno::INVAL)
                }
                Query::Extents { from, to, max, .. }
                    if from > to || *max == 0 || *max > MAX_EXTENTS_ANSWER =>
                {
                    Err(Errno::INVAL)
                }
                Query::Open { max, .. } if *max == 0 || *max > MAX_EXTENTS_ANSWER => {
                    Err(Errno::INVAL)
                }
                _ => Ok(()),
            },
            MetaRequest::Lock(r) => match r.op {
                LockOp::Set { start, end, .. } | LockOp::Get { start, end, .. } if start > end => {
                    Err(Errno::INVAL)
                }
                LockOp::Open
                | LockOp::KeepAlive
                | LockOp::Set { .. }
                | LockOp::Get { .. }
                | LockOp::ReleaseOwner { .. }
                | LockOp::Lease { .. }
                | LockOp::ReleaseLease { .. }
                | LockOp::Close => Ok(()),
            },
            MetaRequest::Watch { .. } => Ok(()),
            MetaRequest::Peer(PeerRequest::Join(n)) => n.validate(),
            MetaRequest::Peer(
                PeerRequest::Raft { .. } | PeerRequest::Admit { .. } | PeerRequest::Ping,
            ) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN};

    #[test]
    fn a_command_newer_than_version_2_needs_a_node_that_speaks_it() {
        let cmd = |op| MetaCommand {
            volume: 1,
            client: 2,
            seq: 3,
            acked_below: 3,
            now: Timespec { sec: 1, nsec: 0 },
            op,
        };
        let newer = Mutation::CommitWriteThenSet {
            ino: 7,
            extents: Vec::new(),
            size_at_least: 0,
            claim_epoch: 1,
            lease: 0,
            then: vec![SetAttr {
                perm: Some(0o600),
                ..Default::default()
            }],
        };
        assert_eq!(newer.log_version(), 3);
        assert!(newer.log_version() <= PROTOCOL_VERSION_MAX);
        for r in [
            MetaRequest::Mutate(cmd(newer.clone())),
            MetaRequest::MutateInDir(cmd(newer)),
        ] {
            assert_eq!(r.needs_version(), 3);
        }
        let ask = MetaRequest::Query {
            volume: 0,
            query: Query::LogVersion,
        };
        assert_eq!(ask.needs_version(), 3);
        let older = Mutation::Fence { ino: 7, token: 1 };
        assert_eq!(older.log_version(), PROTOCOL_VERSION_MIN);
        assert_eq!(
            MetaRequest::Mutate(cmd(older)).needs_version(),
            PROTOCOL_VERSION_MIN
        );
        // A log version below the first is no version at all.
        let set = |version| MetaRequest::Mutate(cmd(Mutation::SetLogVersion { version }));
        assert_eq!(set(PROTOCOL_VERSION_MIN - 1).validate(), Err(Errno::INVAL));
        assert_eq!(set(PROTOCOL_VERSION_MAX).validate(), Ok(()));
    }

    #[test]
    fn roundtrip_and_bounds() {
        let c = MetaCommand {
            volume: 3,
            client: 9,
            seq: 4,
            acked_below: 2,
            now: Timespec { sec: 5, nsec: 6 },
            op: Mutation::CommitWrite {
                ino: 7,
                extents: vec![Extent {
                    offset: 1 << 33,
                    len: 4096,
                    chunk: ChunkId([7; CHUNK_ID_BYTES]),
                    chunk_offset: 100,
                }],
                size_at_least: (1 << 33) + 4096,
                claim_epoch: 1,
                lease: 5 << 32 | 3,
            },
        };
        let r = MetaRequest::Mutate(c);
        let b = encode(&r);
        assert_eq!(decode::<MetaRequest>(&b).unwrap(), r);
        assert!(r.validate().is_ok());
        // Truncated and garbage bodies are errors, never panics or huge allocations.
        for n in 0..b.len() {
            let _ = decode::<MetaRequest>(&b[..n]);
        }
        let mut huge = vec![0u8, 0, 0, 0];
        huge.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert!(decode::<MetaRequest>(&huge).is_err());
        let bad = MetaRequest::Mutate(MetaCommand {
            op: Mutation::Create {
                parent: 1,
                name: b"a/b".to_vec(),
                kind: FileKind::File,
                perm: 0o644,
                uid: 0,
                gid: 0,
                rdev: 0,
            },
            ..match r {
                MetaRequest::Mutate(c) => c,
                _ => unreachable!(),
            }
        });
        assert_eq!(bad.validate(), Err(Errno::INVAL));
        assert_eq!(check_name(&[b'x'; 256]), Err(Errno::NAMETOOLONG));
        assert_eq!(check_name(b".."), Err(Errno::INVAL));
        assert!(check_name(&[b'x'; 255]).is_ok());
    }

    #[test]
    fn watch_events_roundtrip_and_bounds() {
        let ev = WatchEvent::Invalidate(Invalidation {
            entries: vec![(1, b"a".to_vec()), (7, vec![b'x'; MAX_NAME_BYTES])],
            inodes: vec![1, 7, 9],
        });
        let b = encode(&ev);
        assert_eq!(decode_watch_event(&b).unwrap(), ev);
        for n in 0..b.len() {
            let _ = decode_watch_event(&b[..n]);
        }
        for e in [WatchEvent::Heartbeat, WatchEvent::Overflow] {
            assert_eq!(decode_watch_event(&encode(&e)).unwrap(), e);
        }
        // A length prefix over the bound is refused before anything is read.
        let mut huge = vec![0u8]; // variant Invalidate
        huge.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert!(decode_watch_event(&huge).is_err());
        let over = |entries: usize, inodes: usize| {
            WatchEvent::Invalidate(Invalidation {
                entries: vec![(1, b"n".to_vec()); entries],
                inodes: vec![3; inodes],
            })
        };
        assert!(decode_watch_event(&encode(&over(MAX_WATCH_BATCH, 0))).is_ok());
        assert!(decode_watch_event(&encode(&over(MAX_WATCH_BATCH + 1, 0))).is_err());
        assert!(decode_watch_event(&encode(&over(0, MAX_WATCH_BATCH + 1))).is_err());
        // Together over the bound: refused by validate.
        assert!(decode_watch_event(&encode(&over(MAX_WATCH_BATCH, 1))).is_err());
        let bad = |name: Vec<u8>| {
            WatchEvent::Invalidate(Invalidation {
                entries: vec![(1, name)],
                inodes: vec![],
            })
        };
        assert!(decode_watch_event(&encode(&bad(vec![b'x'; MAX_NAME_BYTES + 1]))).is_err());
        assert!(decode_watch_event(&encode(&bad(b"a/b".to_vec()))).is_err());
        let w = MetaRequest::Watch {
            volume: 1,
            client: 2,
        };
        assert_eq!(decode::<MetaRequest>(&encode(&w)).unwrap(), w);
        assert!(w.validate().is_ok());
    }

    #[test]
    fn lock_messages_roundtrip_and_bounds() {
        let set = |start, end| {
            MetaRequest::Lock(LockRequest {
                volume: 1,
                client: 2,
                session: 3,
                op: LockOp::Set {
                    ino: 4,
                    kind: LockKind::Posix,
                    owner: 5,
                    typ: Some(LockType::Write),
                    start,
                    end,
                    pid: 6,
                },
            })
        };
        let r = set(10, u64::MAX);
        let b = encode(&r);
        assert_eq!(decode::<MetaRequest>(&b).unwrap(), r);
        for n in 0..b.len() {
            let _ = decode::<MetaRequest>(&b[..n]);
        }
        assert!(r.validate().is_ok());
        assert!(set(7, 7).validate().is_ok());
        assert_eq!(set(8, 7).validate(), Err(Errno::INVAL));
        let a: MetaReply = Ok(Answer::LockConflict(Some(LockInfo {
            typ: LockType::Read,
            start: 0,
            end: 9,
            pid: 42,
        })));
        assert_eq!(decode::<MetaReply>(&encode(&a)).unwrap(), a);
    }
}
