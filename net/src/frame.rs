//! Framing: every message travels as one frame, a fixed 32-byte little-endian header
//! followed by the body.
//!
//! | offset | size | field                                       |
//! |-------:|-----:|---------------------------------------------|
//! | 0      | 4    | magic `0x5346_5648` (the bytes `"HVFS"`)    |
//! | 4      | 2    | protocol version                            |
//! | 6      | 2    | opcode ([`crate::proto::Opcode`])           |
//! | 8      | 8    | request id (a response echoes its request's)|
//! | 16     | 4    | body length                                 |
//! | 20     | 4    | CRC32C of the body, or 0 (see flags)        |
//! | 24     | 4    | CRC32C of bytes 0..24 and 28..32            |
//! | 28     | 4    | flags                                       |
//!
//! The header checksum covers every other header byte. One flag is defined,
//! [`FLAG_BODY_UNCHECKED`]: the body carries no CRC because the transport authenticates
//! every byte (TLS: an AEAD tag per record, far stronger than CRC32C). A receiver accepts it
//! only on a connection it knows to be authenticated
//! ([`FrameDecoder::set_authenticated_transport`]); on plain TCP the flag is a framing error,
//! so a body is never taken unchecked from a transport that does not check it. Other flag
//! bits must be 0. Senders use it only for the large bodies (puts and get replies), where
//! the second pass over the bytes costs measurably.
//!
//! [`FrameDecoder`] is incremental (push bytes, pop frames). It validates a header
//! completely (magic, header checksum, flags, version, body length) before it
//! reserves any room for the body, checks the body checksum once the body is in, and never
//! holds more than [`MAX_FRAME_BYTES`] (one maximal frame, header included).

use crate::proto::ErrorCode;

/// Frame magic: the little-endian bytes `"HVFS"`.
pub const MAGIC: u32 = 0x5346_5648;
/// Lowest protocol version this build speaks. Version 2 added levels to `Has` and `Put`
/// (see `proto.rs`); version 1 peers are refused at the first frame, by version.
pub const PROTOCOL_VERSION_MIN: u16 = 2;
/// Highest protocol version this build speaks. Version 3 is version 2 plus the metadata
/// commands a version-2 build cannot decode ([`crate::meta::Mutation::log_version`]): a
/// peer that negotiated 3 can read them in requests and in the metadata log.
pub const PROTOCOL_VERSION_MAX: u16 = 3;
/// Bytes in a frame header.
pub const HEADER_BYTES: usize = 32;
/// The largest body any peer accepts (16 MiB).
pub const MAX_BODY_BYTES: usize = 16 << 20;
/// The largest frame, header included: also the most a [`FrameDecoder`] ever buffers.
pub const MAX_FRAME_BYTES: usize = HEADER_BYTES + MAX_BODY_BYTES;

/// The header checksum covers bytes `0..24` and the flags word at `28..32`.
const HEADER_CRC_AT: usize = 24;
/// Header flag: the body has no CRC; the transport authenticates it (see the module docs).
pub const FLAG_BODY_UNCHECKED: u32 = 1;
const KNOWN_FLAGS: u32 = FLAG_BODY_UNCHECKED;

fn header_crc(h: &[u8; HEADER_BYTES]) -> u32 {
    crate::crc32c_parts(&[&h[..HEADER_CRC_AT], &h[HEADER_CRC_AT + 4..]])
}

/// Recompute the header checksum of `frame` (at least [`HEADER_BYTES`] long) after its
/// header fields were edited: for tests and tools that build bad frames on purpose.
pub fn reseal_header(frame: &mut [u8]) {
    let mut h = [0u8; HEADER_BYTES];
    h.copy_from_slice(&frame[..HEADER_BYTES]);
    frame[24..28].copy_from_slice(&header_crc(&h).to_le_bytes());
}

/// How a frame's body is protected on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyCheck {
    /// CRC32C of the body in the header (plain TCP; any transport).
    Crc32c,
    /// No body CRC: the transport authenticates every byte (TLS only).
    Transport,
}

