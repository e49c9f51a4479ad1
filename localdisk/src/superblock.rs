//! The superblock: block 0 of a client disk.
//!
//! ```text
//! magic "HIVECLNT" | version u32 | body length u32 | body | CRC32C u32 of all before it
//! body: client id u64, created (unix s) u64, flags u32 (bit 0: plain TCP),
//!       capacity u64, journal offset u64 + length u64, cache offset u64 + length u64,
//!       volume str, CA fingerprint str, endpoint count u16, endpoints str...
//! str: length u16 + UTF-8 bytes
//! ```
//!
//! Invariants:
//! - Every length is checked against [`MAX_STR`], [`MAX_ENDPOINTS`] and the block before
//!   anything is allocated; the CRC covers every byte before it.
//! - Decoding tells *not formatted* (all zeros), *foreign* (another magic), *newer
//!   version* and *damaged* (bad CRC or bounds) apart, so `hi` can say which; it never
//!   rewrites a superblock it could not read (`hi format --force` is the only way).
//! - No credential is ever stored here.

use hivefs_nvme::BLOCK_SIZE;

pub const MAGIC: &[u8; 8] = b"HIVECLNT";
pub const VERSION: u32 = 1;
/// Longest string field (volume, fingerprint, one endpoint).
pub const MAX_STR: usize = 255;
/// Most hive endpoints kept.
pub const MAX_ENDPOINTS: usize = 8;
/// The control slots (blocks 1 and 2) and the superblock before them.
pub const HEADER_BLOCKS: u64 = 3;
/// Smallest journal region (a record of a 1 MiB write fits a quarter of it).
pub const MIN_JOURNAL: u64 = 8 << 20;

const FLAG_INSECURE: u32 = 1;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SuperblockError {
    #[error("not a HiveFS client disk: no superblock (all zeros); format it with `hi format`")]
    NotFormatted,
    #[error("not a HiveFS client disk: block 0 holds something else (magic {0:02x?}); refusing to touch it (`hi format --force` overwrites it)")]
    Foreign([u8; 8]),
    #[error("superblock version {0} is newer than this hi understands ({VERSION})")]
    NewerVersion(u32),
    #[error("damaged superblock: {0}")]
    Damaged(String),
    #[error("bad layout: {0}")]
    BadLayout(String),
}

/// Where the regions of a client disk lie (bytes; multiples of [`BLOCK_SIZE`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub capacity: u64,
    pub journal_offset: u64,
    pub journal_len: u64,
    pub cache_offset: u64,
    pub cache_len: u64,
}

impl Layout {
    /// The control slots, then a journal of `journal_len`, then a cache of `cache_len`.
    pub fn new(journal_len: u64, cache_len: u64) -> Result<Layout, SuperblockError> {
        let b = BLOCK_SIZE as u64;
        let l = Layout {
            capacity: 0,
            journal_offset: HEADER_BLOCKS * b,
            journal_len: journal_len / b * b,
            cache_offset: 0,
            cache_len: cache_len / b * b,
        };
        let cache_offset = l.journal_offset + l.journal_len;
        let l = Layout {
            cache_offset,
            capacity: cache_offset + l.cache_len,
            ..l
        };
        l.check()?;
        Ok(l)
    }

    /// Offsets of the two control slots.
    pub fn control_slots(&self) -> [u64; 2] {
        let b = BLOCK_SIZE as u64;
        [b, 2 * b]
    }

    fn check(&self) -> Result<(), SuperblockError> {
        let b = BLOCK_SIZE as u64;
        let bad = |m: String| Err(SuperblockError::BadLayout(m));
        if [
            self.journal_offset,
            self.journal_len,
            self.cache_offset,
            self.cache_len,
        ]
        .iter()
        .any(|v| !v.is_multiple_of(b))
        {
            return bad(format!("regions not aligned to {b}: {self:?}"));
        }
        if self.journal_len < MIN_JOURNAL {
            return bad(format!(
                "journal of {} bytes is below the minimum {MIN_JOURNAL}",
                self.journal_len
            ));
        }
        if self.journal_offset < HEADER_BLOCKS * b
            || self.cache_offset < self.journal_offset + self.journal_len
            || self.cache_offset.checked_add(self.cache_len).is_none()
            || self.cache_offset + self.cache_len > self.capacity
        {
            return bad(format!("regions overlap or pass the end: {self:?}"));
        }
        Ok(())
    }
}

