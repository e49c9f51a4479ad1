//! Messages: what a frame body means, given its opcode.
//!
//! Every integer is little-endian. A string is a `u32` byte length followed by that many
//! bytes of UTF-8; a byte string likewise. A batch is a `u32` count followed by the items.
//! Every length and count is checked against its limit, and against the bytes actually
//! left in the body, before anything is allocated; a body with bytes left over after its
//! message is an error.
//!
//! | opcode | body |
//! |---|---|
//! | `Hello` | `min_version u16, max_version u16, token str, client_name str` |
//! | `Has` | `level u8, count u32, count × id[33]` |
//! | `Put` | `level u8, count u32, count × (id[33], codec u8, raw_len u32, data bytes)` |
//! | `Get` | `id[33]` |
//! | `Stats`, `Map` | empty |
//! | `HelloOk` | `version u16, node_id str, shard u16, shard_count u16, credits u32` |
//! | `Error` | `code u16, message str` |
//! | `HasReply` | `claim_epoch u64, count u32, count × present u8 (0/1)` |
//! | `PutReply` | `claim_epoch u64, count u32, count × result u8` |
//! | `GetReply` | `found u8 (0/1)`, then if found `codec u8, raw_len u32, data bytes` |
//! | `StatsReply` | `json str` |
//! | `MapReply` | `epoch u64, node_id str, bucket_count u32, shard_count u16, base_port u16, dedupe_key[32], count u32, count × shard u16` |
//! | `HiveMap` | empty |
//! | `HiveMapReply` | the [`HiveMap`] encoding (`placement.rs`) |
//! | `Replicate` | `hint_for u64`, then a `Put` body (node to node: store, do not forward) |
//!
//! A *level* is the number of copies the chunks must have (a volume's `copies`, 1 to
//! [`MAX_LEVEL`]): `Has` answers present only for a chunk stored at that level or higher,
//! and a `Put` raises a chunk stored at a lower level (protocol version 2).

use crate::chunk::{
    ChunkId, Codec, DedupeKey, CHUNK_ID_BYTES, MAX_CHUNK_RAW_BYTES, MAX_CHUNK_STORED_BYTES,
};
use crate::frame::{
    encode_frame, encode_frame_checked_with, BodyCheck, FrameHeader, FLAG_BODY_UNCHECKED,
    HEADER_BYTES,
};
use crate::placement::HiveMap;

/// Most ids in one `Has` (and presence flags in one `HasReply`).
pub const MAX_BATCH_IDS: usize = 8192;
/// Most chunks in one `Put` (and results in one `PutReply`); their bytes must also fit in
/// one frame body ([`crate::frame::MAX_BODY_BYTES`]).
pub const MAX_BATCH_CHUNKS: usize = 1024;
/// Longest `Hello` token, in bytes.
pub const MAX_TOKEN_BYTES: usize = 1024;
/// Longest client name or node id, in bytes.
pub const MAX_NAME_BYTES: usize = 256;
/// Longest `Error` message, in bytes.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 4096;
/// Longest `StatsReply` JSON, in bytes.
pub const MAX_STATS_JSON_BYTES: usize = 1 << 20;
/// Most buckets in a [`ClusterMap`].
pub const MAX_BUCKETS: u32 = 1 << 20;
/// Bytes of a `Put` body before its chunks (the level and the count).
pub const PUT_BODY_HEADER_BYTES: usize = 5;
/// Most copies a chunk can be asked to have (the highest `copies` of a volume).
pub const MAX_LEVEL: u8 = 8;
/// Bytes each chunk adds to a `Put` body besides its data: id, codec, raw_len, data length.
pub const PUT_CHUNK_OVERHEAD_BYTES: usize = CHUNK_ID_BYTES + 1 + 4 + 4;

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Opcode {
    Hello = 1,
    HelloOk = 2,
    Error = 3,
    Has = 10,
    HasReply = 11,
    Put = 12,
    PutReply = 13,
    Get = 14,
    GetReply = 15,
    Stats = 16,
    StatsReply = 17,
    Map = 18,
    MapReply = 19,
    /// A metadata request ([`crate::meta::MetaRequest`]), on the metadata port only.
    Meta = 20,
    MetaReply = 21,
    /// A GC step for a shard ([`crate::meta::ShardAdmin`]), on shard ports.
    ShardAdmin = 22,
    ShardAdminReply = 23,
    /// The hive's placement map ([`HiveMap`]), on shard ports.
    HiveMap = 24,
    HiveMapReply = 25,
    /// A copy of chunks sent by a bucket's primary to another replica (peers only).
    Replicate = 26,
}

impl Opcode {
    pub fn from_u16(v: u16) -> Option<Opcode> {
        Some(match v {
            1 => Opcode::Hello,
            2 => Opcode::HelloOk,
            3 => Opcode::Error,
            10 => Opcode::Has,
            11 => Opcode::HasReply,
            12 => Opcode::Put,
            13 => Opcode::PutReply,
            14 => Opcode::Get,
            15 => Opcode::GetReply,
            16 => Opcode::Stats,
            17 => Opcode::StatsReply,
            18 => Opcode::Map,
            19 => Opcode::MapReply,
            20 => Opcode::Meta,
            21 => Opcode::MetaReply,
            22 => Opcode::ShardAdmin,
            23 => Opcode::ShardAdminReply,
            24 => Opcode::HiveMap,
            25 => Opcode::HiveMapReply,
            26 => Opcode::Replicate,
            _ => return None,
        })
    }

    /// True for the opcodes a client sends.
    pub fn is_request(self) -> bool {
        matches!(
            self,
            Opcode::Hello
                | Opcode::Has
                | Opcode::Put
                | Opcode::Get
                | Opcode::Stats
                | Opcode::Map
                | Opcode::Meta
                | Opcode::ShardAdmin
                | Opcode::HiveMap
                | Opcode::Replicate
        )
    }
}

/// Error codes carried by [`Response::Error`], and what a decode or frame error maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    BadFrame = 1,
    BadChecksum = 2,
    TooLarge = 3,
    UnsupportedVersion = 4,
    UnknownOpcode = 5,
    Unauthenticated = 6,
    BadToken = 7,
    CreditsExceeded = 8,
    NotFound = 9,
    Rejected = 10,
    Internal = 11,
    BadRequest = 12,
    WrongShard = 13,
    /// The shard is out of space for new chunks (ENOSPC): retrying later may succeed once
    /// a collection has freed space.
    NoSpace = 14,
    /// This metadata node does not lead: the message is the leader's `host:port`, or empty
    /// while no leader is known (retry shortly).
    NotLeader = 15,
    /// The metadata node asked could not reach a majority in time: nothing was decided;
    /// another member may be able to.
    NoQuorum = 16,
    /// The node asked is not the primary of the bucket in its map (the client's map is
    /// stale): fetch the map (`HiveMap`) and send to the primary it names.
    NotPrimary = 17,
    /// Fewer than `min_copies` nodes stored the chunks in time: nothing is acknowledged
    /// (copies made stay; a retry is idempotent).
    TooFewCopies = 18,
}