/// Why a byte stream is not a valid sequence of frames. Every one of these ends the
/// connection: after it the stream cannot be resynchronised.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("bad frame magic {0:#010x}")]
    BadMagic(u32),
    #[error("frame header checksum mismatch")]
    BadHeaderChecksum,
    #[error("frame body checksum mismatch")]
    BadBodyChecksum,
    #[error("unsupported protocol version {0} (this build speaks {PROTOCOL_VERSION_MIN}..={PROTOCOL_VERSION_MAX})")]
    UnsupportedVersion(u16),
    #[error("frame body of {0} bytes exceeds the limit of {MAX_BODY_BYTES}")]
    TooLarge(u32),
    #[error("unknown frame flags {0:#x}")]
    UnknownFlags(u32),
    #[error("frame body sent without a checksum on a transport that does not authenticate it")]
    UncheckedBody,
    #[error("stream ended inside a frame ({buffered} bytes of an incomplete frame)")]
    Truncated { buffered: usize },
}

impl FrameError {
    /// The [`ErrorCode`] to report to the peer before closing.
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::BadMagic(_)
            | FrameError::UnknownFlags(_)
            | FrameError::UncheckedBody
            | FrameError::Truncated { .. } => ErrorCode::BadFrame,
            FrameError::BadHeaderChecksum | FrameError::BadBodyChecksum => ErrorCode::BadChecksum,
            FrameError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            FrameError::TooLarge(_) => ErrorCode::TooLarge,
        }
    }
}

/// A validated frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub version: u16,
    pub opcode: u16,
    pub request_id: u64,
    pub body_len: u32,
    pub body_crc32c: u32,
    pub flags: u32,
}