/// What block 0 says. See the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// This host's client id: the same across mounts, so its write leases and its
    /// exactly-once mutations outlive a crash of `hi`.
    pub client_id: u64,
    pub created_unix: u64,
    /// The hive's metadata endpoints, `HOST:PORT`.
    pub hive: Vec<String>,
    /// The pinned hive CA fingerprint; `None`: plain TCP (`--insecure` nodes).
    pub ca: Option<String>,
    pub volume: String,
    pub layout: Layout,
}

struct Writer(Vec<u8>);

impl Writer {
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn str(&mut self, s: &str) {
        self.u16(s.len() as u16);
        self.0.extend_from_slice(s.as_bytes());
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], SuperblockError> {
        if self.b.len() - self.at < n {
            return Err(SuperblockError::Damaged("body ends early".into()));
        }
        self.at += n;
        Ok(&self.b[self.at - n..self.at])
    }
    fn u16(&mut self) -> Result<u16, SuperblockError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, SuperblockError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, SuperblockError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn str(&mut self) -> Result<String, SuperblockError> {
        let n = self.u16()? as usize;
        if n > MAX_STR {
            return Err(SuperblockError::Damaged(format!(
                "string of {n} bytes (most {MAX_STR})"
            )));
        }
        String::from_utf8(self.take(n)?.to_vec())
            .map_err(|_| SuperblockError::Damaged("string is not UTF-8".into()))
    }
}

impl Superblock {
    /// Refuse what could not be stored or read back.
    pub fn validate(&self) -> Result<(), SuperblockError> {
        let strs = self
            .hive
            .iter()
            .chain([&self.volume])
            .chain(self.ca.as_ref());
        for s in strs {
            if s.len() > MAX_STR {
                return Err(SuperblockError::BadLayout(format!(
                    "{s:?} is longer than {MAX_STR} bytes"
                )));
            }
        }
        if self.hive.is_empty() || self.hive.len() > MAX_ENDPOINTS {
            return Err(SuperblockError::BadLayout(format!(
                "1 to {MAX_ENDPOINTS} hive endpoints, not {}",
                self.hive.len()
            )));
        }
        if self.volume.is_empty() {
            return Err(SuperblockError::BadLayout("no volume".into()));
        }
        self.layout.check()
    }