impl ErrorCode {
    /// `None` for a value this build does not know (decoding reports
    /// [`DecodeError::UnknownErrorCode`], whose own code is `BadRequest`).
    pub fn from_u16(v: u16) -> Option<ErrorCode> {
        Some(match v {
            1 => ErrorCode::BadFrame,
            2 => ErrorCode::BadChecksum,
            3 => ErrorCode::TooLarge,
            4 => ErrorCode::UnsupportedVersion,
            5 => ErrorCode::UnknownOpcode,
            6 => ErrorCode::Unauthenticated,
            7 => ErrorCode::BadToken,
            8 => ErrorCode::CreditsExceeded,
            9 => ErrorCode::NotFound,
            10 => ErrorCode::Rejected,
            11 => ErrorCode::Internal,
            12 => ErrorCode::BadRequest,
            13 => ErrorCode::WrongShard,
            14 => ErrorCode::NoSpace,
            15 => ErrorCode::NotLeader,
            16 => ErrorCode::NoQuorum,
            17 => ErrorCode::NotPrimary,
            18 => ErrorCode::TooFewCopies,
            _ => return None,
        })
    }
}

/// The outcome for one chunk of a `Put`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PutResult {
    /// Verified and written.
    Stored = 0,
    /// Already present (verified earlier); nothing written.
    Duplicate = 1,
    /// Failed verification or could not be stored.
    Rejected = 2,
}

impl PutResult {
    pub fn from_u8(v: u8) -> Option<PutResult> {
        match v {
            0 => Some(PutResult::Stored),
            1 => Some(PutResult::Duplicate),
            2 => Some(PutResult::Rejected),
            _ => None,
        }
    }
}

/// Why a body does not decode to a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("unknown opcode {0}")]
    UnknownOpcode(u16),
    #[error("opcode {0} is not valid in this direction")]
    UnexpectedOpcode(u16),
    #[error("message truncated: needed {need} more bytes, {have} left")]
    Truncated { need: usize, have: usize },
    #[error("{what}: {len} exceeds the limit of {limit}")]
    TooLong {
        what: &'static str,
        len: usize,
        limit: usize,
    },
    #[error("{0} trailing bytes after the message")]
    TrailingBytes(usize),
    #[error("{0} is not valid UTF-8")]
    BadUtf8(&'static str),
    #[error("unknown codec {0}")]
    UnknownCodec(u8),
    #[error("unknown error code {0}")]
    UnknownErrorCode(u16),
    #[error("invalid {what}: {value}")]
    BadValue { what: &'static str, value: u64 },
}

impl DecodeError {
    /// The [`ErrorCode`] to answer a request that failed to decode with.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::UnknownOpcode(_) => ErrorCode::UnknownOpcode,
            DecodeError::TooLong { .. } => ErrorCode::TooLarge,
            _ => ErrorCode::BadRequest,
        }
    }
}

/// A bounds-checked little-endian cursor over a message body. Nothing it returns is
/// allocated before its length has been checked against the caller's limit and the
/// bytes remaining.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf, pos: 0 }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.remaining() {
            return Err(DecodeError::Truncated {
                need: n,
                have: self.remaining(),
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A 0/1 byte.
    pub fn bool(&mut self, what: &'static str) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(DecodeError::BadValue {
                what,
                value: v as u64,
            }),
        }
    }

    /// `len` raw bytes, refused if `len > limit` or past the end.
    pub fn bytes(&mut self, len: usize, limit: usize) -> Result<&'a [u8], DecodeError> {
        if len > limit {
            return Err(DecodeError::TooLong {
                what: "byte string",
                len,
                limit,
            });
        }
        self.take(len)
    }

    /// A `u32`-length-prefixed byte string of at most `limit` bytes.
    pub fn byte_string(
        &mut self,
        what: &'static str,
        limit: usize,
    ) -> Result<&'a [u8], DecodeError> {
        let len = self.u32()? as usize;
        if len > limit {
            return Err(DecodeError::TooLong { what, len, limit });
        }
        self.take(len)
    }

    /// A `u32`-length-prefixed UTF-8 string of at most `limit` bytes.
    pub fn string(&mut self, limit: usize) -> Result<String, DecodeError> {
        self.named_string("string", limit)
    }

    fn named_string(&mut self, what: &'static str, limit: usize) -> Result<String, DecodeError> {
        let b = self.byte_string(what, limit)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| DecodeError::BadUtf8(what))
    }

    /// A `u32` batch count of at most `limit` items of at least `min_item_bytes` each,
    /// checked against the bytes left, so a `Vec::with_capacity(count)` is safe.
    pub fn count(
        &mut self,
        what: &'static str,
        limit: usize,
        min_item_bytes: usize,
    ) -> Result<usize, DecodeError> {
        let n = self.u32()? as usize;
        if n > limit {
            return Err(DecodeError::TooLong {
                what,
                len: n,
                limit,
            });
        }
        let need = n.saturating_mul(min_item_bytes);
        if need > self.remaining() {
            return Err(DecodeError::Truncated {
                need,
                have: self.remaining(),
            });
        }
        Ok(n)
    }

    pub fn chunk_id(&mut self) -> Result<ChunkId, DecodeError> {
        Ok(ChunkId(self.array()?))
    }

    /// A level (copies a chunk must have): 1 to [`MAX_LEVEL`].
    pub fn level(&mut self) -> Result<u8, DecodeError> {
        let v = self.u8()?;
        if !(1..=MAX_LEVEL).contains(&v) {
            return Err(DecodeError::BadValue {
                what: "level",
                value: v as u64,
            });
        }
        Ok(v)
    }

    pub fn codec(&mut self) -> Result<Codec, DecodeError> {
        let c = self.u8()?;
        Codec::from_u8(c).ok_or(DecodeError::UnknownCodec(c))
    }

    /// Error unless every byte was consumed.
    pub fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(DecodeError::TrailingBytes(n)),
        }
    }
}

/// Little-endian body writer.
struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// Lengths beyond `u32` cannot occur within a frame; they saturate so the peer rejects
    /// them instead of misparsing.
    fn len(&mut self, n: usize) {
        self.u32(u32::try_from(n).unwrap_or(u32::MAX));
    }
    fn bytes(&mut self, b: &[u8]) {
        self.len(b.len());
        self.0.extend_from_slice(b);
    }
}

/// One chunk of a `Put`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PutChunk {
    pub id: ChunkId,
    pub codec: Codec,
    /// Plaintext length, at most [`MAX_CHUNK_RAW_BYTES`].
    pub raw_len: u32,
    /// Stored (possibly compressed) bytes, at most [`MAX_CHUNK_STORED_BYTES`].
    pub data: Vec<u8>,
}

impl PutChunk {
    /// Bytes this chunk adds to a `Put` body.
    pub fn encoded_len(&self) -> usize {
        PUT_CHUNK_OVERHEAD_BYTES + self.data.len()
    }
}