impl FrameHeader {
    /// The 32 header bytes, checksums filled in.
    pub fn to_bytes(&self) -> [u8; HEADER_BYTES] {
        let mut h = [0u8; HEADER_BYTES];
        h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        h[4..6].copy_from_slice(&self.version.to_le_bytes());
        h[6..8].copy_from_slice(&self.opcode.to_le_bytes());
        h[8..16].copy_from_slice(&self.request_id.to_le_bytes());
        h[16..20].copy_from_slice(&self.body_len.to_le_bytes());
        h[20..24].copy_from_slice(&self.body_crc32c.to_le_bytes());
        h[28..32].copy_from_slice(&self.flags.to_le_bytes());
        let crc = header_crc(&h);
        h[24..28].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Parse and validate a header: magic, header checksum, flags, version and body
    /// length, in that order. Touches nothing but the 32 bytes.
    pub fn parse(h: &[u8; HEADER_BYTES]) -> Result<FrameHeader, FrameError> {
        let u16_at = |i: usize| u16::from_le_bytes([h[i], h[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let magic = u32_at(0);
        if magic != MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        if header_crc(h) != u32_at(24) {
            return Err(FrameError::BadHeaderChecksum);
        }
        let flags = u32_at(28);
        if flags & !KNOWN_FLAGS != 0 {
            return Err(FrameError::UnknownFlags(flags));
        }
        let version = u16_at(4);
        if !(PROTOCOL_VERSION_MIN..=PROTOCOL_VERSION_MAX).contains(&version) {
            return Err(FrameError::UnsupportedVersion(version));
        }
        let body_len = u32_at(16);
        if body_len as usize > MAX_BODY_BYTES {
            return Err(FrameError::TooLarge(body_len));
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&h[8..16]);
        Ok(FrameHeader {
            version,
            opcode: u16_at(6),
            request_id: u64::from_le_bytes(id),
            body_len,
            body_crc32c: u32_at(20),
            flags,
        })
    }
}

/// One decoded frame (header validated, body checksum verified).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub version: u16,
    pub opcode: u16,
    pub request_id: u64,
    pub body: Vec<u8>,
}

/// Buffers up to this size are kept when they drain, so a connection streaming 1 MiB
/// frames reuses one buffer instead of allocating (and page-faulting) one per frame.
pub const IDLE_BUFFER_KEEP_BYTES: usize = 4 << 20;

/// Append one frame to `out`.
///
/// Bodies over [`MAX_BODY_BYTES`] are encoded anyway but every peer rejects them
/// ([`FrameError::TooLarge`], from the header alone); senders keep batches within the limit.
/// A body over `u32::MAX` bytes is announced as `u32::MAX` bytes so that it, too, is
/// rejected rather than misparsed.
pub fn encode_frame_into(
    out: &mut Vec<u8>,
    version: u16,
    opcode: u16,
    request_id: u64,
    body: &[u8],
) {
    out.reserve(HEADER_BYTES + body.len());
    encode_frame_with(out, version, opcode, request_id, |o| {
        o.extend_from_slice(body)
    });
}

/// Append one frame whose body `write_body` appends to `out` directly: the body is built
/// in place, with no intermediate buffer (used for large puts and get replies).
pub fn encode_frame_with(
    out: &mut Vec<u8>,
    version: u16,
    opcode: u16,
    request_id: u64,
    write_body: impl FnOnce(&mut Vec<u8>),
) {
    encode_frame_checked_with(
        out,
        BodyCheck::Crc32c,
        version,
        opcode,
        request_id,
        write_body,
    )
}

/// [`encode_frame_with`], with the body protected as `check` says
/// ([`BodyCheck::Transport`] only on a TLS connection).
pub fn encode_frame_checked_with(
    out: &mut Vec<u8>,
    check: BodyCheck,
    version: u16,
    opcode: u16,
    request_id: u64,
    write_body: impl FnOnce(&mut Vec<u8>),
) {
    let at = out.len();
    out.extend_from_slice(&[0u8; HEADER_BYTES]);
    write_body(out);
    let body = &out[at + HEADER_BYTES..];
    let (body_crc32c, flags) = match check {
        BodyCheck::Crc32c => (crc_fast::crc32_iscsi(body), 0),
        BodyCheck::Transport => (0, FLAG_BODY_UNCHECKED),
    };
    let header = FrameHeader {
        version,
        opcode,
        request_id,
        body_len: u32::try_from(body.len()).unwrap_or(u32::MAX),
        body_crc32c,
        flags,
    };
    out[at..at + HEADER_BYTES].copy_from_slice(&header.to_bytes());
}

/// One frame as bytes. See [`encode_frame_into`].
pub fn encode_frame(version: u16, opcode: u16, request_id: u64, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES + body.len());
    encode_frame_into(&mut out, version, opcode, request_id, body);
    out
}

/// Bodies at least this long are received into their own buffer (see `FrameDecoder`).
const DIRECT_BODY_MIN: usize = 16 << 10;

/// Incremental frame decoder: [`push`](Self::push) bytes as they arrive,
/// [`pop`](Self::pop) complete frames.
///
/// It holds at most [`MAX_FRAME_BYTES`] bytes: `push` takes only what fits
/// ([`room`](Self::room)) and returns how much it took. Since no frame is larger than that,
/// a decoder that has room 0 always has a frame ready to pop. After an error every `pop`
/// returns the same error (the stream is out of sync).
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Start of the unconsumed bytes in `buf`.
    start: usize,
    /// The first frame's header, once validated.
    pending: Option<FrameHeader>,
    /// The pending frame's body, when it is large: its bytes go straight here (allocated
    /// once at its full length when the header passed validation), and `pop` hands it
    /// over without copying it out of `buf`.
    body: Option<Vec<u8>>,
    failed: Option<FrameError>,
    /// The transport authenticates every byte: bodies flagged unchecked are accepted.
    authenticated: bool,
}

impl FrameDecoder {
    pub fn new() -> FrameDecoder {
        FrameDecoder::default()
    }

    /// Declare the transport authenticated (TLS): frames flagged
    /// [`FLAG_BODY_UNCHECKED`] are accepted without a body CRC. Never set it for plain TCP.
    pub fn set_authenticated_transport(&mut self, yes: bool) {
        self.authenticated = yes;
    }

    /// Bytes held and not yet returned as frames.
    pub fn buffered(&self) -> usize {
        // A direct body's header bytes were taken from `buf`; they still count.
        self.buf.len() - self.start + self.body.as_ref().map_or(0, |b| HEADER_BYTES + b.len())
    }

    /// How many more bytes [`push`](Self::push) accepts now.
    pub fn room(&self) -> usize {
        MAX_FRAME_BYTES - self.buffered()
    }