    /// The block 0 image.
    pub fn encode(&self) -> Result<Vec<u8>, SuperblockError> {
        self.validate()?;
        let mut w = Writer(Vec::with_capacity(BLOCK_SIZE));
        w.u64(self.client_id);
        w.u64(self.created_unix);
        w.u32(if self.ca.is_none() { FLAG_INSECURE } else { 0 });
        let l = &self.layout;
        for v in [
            l.capacity,
            l.journal_offset,
            l.journal_len,
            l.cache_offset,
            l.cache_len,
        ] {
            w.u64(v);
        }
        w.str(&self.volume);
        w.str(self.ca.as_deref().unwrap_or(""));
        w.u16(self.hive.len() as u16);
        for h in &self.hive {
            w.str(h);
        }
        let body = w.0;
        let mut out = Vec::with_capacity(BLOCK_SIZE);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        let crc = crc_fast::crc32_iscsi(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        assert!(
            out.len() <= BLOCK_SIZE,
            "bounded by MAX_STR and MAX_ENDPOINTS"
        );
        out.resize(BLOCK_SIZE, 0);
        Ok(out)
    }

    /// Read block 0 (at least 16 bytes; its first [`BLOCK_SIZE`] are looked at).
    pub fn decode(block: &[u8]) -> Result<Superblock, SuperblockError> {
        let block = &block[..block.len().min(BLOCK_SIZE)];
        if block.len() < 20 {
            return Err(SuperblockError::Damaged("shorter than a header".into()));
        }
        if block.iter().all(|&b| b == 0) {
            return Err(SuperblockError::NotFormatted);
        }
        let magic: [u8; 8] = block[..8].try_into().expect("8");
        if &magic != MAGIC {
            return Err(SuperblockError::Foreign(magic));
        }
        let version = u32::from_le_bytes(block[8..12].try_into().expect("4"));
        if version > VERSION {
            return Err(SuperblockError::NewerVersion(version));
        }
        let len = u32::from_le_bytes(block[12..16].try_into().expect("4")) as usize;
        if len > block.len() - 20 {
            return Err(SuperblockError::Damaged(format!(
                "body length {len} does not fit the block"
            )));
        }
        let end = 16 + len;
        let want = u32::from_le_bytes(block[end..end + 4].try_into().expect("4"));
        let got = crc_fast::crc32_iscsi(&block[..end]);
        if want != got {
            return Err(SuperblockError::Damaged(format!(
                "checksum {got:08x}, expected {want:08x}"
            )));
        }
        let mut r = Reader {
            b: &block[16..end],
            at: 0,
        };
        let client_id = r.u64()?;
        let created_unix = r.u64()?;
        let flags = r.u32()?;
        let layout = Layout {
            capacity: r.u64()?,
            journal_offset: r.u64()?,
            journal_len: r.u64()?,
            cache_offset: r.u64()?,
            cache_len: r.u64()?,
        };
        let volume = r.str()?;
        let ca = r.str()?;
        let n = r.u16()? as usize;
        if n > MAX_ENDPOINTS {
            return Err(SuperblockError::Damaged(format!("{n} endpoints")));
        }
        let mut hive = Vec::with_capacity(n);
        for _ in 0..n {
            hive.push(r.str()?);
        }
        let sb = Superblock {
            client_id,
            created_unix,
            hive,
            ca: (flags & FLAG_INSECURE == 0).then_some(ca),
            volume,
            layout,
        };
        sb.validate()
            .map_err(|e| SuperblockError::Damaged(e.to_string()))?;
        Ok(sb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Superblock {
        Superblock {
            client_id: 0x1234_5678_9abc_def1,
            created_unix: 1_790_000_000,
            hive: vec!["127.0.0.1:7000".into(), "10.0.0.2:7000".into()],
            ca: Some("ab".repeat(32)),
            volume: "default".into(),
            layout: Layout::new(64 << 20, 256 << 20).unwrap(),
        }
    }

    #[test]
    fn a_superblock_reads_back_and_every_damage_is_named() {
        let sb = sample();
        let img = sb.encode().unwrap();
        assert_eq!(Superblock::decode(&img).unwrap(), sb);
        let insecure = Superblock {
            ca: None,
            ..sample()
        };
        assert_eq!(
            Superblock::decode(&insecure.encode().unwrap()).unwrap(),
            insecure
        );
        assert_eq!(
            Superblock::decode(&[0u8; BLOCK_SIZE]),
            Err(SuperblockError::NotFormatted)
        );
        let mut ext4 = vec![0u8; BLOCK_SIZE];
        ext4[..8].copy_from_slice(b"\x53\xef\x01\x00abcd");
        assert!(matches!(
            Superblock::decode(&ext4),
            Err(SuperblockError::Foreign(_))
        ));
        let mut newer = img.clone();
        newer[8] = 9;
        assert_eq!(
            Superblock::decode(&newer),
            Err(SuperblockError::NewerVersion(9))
        );
        // Every single flipped bit of the header and body is caught.
        let used = 16 + u32::from_le_bytes(img[12..16].try_into().unwrap()) as usize + 4;
        for bit in 64..used * 8 {
            let mut bad = img.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            let r = Superblock::decode(&bad);
            assert!(r.is_err(), "bit {bit} flipped went unnoticed");
        }
        // A body length past the block is refused before it is used.
        let mut long = img.clone();
        long[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Superblock::decode(&long),
            Err(SuperblockError::Damaged(_))
        ));
    }

    #[test]
    fn layouts_that_cannot_hold_are_refused() {
        assert!(Layout::new(1 << 20, 0).is_err());
        let l = Layout::new(MIN_JOURNAL, 0).unwrap();
        assert_eq!(l.capacity, HEADER_BLOCKS * 4096 + MIN_JOURNAL);
        let mut sb = sample();
        sb.volume = "v".repeat(300);
        assert!(sb.encode().is_err());
        let mut sb = sample();
        sb.hive = vec!["h:1".into(); MAX_ENDPOINTS + 1];
        assert!(sb.encode().is_err());
    }
}