/// Client to node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// First message on every connection.
    Hello {
        min_version: u16,
        max_version: u16,
        token: String,
        client_name: String,
    },
    /// Which of these ids does the node hold (verified) at `level` copies or more?
    Has {
        level: u8,
        ids: Vec<ChunkId>,
    },
    /// Store these chunks with `level` copies (raising any stored at a lower level).
    Put {
        level: u8,
        chunks: Vec<PutChunk>,
    },
    Get {
        id: ChunkId,
    },
    Stats,
    Map,
    /// A postcard-encoded [`crate::meta::MetaRequest`] (decoded by the metadata service).
    Meta {
        body: Vec<u8>,
    },
    /// A postcard-encoded [`crate::meta::ShardAdmin`].
    ShardAdmin {
        body: Vec<u8>,
    },
    /// The hive's placement map as this node knows it.
    HiveMap,
    /// Store these chunks here without forwarding them: a copy from the bucket's primary
    /// (`hint_for`: 0, or the node this is a hinted copy for). Only other nodes may send it.
    Replicate {
        hint_for: u64,
        level: u8,
        chunks: Vec<PutChunk>,
    },
}

/// The placement of buckets on one node's shards, and what a client needs to address
/// chunks (the dedupe key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterMap {
    pub epoch: u64,
    pub node_id: String,
    /// A power of two, at most [`MAX_BUCKETS`].
    pub bucket_count: u32,
    /// At least 1; every entry of `bucket_to_shard` is below it.
    pub shard_count: u16,
    /// Shard `i` listens on `base_port + i`.
    pub base_port: u16,
    pub dedupe_key: DedupeKey,
    /// `bucket_count` entries.
    pub bucket_to_shard: Vec<u16>,
}

impl ClusterMap {
    /// The shard owning `id`. Never panics: a map that fails [`validate`](Self::validate)
    /// (decoded maps never do) answers shard 0.
    pub fn shard_of(&self, id: &ChunkId) -> u16 {
        if !self.bucket_count.is_power_of_two() {
            return 0;
        }
        let b = id.bucket(self.bucket_count) as usize;
        self.bucket_to_shard.get(b).copied().unwrap_or(0)
    }

    /// Check the invariants decoding enforces.
    pub fn validate(&self) -> Result<(), DecodeError> {
        if !self.bucket_count.is_power_of_two() || self.bucket_count > MAX_BUCKETS {
            return Err(DecodeError::BadValue {
                what: "bucket count",
                value: self.bucket_count as u64,
            });
        }
        if self.shard_count == 0 {
            return Err(DecodeError::BadValue {
                what: "shard count",
                value: 0,
            });
        }
        if self.bucket_to_shard.len() != self.bucket_count as usize {
            return Err(DecodeError::BadValue {
                what: "bucket map length",
                value: self.bucket_to_shard.len() as u64,
            });
        }
        if let Some(&s) = self
            .bucket_to_shard
            .iter()
            .find(|&&s| s >= self.shard_count)
        {
            return Err(DecodeError::BadValue {
                what: "bucket shard",
                value: s as u64,
            });
        }
        if self.node_id.len() > MAX_NAME_BYTES {
            return Err(DecodeError::TooLong {
                what: "node id",
                len: self.node_id.len(),
                limit: MAX_NAME_BYTES,
            });
        }
        Ok(())
    }
}

/// Node to client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    HelloOk {
        version: u16,
        node_id: String,
        shard: u16,
        shard_count: u16,
        credits: u32,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
    /// `present[i]` answers `ids[i]` of the `Has`.
    HasReply {
        claim_epoch: u64,
        present: Vec<bool>,
    },
    /// `results[i]` answers `chunks[i]` of the `Put`.
    PutReply {
        claim_epoch: u64,
        results: Vec<PutResult>,
    },
    /// `(codec, raw_len, stored bytes)`, or `None` when absent.
    GetReply {
        chunk: Option<(Codec, u32, Vec<u8>)>,
    },
    StatsReply {
        json: String,
    },
    /// A postcard-encoded [`crate::meta::MetaReply`].
    MetaReply {
        body: Vec<u8>,
    },
    /// A postcard-encoded [`crate::meta::ShardAdminReply`].
    ShardAdminReply {
        body: Vec<u8>,
    },
    MapReply {
        map: ClusterMap,
    },
    HiveMapReply {
        map: HiveMap,
    },
}

fn opcode_of(v: u16) -> Result<Opcode, DecodeError> {
    Opcode::from_u16(v).ok_or(DecodeError::UnknownOpcode(v))
}

fn chunk_lengths(raw_len: u32, stored: usize) -> Result<(), DecodeError> {
    if raw_len as usize > MAX_CHUNK_RAW_BYTES {
        return Err(DecodeError::TooLong {
            what: "chunk raw length",
            len: raw_len as usize,
            limit: MAX_CHUNK_RAW_BYTES,
        });
    }
    if stored > MAX_CHUNK_STORED_BYTES {
        return Err(DecodeError::TooLong {
            what: "chunk data",
            len: stored,
            limit: MAX_CHUNK_STORED_BYTES,
        });
    }
    Ok(())
}

impl Request {
    pub fn opcode(&self) -> Opcode {
        match self {
            Request::Hello { .. } => Opcode::Hello,
            Request::Has { .. } => Opcode::Has,
            Request::Put { .. } => Opcode::Put,
            Request::Get { .. } => Opcode::Get,
            Request::Stats => Opcode::Stats,
            Request::Map => Opcode::Map,
            Request::Meta { .. } => Opcode::Meta,
            Request::ShardAdmin { .. } => Opcode::ShardAdmin,
            Request::HiveMap => Opcode::HiveMap,
            Request::Replicate { .. } => Opcode::Replicate,
        }
    }

    /// The opcode and body. Encoding does not enforce limits: a message over them is
    /// refused by the receiver.
    pub fn encode(&self) -> (Opcode, Vec<u8>) {
        let mut w = Writer(Vec::new());
        match self {
            Request::Hello {
                min_version,
                max_version,
                token,
                client_name,
            } => {
                w.u16(*min_version);
                w.u16(*max_version);
                w.bytes(token.as_bytes());
                w.bytes(client_name.as_bytes());
            }
            Request::Has { level, ids } => {
                w.0.reserve(5 + ids.len() * CHUNK_ID_BYTES);
                w.u8(*level);
                w.len(ids.len());
                for id in ids {
                    w.0.extend_from_slice(&id.0);
                }
            }
            Request::Put { level, chunks } => write_put_body(&mut w.0, *level, chunks),
            Request::Get { id } => w.0.extend_from_slice(&id.0),
            Request::Stats | Request::Map | Request::HiveMap => {}
            Request::Replicate {
                hint_for,
                level,
                chunks,
            } => {
                w.u64(*hint_for);
                write_put_body(&mut w.0, *level, chunks)
            }
            Request::Meta { body } | Request::ShardAdmin { body } => w.0.extend_from_slice(body),
        }
        (self.opcode(), w.0)
    }