    /// The error this decoder failed with, if it has.
    pub fn error(&self) -> Option<&FrameError> {
        self.failed.as_ref()
    }

    /// Take up to [`room`](Self::room) bytes from `bytes`; returns how many were taken (the
    /// rest stays with the caller). Memory grows only with bytes actually pushed, beyond
    /// that only by the body length of a header that passed validation.
    #[must_use = "push may take fewer bytes than offered"]
    pub fn push(&mut self, bytes: &[u8]) -> usize {
        let mut n = bytes.len().min(self.room());
        if n == 0 {
            return 0;
        }
        let mut bytes = &bytes[..n];
        // The rest of a large pending body goes straight into it.
        if let (Some(body), Some(h)) = (self.body.as_mut(), self.pending) {
            let k = (h.body_len as usize - body.len()).min(bytes.len());
            body.extend_from_slice(&bytes[..k]);
            bytes = &bytes[k..];
            if bytes.is_empty() {
                return n;
            }
        }
        let taken = n;
        n = bytes.len();
        if self.start > 0
            && (self.start == self.buf.len()
                || self.start >= (64 << 10)
                || self.buf.len() + n > self.buf.capacity())
        {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let need = self.buf.len() + n;
        if need > self.buf.capacity() {
            // Grow geometrically, but never past one maximal frame.
            let target = need
                .max(self.buf.capacity() * 2)
                .clamp(4096, MAX_FRAME_BYTES);
            self.buf.reserve_exact(target.max(need) - self.buf.len());
        }
        self.buf.extend_from_slice(&bytes[..n]);
        taken
    }

    /// The next complete frame: `Ok(None)` until enough bytes are in.
    pub fn pop(&mut self) -> Result<Option<Frame>, FrameError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match self.pop_inner() {
            Err(e) => {
                self.failed = Some(e.clone());
                Err(e)
            }
            ok => ok,
        }
    }

    fn pop_inner(&mut self) -> Result<Option<Frame>, FrameError> {
        let header = match self.pending {
            Some(h) => h,
            None => {
                if self.buffered() < HEADER_BYTES {
                    return Ok(None);
                }
                let mut raw = [0u8; HEADER_BYTES];
                raw.copy_from_slice(&self.buf[self.start..self.start + HEADER_BYTES]);
                let h = FrameHeader::parse(&raw)?;
                self.pending = Some(h);
                h
            }
        };
        let total = HEADER_BYTES + header.body_len as usize;
        if let Some(body) = &self.body {
            if body.len() < header.body_len as usize {
                return Ok(None);
            }
            let body = self.body.take().expect("checked");
            self.check_body(&header, &body)?;
            self.pending = None;
            return Ok(Some(Frame {
                version: header.version,
                opcode: header.opcode,
                request_id: header.request_id,
                body,
            }));
        }
        if self.buffered() < total && header.body_len as usize >= DIRECT_BODY_MIN {
            // A large body: allocate it whole (the header passed validation) and move what
            // arrived of it so far; the rest is pushed straight into it.
            let mut body = Vec::with_capacity(header.body_len as usize);
            body.extend_from_slice(&self.buf[self.start + HEADER_BYTES..]);
            self.buf.clear();
            self.start = 0;
            self.body = Some(body);
            return Ok(None);
        }
        if self.buffered() < total {
            // The header is valid: now it is safe to make room for the whole frame.
            let missing = total - self.buffered();
            if self.buf.capacity() - self.buf.len() < missing {
                if self.start > 0 {
                    self.buf.drain(..self.start);
                    self.start = 0;
                }
                self.buf.reserve_exact(total - self.buf.len());
            }
            return Ok(None);
        }
        let body = &self.buf[self.start + HEADER_BYTES..self.start + total];
        self.check_body(&header, body)?;
        let frame = Frame {
            version: header.version,
            opcode: header.opcode,
            request_id: header.request_id,
            body: body.to_vec(),
        };
        self.start += total;
        self.pending = None;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
            if self.buf.capacity() > IDLE_BUFFER_KEEP_BYTES {
                // Do not keep a large frame's worth of memory per idle connection.
                self.buf = Vec::new();
            }
        }
        Ok(Some(frame))
    }