    pub fn decode(opcode: u16, body: &[u8]) -> Result<Request, DecodeError> {
        let op = opcode_of(opcode)?;
        let mut r = Reader::new(body);
        let req = match op {
            Opcode::Hello => Request::Hello {
                min_version: r.u16()?,
                max_version: r.u16()?,
                token: r.named_string("token", MAX_TOKEN_BYTES)?,
                client_name: r.named_string("client name", MAX_NAME_BYTES)?,
            },
            Opcode::Has => {
                let level = r.level()?;
                let n = r.count("has ids", MAX_BATCH_IDS, CHUNK_ID_BYTES)?;
                let mut ids = Vec::with_capacity(n);
                for _ in 0..n {
                    ids.push(r.chunk_id()?);
                }
                Request::Has { level, ids }
            }
            Opcode::Put => {
                let (level, at) = decode_put_in_place(body)?;
                let chunks = owned_chunks(body, at);
                return Ok(Request::Put { level, chunks });
            }
            Opcode::Replicate => {
                let (hint_for, level, at) = decode_replicate_in_place(body)?;
                let chunks = owned_chunks(body, at);
                return Ok(Request::Replicate {
                    hint_for,
                    level,
                    chunks,
                });
            }
            Opcode::Get => Request::Get { id: r.chunk_id()? },
            Opcode::Stats => Request::Stats,
            Opcode::Map => Request::Map,
            Opcode::HiveMap => Request::HiveMap,
            Opcode::Meta => {
                return Ok(Request::Meta {
                    body: body.to_vec(),
                })
            }
            Opcode::ShardAdmin => {
                return Ok(Request::ShardAdmin {
                    body: body.to_vec(),
                })
            }
            _ => return Err(DecodeError::UnexpectedOpcode(opcode)),
        };
        r.finish()?;
        Ok(req)
    }
}

impl Response {
    pub fn opcode(&self) -> Opcode {
        match self {
            Response::HelloOk { .. } => Opcode::HelloOk,
            Response::Error { .. } => Opcode::Error,
            Response::HasReply { .. } => Opcode::HasReply,
            Response::PutReply { .. } => Opcode::PutReply,
            Response::GetReply { .. } => Opcode::GetReply,
            Response::StatsReply { .. } => Opcode::StatsReply,
            Response::MapReply { .. } => Opcode::MapReply,
            Response::MetaReply { .. } => Opcode::MetaReply,
            Response::ShardAdminReply { .. } => Opcode::ShardAdminReply,
            Response::HiveMapReply { .. } => Opcode::HiveMapReply,
        }
    }

    /// An error response, its message cut (at a character boundary) to
    /// [`MAX_ERROR_MESSAGE_BYTES`].
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Response {
        let mut message = message.into();
        if message.len() > MAX_ERROR_MESSAGE_BYTES {
            let mut end = MAX_ERROR_MESSAGE_BYTES;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        Response::Error { code, message }
    }

    /// The opcode and body. Encoding does not enforce limits: a message over them is
    /// refused by the receiver.
    pub fn encode(&self) -> (Opcode, Vec<u8>) {
        let mut w = Writer(Vec::new());
        match self {
            Response::HelloOk {
                version,
                node_id,
                shard,
                shard_count,
                credits,
            } => {
                w.u16(*version);
                w.bytes(node_id.as_bytes());
                w.u16(*shard);
                w.u16(*shard_count);
                w.u32(*credits);
            }
            Response::Error { code, message } => {
                w.u16(*code as u16);
                w.bytes(message.as_bytes());
            }
            Response::HasReply {
                claim_epoch,
                present,
            } => {
                w.u64(*claim_epoch);
                w.len(present.len());
                w.0.extend(present.iter().map(|&p| p as u8));
            }
            Response::PutReply {
                claim_epoch,
                results,
            } => {
                w.u64(*claim_epoch);
                w.len(results.len());
                w.0.extend(results.iter().map(|&r| r as u8));
            }
            Response::GetReply { chunk } => {
                write_get_reply_body(&mut w.0, chunk.as_ref().map(|(c, r, d)| (*c, *r, &d[..])))
            }
            Response::StatsReply { json } => w.bytes(json.as_bytes()),
            Response::MetaReply { body } | Response::ShardAdminReply { body } => {
                w.0.extend_from_slice(body)
            }
            Response::HiveMapReply { map } => map.encode(&mut w.0),
            Response::MapReply { map } => {
                w.u64(map.epoch);
                w.bytes(map.node_id.as_bytes());
                w.u32(map.bucket_count);
                w.u16(map.shard_count);
                w.u16(map.base_port);
                w.0.extend_from_slice(&map.dedupe_key.0);
                w.len(map.bucket_to_shard.len());
                w.0.reserve(map.bucket_to_shard.len() * 2);
                for &s in &map.bucket_to_shard {
                    w.u16(s);
                }
            }
        }
        (self.opcode(), w.0)
    }

    pub fn decode(opcode: u16, body: &[u8]) -> Result<Response, DecodeError> {
        let op = opcode_of(opcode)?;
        let mut r = Reader::new(body);
        let resp = match op {
            Opcode::HelloOk => Response::HelloOk {
                version: r.u16()?,
                node_id: r.named_string("node id", MAX_NAME_BYTES)?,
                shard: r.u16()?,
                shard_count: r.u16()?,
                credits: r.u32()?,
            },
            Opcode::Error => {
                let c = r.u16()?;
                let code = ErrorCode::from_u16(c).ok_or(DecodeError::UnknownErrorCode(c))?;
                Response::Error {
                    code,
                    message: r.named_string("error message", MAX_ERROR_MESSAGE_BYTES)?,
                }
            }
            Opcode::HasReply => {
                let claim_epoch = r.u64()?;
                let n = r.count("has reply", MAX_BATCH_IDS, 1)?;
                let mut present = Vec::with_capacity(n);
                for _ in 0..n {
                    present.push(r.bool("presence flag")?);
                }
                Response::HasReply {
                    claim_epoch,
                    present,
                }
            }
            Opcode::PutReply => {
                let claim_epoch = r.u64()?;
                let n = r.count("put reply", MAX_BATCH_CHUNKS, 1)?;
                let mut results = Vec::with_capacity(n);
                for _ in 0..n {
                    let v = r.u8()?;
                    results.push(PutResult::from_u8(v).ok_or(DecodeError::BadValue {
                        what: "put result",
                        value: v as u64,
                    })?);
                }
                Response::PutReply {
                    claim_epoch,
                    results,
                }
            }
            Opcode::GetReply => {
                let chunk = if r.bool("found flag")? {
                    let codec = r.codec()?;
                    let raw_len = r.u32()?;
                    let data = r.byte_string("chunk data", MAX_CHUNK_STORED_BYTES)?;
                    chunk_lengths(raw_len, data.len())?;
                    Some((codec, raw_len, data.to_vec()))
                } else {
                    None
                };
                Response::GetReply { chunk }
            }
            Opcode::StatsReply => Response::StatsReply {
                json: r.named_string("stats json", MAX_STATS_JSON_BYTES)?,
            },
            Opcode::MetaReply => {
                return Ok(Response::MetaReply {
                    body: body.to_vec(),
                })
            }
            Opcode::ShardAdminReply => {
                return Ok(Response::ShardAdminReply {
                    body: body.to_vec(),
                })
            }
            Opcode::HiveMapReply => {
                return Ok(Response::HiveMapReply {
                    map: HiveMap::decode(body)?,
                })
            }
            Opcode::MapReply => {
                let epoch = r.u64()?;
                let node_id = r.named_string("node id", MAX_NAME_BYTES)?;
                let bucket_count = r.u32()?;
                let shard_count = r.u16()?;
                let base_port = r.u16()?;
                let dedupe_key = DedupeKey(r.array()?);
                let n = r.count("bucket map", MAX_BUCKETS as usize, 2)?;
                if n != bucket_count as usize {
                    return Err(DecodeError::BadValue {
                        what: "bucket map length",
                        value: n as u64,
                    });
                }
                let mut bucket_to_shard = Vec::with_capacity(n);
                for _ in 0..n {
                    bucket_to_shard.push(r.u16()?);
                }
                let map = ClusterMap {
                    epoch,
                    node_id,
                    bucket_count,
                    shard_count,
                    base_port,
                    dedupe_key,
                    bucket_to_shard,
                };
                map.validate()?;
                Response::MapReply { map }
            }
            _ => return Err(DecodeError::UnexpectedOpcode(opcode)),
        };
        r.finish()?;
        Ok(resp)
    }
}

/// A request as one frame.
pub fn frame_request(version: u16, request_id: u64, req: &Request) -> Vec<u8> {
    let (op, body) = req.encode();
    encode_frame(version, op as u16, request_id, &body)
}

/// One chunk of a `Put` body, located rather than copied: `data` is a range of the body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PutChunkAt {
    pub id: ChunkId,
    pub codec: Codec,
    pub raw_len: u32,
    pub data: std::ops::Range<usize>,
}

/// Decode a `Put` body without copying chunk data (a node keeps the frame body and hands
/// out ranges of it): the level and the chunks. Same checks as [`Request::decode`], which
/// is built on it.
pub fn decode_put_in_place(body: &[u8]) -> Result<(u8, Vec<PutChunkAt>), DecodeError> {
    let mut r = Reader::new(body);
    let level = r.level()?;
    let n = r.count("put chunks", MAX_BATCH_CHUNKS, PUT_CHUNK_OVERHEAD_BYTES)?;
    let mut chunks = Vec::with_capacity(n);
    for _ in 0..n {
        let id = r.chunk_id()?;
        let codec = r.codec()?;
        let raw_len = r.u32()?;
        let data = r.byte_string("chunk data", MAX_CHUNK_STORED_BYTES)?;
        chunk_lengths(raw_len, data.len())?;
        let start = body.len() - r.remaining() - data.len();
        chunks.push(PutChunkAt {
            id,
            codec,
            raw_len,
            data: start..start + data.len(),
        });
    }
    r.finish()?;
    Ok((level, chunks))
}

/// Chunks located in `body`, copied out of it.
fn owned_chunks(body: &[u8], at: Vec<PutChunkAt>) -> Vec<PutChunk> {
    at.into_iter()
        .map(|c| PutChunk {
            id: c.id,
            codec: c.codec,
            raw_len: c.raw_len,
            data: body[c.data].to_vec(),
        })
        .collect()
}

/// Decode a `Replicate` body in place: the node it is a hinted copy for (0: none), the
/// level and the chunks, as ranges of `body` (the put body after the 8-byte prefix).
pub fn decode_replicate_in_place(body: &[u8]) -> Result<(u64, u8, Vec<PutChunkAt>), DecodeError> {
    let mut r = Reader::new(body);
    let hint_for = r.u64()?;
    let (level, at) = decode_put_in_place(&body[REPLICATE_PREFIX_BYTES..])?;
    let at = at
        .into_iter()
        .map(|c| PutChunkAt {
            data: c.data.start + REPLICATE_PREFIX_BYTES..c.data.end + REPLICATE_PREFIX_BYTES,
            ..c
        })
        .collect();
    Ok((hint_for, level, at))
}

/// Bytes of a `Replicate` body before its put body (`hint_for`).
pub const REPLICATE_PREFIX_BYTES: usize = 8;

/// One chunk of a `Replicate`, borrowed: id, codec, plaintext length, stored bytes.
pub type ChunkRef<'a> = (ChunkId, Codec, u32, &'a [u8]);

/// Append a `Replicate` request frame for borrowed chunks to `out`.
pub fn frame_replicate_into(
    out: &mut Vec<u8>,
    check: BodyCheck,
    version: u16,
    request_id: u64,
    hint_for: u64,
    level: u8,
    chunks: &[ChunkRef<'_>],
) {
    let op = Opcode::Replicate as u16;
    encode_frame_checked_with(out, check, version, op, request_id, |body| {
        body.extend_from_slice(&hint_for.to_le_bytes());
        write_put_body_refs(body, level, chunks.iter().copied())
    });
}

/// The body of a `Put`.
fn write_put_body<'a>(
    out: &mut Vec<u8>,
    level: u8,
    chunks: impl IntoIterator<Item = &'a PutChunk, IntoIter: ExactSizeIterator + Clone>,
) {
    write_put_body_refs(
        out,
        level,
        chunks
            .into_iter()
            .map(|c| (c.id, c.codec, c.raw_len, &c.data[..])),
    )
}

/// [`write_put_body`] for borrowed chunks.
fn write_put_body_refs<'a>(
    out: &mut Vec<u8>,
    level: u8,
    chunks: impl ExactSizeIterator<Item = ChunkRef<'a>> + Clone,
) {
    let bytes: usize = chunks
        .clone()
        .map(|c| PUT_CHUNK_OVERHEAD_BYTES + c.3.len())
        .sum();
    out.reserve(PUT_BODY_HEADER_BYTES + bytes);
    let mut w = Writer(std::mem::take(out));
    write_put_layout(&mut w, level, chunks, |w, data| w.0.extend_from_slice(data));
    *out = w.0;
}

/// The layout of a `Put` body (the one place it is written): level, count, then each
/// chunk's id, codec, raw length and data length, followed by its data, which `data`
/// writes (or, for a frame sent in pieces, leaves out and marks the place of).
fn write_put_layout<'a>(
    w: &mut Writer,
    level: u8,
    chunks: impl ExactSizeIterator<Item = ChunkRef<'a>>,
    mut data: impl FnMut(&mut Writer, &'a [u8]),
) {
    w.u8(level);
    w.len(chunks.len());
    for (id, codec, raw_len, d) in chunks {
        w.0.extend_from_slice(&id.0);
        w.u8(codec as u8);
        w.u32(raw_len);
        w.len(d.len());
        data(w, d);
    }
}

/// The body of a `GetReply` up to the chunk's data (the one place its layout is written):
/// present flag, then codec, raw length and the data's length.
fn write_get_reply_prefix(out: &mut Vec<u8>, chunk: Option<(Codec, u32, usize)>) {
    match chunk {
        None => out.push(0),
        Some((codec, raw_len, len)) => {
            out.push(1);
            out.push(codec as u8);
            out.extend_from_slice(&raw_len.to_le_bytes());
            out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
        }
    }
}