    /// A body's checksum, or the transport's word for it.
    fn check_body(&self, header: &FrameHeader, body: &[u8]) -> Result<(), FrameError> {
        if header.flags & FLAG_BODY_UNCHECKED != 0 {
            if !self.authenticated {
                return Err(FrameError::UncheckedBody);
            }
        } else if crc_fast::crc32_iscsi(body) != header.body_crc32c {
            return Err(FrameError::BadBodyChecksum);
        }
        Ok(())
    }

    /// Call at end of stream: an error if part of a frame is still buffered (or the decoder
    /// had already failed). Complete frames still buffered are not an error; pop them first.
    pub fn finish(&self) -> Result<(), FrameError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.buffered() > 0 {
            return Err(FrameError::Truncated {
                buffered: self.buffered(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    const V: u16 = PROTOCOL_VERSION_MAX;
    use super::*;

    fn decode_all(bytes: &[u8]) -> Result<Vec<Frame>, FrameError> {
        let mut d = FrameDecoder::new();
        let mut out = Vec::new();
        let mut rest = bytes;
        loop {
            let n = d.push(rest);
            rest = &rest[n..];
            while let Some(f) = d.pop()? {
                out.push(f);
            }
            if rest.is_empty() {
                break;
            }
        }
        d.finish()?;
        Ok(out)
    }

    #[test]
    fn header_layout_is_fixed() {
        let f = encode_frame(0x0302, 14, 0x0102_0304_0506_0708, b"abc");
        assert_eq!(f.len(), HEADER_BYTES + 3);
        assert_eq!(&f[0..4], b"HVFS");
        assert_eq!(&f[4..6], &[2, 3]);
        assert_eq!(&f[6..8], &[14, 0]);
        assert_eq!(&f[8..16], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&f[16..20], &[3, 0, 0, 0]);
        assert_eq!(&f[20..24], &crc_fast::crc32_iscsi(b"abc").to_le_bytes());
        let mut covered = f[..24].to_vec();
        covered.extend_from_slice(&f[28..32]);
        assert_eq!(&f[24..28], &crc_fast::crc32_iscsi(&covered).to_le_bytes());
        assert_eq!(&f[28..32], &[0, 0, 0, 0]);
        let mut u = Vec::new();
        encode_frame_checked_with(&mut u, BodyCheck::Transport, V, 14, 5, |b| b.push(1));
        assert_eq!(&u[20..24], &[0, 0, 0, 0]);
        assert_eq!(&u[28..32], &FLAG_BODY_UNCHECKED.to_le_bytes());
    }

    #[test]
    fn roundtrip_many_frames_byte_by_byte() {
        let mut stream = Vec::new();
        for i in 0..20u64 {
            encode_frame_into(&mut stream, V, i as u16, i, &vec![i as u8; i as usize * 37]);
        }
        let mut d = FrameDecoder::new();
        let mut got = Vec::new();
        for b in &stream {
            assert_eq!(d.push(std::slice::from_ref(b)), 1);
            while let Some(f) = d.pop().unwrap() {
                got.push(f);
            }
        }
        d.finish().unwrap();
        assert_eq!(got.len(), 20);
        for (i, f) in got.iter().enumerate() {
            assert_eq!(f.request_id, i as u64);
            assert_eq!(f.opcode, i as u16);
            assert_eq!(f.body, vec![i as u8; i * 37]);
        }
        assert_eq!(decode_all(&stream).unwrap(), got);
    }

    /// Push `stream` in pieces of random sizes, popping whatever is complete in between
    /// (as a connection does).
    fn decode_in_pieces(
        stream: &[u8],
        seed: u64,
        authenticated: bool,
    ) -> Result<Vec<Frame>, FrameError> {
        let mut x = seed | 1;
        let mut d = FrameDecoder::new();
        d.set_authenticated_transport(authenticated);
        let mut out = Vec::new();
        let mut rest = stream;
        while !rest.is_empty() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let want = 1 + (x % 150_000) as usize;
            let n = d.push(&rest[..want.min(rest.len())]);
            rest = &rest[n..];
            while let Some(f) = d.pop()? {
                out.push(f);
            }
        }
        d.finish()?;
        Ok(out)
    }

    #[test]
    fn large_bodies_received_in_pieces_come_out_whole() {
        let sizes = [
            0,
            100,
            DIRECT_BODY_MIN - 1,
            DIRECT_BODY_MIN,
            DIRECT_BODY_MIN + 1,
            70_000,
            1 << 20,
            3,
            MAX_BODY_BYTES,
            200_000,
        ];
        let mut stream = Vec::new();
        let mut want = Vec::new();
        for (i, n) in sizes.iter().enumerate() {
            let body: Vec<u8> = (0..*n).map(|j| (j * 7 + i) as u8).collect();
            if i % 2 == 0 {
                encode_frame_into(&mut stream, V, 20, i as u64, &body);
            } else {
                encode_frame_checked_with(
                    &mut stream,
                    BodyCheck::Transport,
                    V,
                    20,
                    i as u64,
                    |b| b.extend_from_slice(&body),
                );
            }
            want.push(body);
        }
        for seed in 1..40 {
            let got = decode_in_pieces(&stream, seed, true).unwrap();
            assert_eq!(got.len(), want.len(), "seed {seed}");
            for (i, (f, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(f.request_id, i as u64);
                assert!(f.body == *w, "seed {seed}: body {i} differs");
            }
        }
        // Unchecked large bodies on plain TCP, a flipped byte in a large checked body, and
        // a large frame cut short are each caught, in pieces too.
        assert_eq!(
            decode_in_pieces(&stream, 7, false).unwrap_err(),
            FrameError::UncheckedBody
        );
        let mut bad = encode_frame(V, 20, 1, &vec![9u8; 300_000]);
        bad[HEADER_BYTES + 250_000] ^= 1;
        for seed in 1..10 {
            assert_eq!(
                decode_in_pieces(&bad, seed, true).unwrap_err(),
                FrameError::BadBodyChecksum
            );
        }
        let good = encode_frame(V, 20, 1, &vec![9u8; 300_000]);
        let cut = &good[..good.len() - 1];
        assert!(matches!(
            decode_in_pieces(cut, 3, true).unwrap_err(),
            FrameError::Truncated { buffered } if buffered == cut.len()
        ));
    }

    #[test]
    fn garbage_is_bad_magic() {
        let e = decode_all(&[0x5a; 100]).unwrap_err();
        assert_eq!(e, FrameError::BadMagic(0x5a5a_5a5a));
        assert_eq!(e.code(), ErrorCode::BadFrame);
    }

    #[test]
    fn truncated_needs_more_until_eof() {
        let f = encode_frame(V, 10, 9, &[1u8; 100]);
        for cut in [0, 1, 31, 32, 33, 131] {
            let mut d = FrameDecoder::new();
            assert_eq!(d.push(&f[..cut]), cut);
            assert_eq!(d.pop(), Ok(None), "cut {cut}");
            if cut == 0 {
                d.finish().unwrap();
            } else {
                assert_eq!(d.finish(), Err(FrameError::Truncated { buffered: cut }));
            }
        }
    }

    #[test]
    fn huge_length_is_rejected_from_the_header_alone() {
        let mut f = encode_frame(V, 10, 1, b"");
        f[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        reseal_header(&mut f);
        let mut d = FrameDecoder::new();
        assert_eq!(d.push(&f), HEADER_BYTES);
        assert_eq!(d.pop(), Err(FrameError::TooLarge(u32::MAX)));
        assert!(
            d.buf.capacity() < 1 << 16,
            "no allocation for the declared body"
        );
        assert_eq!(d.pop(), Err(FrameError::TooLarge(u32::MAX)), "stays failed");
        assert_eq!(FrameError::TooLarge(0).code(), ErrorCode::TooLarge);
        // Just over the limit, too; exactly at it is fine.
        let mut g = f.clone();
        g[16..20].copy_from_slice(&(MAX_BODY_BYTES as u32 + 1).to_le_bytes());
        reseal_header(&mut g);
        assert_eq!(
            decode_all(&g),
            Err(FrameError::TooLarge(MAX_BODY_BYTES as u32 + 1))
        );
    }

    #[test]
    fn max_size_frame_passes() {
        let body = vec![0xabu8; MAX_BODY_BYTES];
        let f = encode_frame(V, 12, 3, &body);
        let mut d = FrameDecoder::new();
        assert_eq!(d.push(&f), MAX_FRAME_BYTES);
        assert_eq!(d.room(), 0);
        assert_eq!(d.push(b"x"), 0);
        let got = d.pop().unwrap().unwrap();
        assert_eq!(got.body.len(), MAX_BODY_BYTES);
        assert_eq!(d.room(), MAX_FRAME_BYTES);
    }

    #[test]
    fn wrong_version_flags_and_header_checksum() {
        let good = encode_frame(V, 10, 1, b"x");
        let refresh = |mut f: Vec<u8>| {
            reseal_header(&mut f);
            f
        };
        let mut v = good.clone();
        v[4..6].copy_from_slice(&(PROTOCOL_VERSION_MAX + 1).to_le_bytes());
        assert_eq!(
            decode_all(&refresh(v)),
            Err(FrameError::UnsupportedVersion(PROTOCOL_VERSION_MAX + 1))
        );
        let mut v = good.clone();
        v[4..6].copy_from_slice(&1u16.to_le_bytes());
        assert_eq!(
            decode_all(&refresh(v)),
            Err(FrameError::UnsupportedVersion(1)),
            "version 1 (before levels) is refused"
        );
        let mut v = good.clone();
        v[4..6].copy_from_slice(&0u16.to_le_bytes());
        assert_eq!(
            decode_all(&refresh(v)),
            Err(FrameError::UnsupportedVersion(0))
        );
        assert_eq!(
            FrameError::UnsupportedVersion(2).code(),
            ErrorCode::UnsupportedVersion
        );
        let mut r = good.clone();
        r[28] = 1;
        assert_eq!(
            decode_all(&r),
            Err(FrameError::BadHeaderChecksum),
            "flags are covered"
        );
        let mut r = good.clone();
        r[28] = 4;
        assert_eq!(decode_all(&refresh(r)), Err(FrameError::UnknownFlags(4)));
        let mut h = good.clone();
        h[9] ^= 1; // request id changed without fixing the checksum
        assert_eq!(decode_all(&h), Err(FrameError::BadHeaderChecksum));
    }

    #[test]
    fn unchecked_bodies_only_on_authenticated_transports() {
        let mut f = Vec::new();
        encode_frame_checked_with(&mut f, BodyCheck::Transport, V, 10, 1, |b| {
            b.extend_from_slice(b"hello")
        });
        assert_eq!(decode_all(&f), Err(FrameError::UncheckedBody));
        assert_eq!(FrameError::UncheckedBody.code(), ErrorCode::BadFrame);
        let mut d = FrameDecoder::new();
        d.set_authenticated_transport(true);
        assert_eq!(d.push(&f), f.len());
        assert_eq!(d.pop().unwrap().unwrap().body, b"hello");
        // A checked frame is still checked on an authenticated transport.
        let mut g = encode_frame(V, 10, 2, b"hello");
        *g.last_mut().unwrap() ^= 1;
        assert_eq!(d.push(&g), g.len());
        assert_eq!(d.pop(), Err(FrameError::BadBodyChecksum));
    }

    #[test]
    fn body_checksum_mismatch() {
        let mut f = encode_frame(V, 10, 1, b"hello");
        *f.last_mut().unwrap() ^= 0x80;
        let e = decode_all(&f).unwrap_err();
        assert_eq!(e, FrameError::BadBodyChecksum);
        assert_eq!(e.code(), ErrorCode::BadChecksum);
    }

    #[test]
    fn oversize_encode_is_announced_so_peers_reject_it() {
        let body = vec![0u8; MAX_BODY_BYTES + 1];
        let f = encode_frame(V, 12, 1, &body);
        let mut d = FrameDecoder::new();
        let _ = d.push(&f[..HEADER_BYTES]);
        assert_eq!(
            d.pop(),
            Err(FrameError::TooLarge(MAX_BODY_BYTES as u32 + 1))
        );
    }
}