fn write_get_reply_body(out: &mut Vec<u8>, chunk: Option<(Codec, u32, &[u8])>) {
    write_get_reply_prefix(out, chunk.map(|(c, r, d)| (c, r, d.len())));
    if let Some((_, _, data)) = chunk {
        out.extend_from_slice(data);
    }
}

/// The head of a `GetReply` frame for borrowed chunk bytes: the frame header and the body
/// up to the chunk's data, appended to `out`. The frame is `out` followed by the data; a
/// node queues both pieces without gathering them (see `FramedConn::queue_frame_parts`).
/// With [`BodyCheck::Crc32c`] the body CRC is computed over both pieces.
pub fn get_reply_head_into(
    out: &mut Vec<u8>,
    check: BodyCheck,
    version: u16,
    request_id: u64,
    chunk: Option<(Codec, u32, &[u8])>,
) {
    let at = out.len();
    out.extend_from_slice(&[0u8; HEADER_BYTES]);
    write_get_reply_prefix(out, chunk.map(|(c, r, d)| (c, r, d.len())));
    let data = chunk.map_or(&[][..], |(_, _, d)| d);
    let prefix = &out[at + HEADER_BYTES..];
    let header = pieces_header(
        check,
        version,
        Opcode::GetReply,
        request_id,
        &[prefix, data],
    );
    out[at..at + HEADER_BYTES].copy_from_slice(&header);
}

/// The header of a frame whose body goes out as `pieces`, in order (not gathered into one
/// buffer); with [`BodyCheck::Crc32c`] the CRC covers them all.
fn pieces_header(
    check: BodyCheck,
    version: u16,
    opcode: Opcode,
    request_id: u64,
    pieces: &[&[u8]],
) -> [u8; HEADER_BYTES] {
    let (body_crc32c, flags) = match check {
        BodyCheck::Crc32c => (crate::crc32c_parts(pieces), 0),
        BodyCheck::Transport => (0, FLAG_BODY_UNCHECKED),
    };
    let body_len: usize = pieces.iter().map(|p| p.len()).sum();
    FrameHeader {
        version,
        opcode: opcode as u16,
        request_id,
        body_len: u32::try_from(body_len).unwrap_or(u32::MAX),
        body_crc32c,
        flags,
    }
    .to_bytes()
}

/// Append a `Put` request frame for borrowed chunks to `out`, encoding the body in place
/// (no clone of the chunks, no intermediate body buffer).
#[cfg(test)]
pub(crate) fn frame_put_into(
    out: &mut Vec<u8>,
    check: BodyCheck,
    version: u16,
    request_id: u64,
    level: u8,
    chunks: &[&PutChunk],
) {
    let op = Opcode::Put as u16;
    encode_frame_checked_with(out, check, version, op, request_id, |body| {
        write_put_body(body, level, chunks.iter().copied())
    });
}

/// A `Put` request frame for borrowed chunks as pieces, so TLS encrypts the chunks' bytes
/// where they are instead of after a copy into one frame buffer. `heads` gets everything
/// but the chunks' data: the frame header, the level and count, and each chunk's own
/// header (id, codec, raw length, data length); `ends[i]` is where the piece before chunk
/// `i`'s data ends in `heads`. [`put_frame_parts`] interleaves them into exactly the frame
/// `Request::Put` encodes to. With [`BodyCheck::Crc32c`] the CRC covers every piece.
pub fn put_frame_heads(
    heads: &mut Vec<u8>,
    ends: &mut Vec<usize>,
    check: BodyCheck,
    version: u16,
    request_id: u64,
    level: u8,
    chunks: &[&PutChunk],
) {
    heads.clear();
    ends.clear();
    let mut w = Writer(std::mem::take(heads));
    w.0.extend_from_slice(&[0u8; HEADER_BYTES]);
    let refs = chunks
        .iter()
        .map(|c| (c.id, c.codec, c.raw_len, &c.data[..]));
    write_put_layout(&mut w, level, refs, |w, _| ends.push(w.0.len()));
    *heads = w.0;
    let mut pieces = put_frame_parts(heads, ends, chunks);
    pieces[0] = &pieces[0][HEADER_BYTES..];
    let header = pieces_header(check, version, Opcode::Put, request_id, &pieces);
    heads[..HEADER_BYTES].copy_from_slice(&header);
}

/// The pieces of a `Put` frame made by [`put_frame_heads`], in order.
pub fn put_frame_parts<'a>(
    heads: &'a [u8],
    ends: &[usize],
    chunks: &[&'a PutChunk],
) -> Vec<&'a [u8]> {
    let mut parts = Vec::with_capacity(2 * chunks.len() + 1);
    let mut from = 0;
    for (end, c) in ends.iter().zip(chunks) {
        parts.push(&heads[from..*end]);
        parts.push(&c.data[..]);
        from = *end;
    }
    if from < heads.len() || parts.is_empty() {
        parts.push(&heads[from..]);
    }
    parts
}

/// A response as one frame (echo the request's id).
pub fn frame_response(version: u16, request_id: u64, resp: &Response) -> Vec<u8> {
    let (op, body) = resp.encode();
    encode_frame(version, op as u16, request_id, &body)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn put_frame_pieces_are_the_put_frame() {
        let chunks: Vec<PutChunk> = (0..3u8)
            .map(|i| PutChunk {
                id: ChunkId([i; CHUNK_ID_BYTES]),
                codec: Codec::Raw,
                raw_len: 100 * i as u32,
                data: vec![i; 100 * i as usize],
            })
            .collect();
        let refs: Vec<&PutChunk> = chunks.iter().collect();
        let (mut heads, mut ends) = (Vec::new(), Vec::new());
        for n in [0, 1, 3] {
            for check in [BodyCheck::Crc32c, BodyCheck::Transport] {
                let mut whole = Vec::new();
                frame_put_into(&mut whole, check, 2, 9, 3, &refs[..n]);
                put_frame_heads(&mut heads, &mut ends, check, 2, 9, 3, &refs[..n]);
                let parts = put_frame_parts(&heads, &ends, &refs[..n]);
                assert_eq!(parts.concat(), whole, "{n} chunks, {check:?}");
            }
        }
    }

    #[test]
    fn in_place_frames_match_the_message_encoders() {
        let data = vec![9u8; 3000];
        let mut a = Vec::new();
        get_reply_head_into(
            &mut a,
            BodyCheck::Crc32c,
            1,
            77,
            Some((Codec::Lz4, 5000, &data)),
        );
        a.extend_from_slice(&data);
        let b = frame_response(
            1,
            77,
            &Response::GetReply {
                chunk: Some((Codec::Lz4, 5000, data.clone())),
            },
        );
        assert_eq!(a, b);
        let mut a = Vec::new();
        get_reply_head_into(&mut a, BodyCheck::Crc32c, 1, 78, None);
        assert_eq!(
            a,
            frame_response(1, 78, &Response::GetReply { chunk: None })
        );
        let c = PutChunk {
            id: ChunkId([3; 33]),
            codec: Codec::Raw,
            raw_len: 4,
            data: vec![1, 2, 3, 4],
        };
        let mut a = Vec::new();
        frame_put_into(&mut a, BodyCheck::Crc32c, 1, 79, 2, &[&c, &c]);
        assert_eq!(
            a,
            frame_request(
                1,
                79,
                &Request::Put {
                    level: 2,
                    chunks: vec![c.clone(), c.clone()]
                }
            )
        );
        let mut a = Vec::new();
        let r = (c.id, c.codec, c.raw_len, &c.data[..]);
        frame_replicate_into(&mut a, BodyCheck::Crc32c, 1, 80, 5, 3, &[r, r]);
        let replicate = Request::Replicate {
            hint_for: 5,
            level: 3,
            chunks: vec![c.clone(), c],
        };
        assert_eq!(a, frame_request(1, 80, &replicate));
    }

    const KEY: DedupeKey = DedupeKey([9u8; 32]);

    fn id(n: u32) -> ChunkId {
        ChunkId::compute(&KEY, &n.to_le_bytes())
    }

    pub(crate) fn sample_requests() -> Vec<Request> {
        vec![
            Request::Hello {
                min_version: 1,
                max_version: 1,
                token: "s3cr3t".into(),
                client_name: "backup-01".into(),
            },
            Request::Has {
                level: 3,
                ids: (0..100).map(id).collect(),
            },
            Request::Has {
                level: 1,
                ids: vec![],
            },
            Request::Put {
                level: 2,
                chunks: vec![
                    PutChunk {
                        id: id(1),
                        codec: Codec::Raw,
                        raw_len: 3,
                        data: b"abc".to_vec(),
                    },
                    PutChunk {
                        id: id(2),
                        codec: Codec::Zstd,
                        raw_len: 5000,
                        data: vec![7; 40],
                    },
                ],
            },
            Request::Get { id: id(5) },
            Request::Stats,
            Request::Map,
            Request::HiveMap,
            Request::Replicate {
                hint_for: 3,
                level: 8,
                chunks: vec![PutChunk {
                    id: id(4),
                    codec: Codec::Lz4,
                    raw_len: 9,
                    data: b"xyz".to_vec(),
                }],
            },
        ]
    }

    pub(crate) fn sample_map() -> ClusterMap {
        ClusterMap {
            epoch: 42,
            node_id: "node-a".into(),
            bucket_count: 16,
            shard_count: 2,
            base_port: 7400,
            dedupe_key: KEY,
            bucket_to_shard: (0..16).map(|b| (b % 2) as u16).collect(),
        }
    }

    pub(crate) fn sample_responses() -> Vec<Response> {
        vec![
            Response::HelloOk {
                version: 1,
                node_id: "node-a".into(),
                shard: 1,
                shard_count: 2,
                credits: 64,
            },
            Response::error(ErrorCode::WrongShard, "go elsewhere"),
            Response::HasReply {
                claim_epoch: 7,
                present: vec![true, false, true],
            },
            Response::PutReply {
                claim_epoch: 8,
                results: vec![PutResult::Stored, PutResult::Duplicate, PutResult::Rejected],
            },
            Response::GetReply { chunk: None },
            Response::GetReply {
                chunk: Some((Codec::Lz4, 100, vec![1, 2, 3])),
            },
            Response::StatsReply {
                json: "{\"chunks\":1}".into(),
            },
            Response::MapReply { map: sample_map() },
            Response::HiveMapReply {
                map: crate::placement::HiveMap {
                    epoch: 3,
                    bucket_count: 16,
                    nodes: vec![crate::placement::MapNode {
                        id: 1,
                        name: "n1".into(),
                        host: "127.0.0.1".into(),
                        meta_port: 7399,
                        base_port: 7400,
                        shards: 2,
                        weight: 1,
                        zone: "z".into(),
                        state: crate::placement::NodeState::Up,
                    }],
                },
            },
        ]
    }

    #[test]
    fn requests_roundtrip() {
        for req in sample_requests() {
            let (op, body) = req.encode();
            assert!(op.is_request());
            assert_eq!(Request::decode(op as u16, &body).unwrap(), req);
            assert_eq!(
                Response::decode(op as u16, &body),
                Err(DecodeError::UnexpectedOpcode(op as u16))
            );
        }
    }

    #[test]
    fn responses_roundtrip() {
        for resp in sample_responses() {
            let (op, body) = resp.encode();
            assert!(!op.is_request());
            assert_eq!(Response::decode(op as u16, &body).unwrap(), resp);
            assert!(Request::decode(op as u16, &body).is_err());
        }
    }

    #[test]
    fn opcodes_and_codes_are_stable() {
        for v in 0..=u16::MAX {
            if let Some(op) = Opcode::from_u16(v) {
                assert_eq!(op as u16, v);
            }
            if let Some(c) = ErrorCode::from_u16(v) {
                assert_eq!(c as u16, v);
            }
        }
        assert_eq!(Opcode::MapReply as u16, 19);
        assert_eq!(ErrorCode::WrongShard as u16, 13);
        assert_eq!(ErrorCode::NoSpace as u16, 14);
    }

    #[test]
    fn unknown_opcode() {
        let e = Request::decode(999, &[]).unwrap_err();
        assert_eq!(e, DecodeError::UnknownOpcode(999));
        assert_eq!(e.code(), ErrorCode::UnknownOpcode);
        assert_eq!(Response::decode(4, &[]), Err(DecodeError::UnknownOpcode(4)));
    }

    #[test]
    fn trailing_bytes() {
        for req in sample_requests() {
            let (op, mut body) = req.encode();
            body.push(0);
            assert_eq!(
                Request::decode(op as u16, &body),
                Err(DecodeError::TrailingBytes(1))
            );
        }
        for resp in sample_responses() {
            let (op, mut body) = resp.encode();
            body.extend_from_slice(&[1, 2]);
            assert_eq!(
                Response::decode(op as u16, &body),
                Err(DecodeError::TrailingBytes(2))
            );
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        for req in sample_requests() {
            let (op, body) = req.encode();
            for cut in 0..body.len() {
                assert!(
                    Request::decode(op as u16, &body[..cut]).is_err(),
                    "{req:?} cut at {cut}"
                );
            }
        }
        for resp in sample_responses() {
            let (op, body) = resp.encode();
            for cut in 0..body.len() {
                assert!(
                    Response::decode(op as u16, &body[..cut]).is_err(),
                    "{resp:?} cut at {cut}"
                );
            }
        }
    }

    #[test]
    fn oversize_batch_counts_are_refused_before_allocating() {
        let mut body = vec![1u8]; // level
        body.extend_from_slice(&(MAX_BATCH_IDS as u32 + 1).to_le_bytes());
        body.extend_from_slice(&[0; CHUNK_ID_BYTES]);
        let e = Request::decode(Opcode::Has as u16, &body).unwrap_err();
        assert_eq!(
            e,
            DecodeError::TooLong {
                what: "has ids",
                len: MAX_BATCH_IDS + 1,
                limit: MAX_BATCH_IDS
            }
        );
        assert_eq!(e.code(), ErrorCode::TooLarge);
        // A count within the limit that the body cannot hold.
        let mut body = vec![1u8];
        body.extend_from_slice(&8000u32.to_le_bytes());
        assert!(matches!(
            Request::decode(Opcode::Has as u16, &body),
            Err(DecodeError::Truncated { .. })
        ));
        let mut body = vec![1u8];
        body.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Request::decode(Opcode::Put as u16, &body),
            Err(DecodeError::TooLong { .. })
        ));
        let mut body = 7u64.to_le_bytes().to_vec();
        body.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Response::decode(Opcode::HasReply as u16, &body),
            Err(DecodeError::TooLong { .. })
        ));
    }

    #[test]
    fn oversize_strings_and_chunks() {
        let long = "x".repeat(MAX_TOKEN_BYTES + 1);
        let (op, body) = Request::Hello {
            min_version: 1,
            max_version: 1,
            token: long,
            client_name: "c".into(),
        }
        .encode();
        assert!(matches!(
            Request::decode(op as u16, &body),
            Err(DecodeError::TooLong { what: "token", .. })
        ));
        // A declared 4 GiB string with no bytes behind it.
        let mut body = vec![1, 0, 1, 0];
        body.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Request::decode(Opcode::Hello as u16, &body),
            Err(DecodeError::TooLong { .. })
        ));
        let big = PutChunk {
            id: id(1),
            codec: Codec::Raw,
            raw_len: MAX_CHUNK_RAW_BYTES as u32 + 1,
            data: vec![],
        };
        let (op, body) = Request::Put {
            level: 1,
            chunks: vec![big],
        }
        .encode();
        assert!(matches!(
            Request::decode(op as u16, &body),
            Err(DecodeError::TooLong {
                what: "chunk raw length",
                ..
            })
        ));
        let mut json = String::from("\"");
        json.push_str(&"a".repeat(MAX_STATS_JSON_BYTES));
        let (op, body) = Response::StatsReply { json }.encode();
        assert!(matches!(
            Response::decode(op as u16, &body),
            Err(DecodeError::TooLong { .. })
        ));
    }

    #[test]
    fn bad_enum_values() {
        let (op, mut body) = Request::Put {
            level: 1,
            chunks: vec![PutChunk {
                id: id(1),
                codec: Codec::Raw,
                raw_len: 1,
                data: vec![1],
            }],
        }
        .encode();
        body[PUT_BODY_HEADER_BYTES + CHUNK_ID_BYTES] = 9;
        assert_eq!(
            Request::decode(op as u16, &body),
            Err(DecodeError::UnknownCodec(9))
        );
        // Levels: 1 to MAX_LEVEL.
        for bad in [0, MAX_LEVEL + 1] {
            body[0] = bad;
            assert_eq!(
                Request::decode(op as u16, &body),
                Err(DecodeError::BadValue {
                    what: "level",
                    value: bad as u64
                })
            );
        }
        let (op, mut body) = Response::error(ErrorCode::NotFound, "no").encode();
        body[0] = 200;
        let e = Response::decode(op as u16, &body).unwrap_err();
        assert_eq!(e, DecodeError::UnknownErrorCode(200));
        assert_eq!(e.code(), ErrorCode::BadRequest);
        let (op, mut body) = Response::HasReply {
            claim_epoch: 1,
            present: vec![true],
        }
        .encode();
        body[12] = 2;
        assert!(matches!(
            Response::decode(op as u16, &body),
            Err(DecodeError::BadValue { .. })
        ));
        let (op, mut body) = Response::PutReply {
            claim_epoch: 1,
            results: vec![PutResult::Stored],
        }
        .encode();
        body[12] = 3;
        assert!(matches!(
            Response::decode(op as u16, &body),
            Err(DecodeError::BadValue { .. })
        ));
        let (op, body) = Request::Hello {
            min_version: 1,
            max_version: 1,
            token: "t".into(),
            client_name: "c".into(),
        }
        .encode();
        let mut bad = body.clone();
        bad[8] = 0xff; // the token's one byte
        assert_eq!(
            Request::decode(op as u16, &bad),
            Err(DecodeError::BadUtf8("token"))
        );
    }

    #[test]
    fn error_messages_are_cut_to_the_limit() {
        let r = Response::error(ErrorCode::Internal, "é".repeat(MAX_ERROR_MESSAGE_BYTES));
        let (op, body) = r.encode();
        match Response::decode(op as u16, &body).unwrap() {
            Response::Error { message, .. } => assert!(
                message.len() <= MAX_ERROR_MESSAGE_BYTES
                    && message.len() >= MAX_ERROR_MESSAGE_BYTES - 1
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn cluster_map_validation_and_shard_of() {
        let map = sample_map();
        let mut seen = [0u32; 2];
        for n in 0..1000 {
            let i = id(n);
            let s = map.shard_of(&i);
            assert_eq!(s, map.bucket_to_shard[i.bucket(16) as usize]);
            seen[s as usize] += 1;
        }
        assert!(seen[0] > 300 && seen[1] > 300);
        for bad in [
            ClusterMap {
                bucket_count: 12,
                bucket_to_shard: vec![0; 12],
                ..sample_map()
            },
            ClusterMap {
                bucket_count: 0,
                bucket_to_shard: vec![],
                ..sample_map()
            },
            ClusterMap {
                shard_count: 0,
                ..sample_map()
            },
            ClusterMap {
                bucket_to_shard: vec![2; 16],
                ..sample_map()
            },
            ClusterMap {
                bucket_to_shard: vec![0; 8],
                ..sample_map()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
            let _ = bad.shard_of(&id(1)); // never panics
            let (op, body) = Response::MapReply { map: bad }.encode();
            assert!(Response::decode(op as u16, &body).is_err());
        }
    }

    #[test]
    fn put_size_accounting_matches_encoding() {
        let req = sample_requests().swap_remove(3);
        let Request::Put { chunks, .. } = &req else {
            unreachable!()
        };
        let expect =
            PUT_BODY_HEADER_BYTES + chunks.iter().map(PutChunk::encoded_len).sum::<usize>();
        assert_eq!(req.encode().1.len(), expect);
    }

    #[test]
    fn framed_messages_decode() {
        let bytes = frame_request(2, 77, &Request::Stats);
        let mut d = crate::frame::FrameDecoder::new();
        assert_eq!(d.push(&bytes), bytes.len());
        let f = d.pop().unwrap().unwrap();
        assert_eq!(
            (f.request_id, Request::decode(f.opcode, &f.body).unwrap()),
            (77, Request::Stats)
        );
        let bytes = frame_response(2, 78, &Response::StatsReply { json: "{}".into() });
        assert_eq!(d.push(&bytes), bytes.len());
        let f = d.pop().unwrap().unwrap();
        assert_eq!(
            Response::decode(f.opcode, &f.body).unwrap(),
            Response::StatsReply { json: "{}".into() }
        );
    }
}
