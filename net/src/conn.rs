//! A framed connection over any `Read + Write` byte stream, plain or TLS, driven by its
//! owner: a node's non-blocking event loop (a `mio::net::TcpStream`; later a user-space
//! stack's socket) or a client's blocking socket.
//!
//! Reading: [`FramedConn::read_frames`] reads what the stream has (until `WouldBlock`),
//! runs TLS, and hands out at most `max_frames` complete frames. Bytes beyond those stay
//! buffered, and the stream is read no further than needed: with frames still
//! undelivered nothing more is read, so a caller applying flow control simply stops asking
//! (or asks for 0 frames) and the peer meets TCP backpressure. At most one maximal frame
//! ([`crate::frame::MAX_FRAME_BYTES`]) of plaintext is buffered here, plus rustls's own
//! bounded buffers and, with TLS, one read of records (64 KiB) that rustls has not taken.
//!
//! Writing: [`FramedConn::queue_frame`] appends an encoded frame (plaintext, or handed to
//! rustls, which encrypts it — before the handshake completes it is held and sent after);
//! [`FramedConn::flush`] writes until done or `WouldBlock`. Register for writability while
//! [`FramedConn::wants_write`] is true. `read_frames` itself flushes pending TLS output
//! after processing records, so handshake replies go out without a separate flush (it
//! still may stop at `WouldBlock`: keep honouring `wants_write`).
//!
//! Errors: a [`ConnError`] other than `Decode` ends the connection. TLS failures (bad certificate, pinning
//! mismatch, a corrupt record, a fatal alert from the peer) surface from `read_frames` as
//! [`ConnError::Tls`] with rustls's message, after a best-effort attempt to send the alert
//! rustls queued. Frame and message errors carry an [`ErrorCode`] ([`ConnError::code`]) a
//! node can report in an `Error` response before closing.

use std::io::{self, BufRead, ErrorKind, Read, Write};
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, Connection, ServerConfig, ServerConnection};

use crate::frame::{encode_frame_into, BodyCheck, Frame, FrameDecoder, FrameError, MAX_BODY_BYTES};
use crate::proto::{DecodeError, ErrorCode, Request, Response};

/// How much is read from the stream (or from rustls) in one call.
const READ_CHUNK: usize = 64 << 10;

/// Why a connection call failed. `Io`, `Tls`, `Frame` and `Closed` end the connection;
/// `Decode` (from the `recv_*` helpers) concerns one message and leaves the stream in sync.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("framing: {0}")]
    Frame(#[from] FrameError),
    #[error("message: {0}")]
    Decode(#[from] DecodeError),
    #[error("connection closed")]
    Closed,
}

impl ConnError {
    /// The code to report to the peer, for errors the peer caused by sending bad bytes.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ConnError::Frame(e) => Some(e.code()),
            ConnError::Decode(e) => Some(e.code()),
            _ => None,
        }
    }
}

/// Whether the peer is still sending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadStatus {
    Open,
    /// The peer closed (TCP EOF, or TLS `close_notify`) on a frame boundary and every
    /// frame has been delivered.
    Closed,
}

/// The transport security of a [`FramedConn`].
pub enum Security {
    Plain,
    Tls(Box<Connection>),
}

/// A framed, optionally TLS-protected connection. See the module docs.
pub struct FramedConn<S: Read + Write> {
    stream: S,
    security: Security,
    decoder: FrameDecoder,
    /// Plain connections: encoded frames not yet written, from `out_pos`.
    out: Vec<u8>,
    out_pos: usize,
    /// The peer will send nothing more.
    eof: bool,
    /// A failure remembered for the next call (from `queue_frame`, which cannot return it).
    deferred: Option<ConnError>,
    /// What one socket read lands in. Plain: bytes go on into the decoder at once. TLS:
    /// records wait here (`tls_in..tls_end`) for rustls, which takes at most 4 KiB per
    /// `read_tls`; reading the socket in 4 KiB steps cost a `recv` per 4 KiB.
    scratch: Box<[u8]>,
    tls_in: usize,
    tls_end: usize,
}

impl<S: Read + Write> FramedConn<S> {
    /// Wrap a stream with the given security.
    pub fn new(stream: S, security: Security) -> FramedConn<S> {
        let security = match security {
            Security::Tls(mut tls) => {
                // Our own queue accounting replaces rustls's send-buffer limit, so a
                // queued frame is always accepted whole.
                tls.set_buffer_limit(None);
                Security::Tls(tls)
            }
            plain => plain,
        };
        let mut decoder = FrameDecoder::new();
        let tls = matches!(security, Security::Tls(_));
        decoder.set_authenticated_transport(tls);
        FramedConn {
            stream,
            security,
            decoder,
            out: Vec::new(),
            out_pos: 0,
            eof: false,
            deferred: None,
            scratch: vec![0u8; READ_CHUNK].into_boxed_slice(),
            tls_in: 0,
            tls_end: 0,
        }
    }

    /// The accepting side: TLS with `config`, or plain with `None`.
    pub fn new_server(
        stream: S,
        config: Option<Arc<ServerConfig>>,
    ) -> Result<FramedConn<S>, ConnError> {
        let security = match config {
            Some(c) => Security::Tls(Box::new(ServerConnection::new(c).map_err(tls_err)?.into())),
            None => Security::Plain,
        };
        Ok(FramedConn::new(stream, security))
    }

    /// The connecting side: TLS with `config` for `name`, or plain with `None`.
    pub fn new_client(
        stream: S,
        tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
    ) -> Result<FramedConn<S>, ConnError> {
        let security = match tls {
            Some((c, name)) => Security::Tls(Box::new(
                ClientConnection::new(c, name).map_err(tls_err)?.into(),
            )),
            None => Security::Plain,
        };
        Ok(FramedConn::new(stream, security))
    }

    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    pub fn get_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// The TLS session, when there is one (peer certificates, negotiated parameters).
    pub fn tls(&self) -> Option<&Connection> {
        match &self.security {
            Security::Tls(t) => Some(t),
            Security::Plain => None,
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self.security, Security::Tls(_))
    }

    /// How large bodies sent on this connection are protected: by TLS itself when there is
    /// TLS (no second pass over the bytes), else by a CRC32C in the frame header.
    pub fn body_check(&self) -> BodyCheck {
        if self.is_tls() {
            BodyCheck::Transport
        } else {
            BodyCheck::Crc32c
        }
    }

    /// True while a TLS handshake is in progress.
    pub fn is_handshaking(&self) -> bool {
        matches!(&self.security, Security::Tls(t) if t.is_handshaking())
    }

    /// Received bytes not yet delivered as frames (TLS: plus records read from the
    /// stream that rustls has not taken yet).
    pub fn buffered_in(&self) -> usize {
        self.decoder.buffered() + (self.tls_end - self.tls_in)
    }

    /// Queue an encoded frame (from [`crate::frame::encode_frame`],
    /// [`crate::proto::frame_response`], ...) for [`flush`](Self::flush).
    pub fn queue_frame(&mut self, bytes: &[u8]) {
        match &mut self.security {
            Security::Plain => {
                if self.out_pos == self.out.len() {
                    self.out.clear();
                    self.out_pos = 0;
                }
                self.out.extend_from_slice(bytes);
            }
            Security::Tls(tls) => {
                if let Err(e) = tls.writer().write_all(bytes) {
                    self.deferred.get_or_insert(ConnError::Io(e));
                }
            }
        }
    }

    /// Queue one frame given in pieces (a header and prefix, then borrowed chunk bytes):
    /// TLS encrypts straight from the pieces, so a large body is not first gathered into
    /// one buffer.
    pub fn queue_frame_parts(&mut self, parts: &[&[u8]]) {
        match &mut self.security {
            Security::Plain => {
                for p in parts {
                    self.queue_frame(p);
                }
            }
            Security::Tls(tls) => {
                let slices: Vec<std::io::IoSlice<'_>> =
                    parts.iter().map(|p| std::io::IoSlice::new(p)).collect();
                let total: usize = parts.iter().map(|p| p.len()).sum();
                // With no buffer limit (see `new`) rustls takes every byte.
                match tls.writer().write_vectored(&slices) {
                    Ok(n) if n == total => {}
                    Ok(n) => {
                        let e = std::io::Error::other(format!("TLS took {n} of {total} bytes"));
                        self.deferred.get_or_insert(ConnError::Io(e));
                    }
                    Err(e) => {
                        self.deferred.get_or_insert(ConnError::Io(e));
                    }
                }
            }
        }
    }

    /// Queue a best-effort TLS `close_notify` (nothing for plain connections); flush after.
    pub fn send_close(&mut self) {
        if let Security::Tls(tls) = &mut self.security {
            tls.send_close_notify();
        }
    }

    /// Whether queued output is waiting for the stream to accept it.
    pub fn wants_write(&self) -> bool {
        match &self.security {
            Security::Plain => self.out_pos < self.out.len(),
            Security::Tls(tls) => tls.wants_write(),
        }
    }

    /// Write queued output until all of it is written (`Ok(true)`) or the stream would
    /// block (`Ok(false)`).
    pub fn flush(&mut self) -> Result<bool, ConnError> {
        if let Some(e) = self.deferred.take() {
            return Err(e);
        }
        match &mut self.security {
            Security::Plain => {
                while self.out_pos < self.out.len() {
                    match self.stream.write(&self.out[self.out_pos..]) {
                        Ok(0) => return Err(ConnError::Io(ErrorKind::WriteZero.into())),
                        Ok(n) => self.out_pos += n,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                self.out.clear();
                self.out_pos = 0;
                if self.out.capacity() > crate::frame::IDLE_BUFFER_KEEP_BYTES {
                    self.out = Vec::new();
                }
            }
            Security::Tls(tls) => {
                while tls.wants_write() {
                    match tls.write_tls(&mut self.stream) {
                        Ok(0) => return Err(ConnError::Io(ErrorKind::WriteZero.into())),
                        Ok(_) => {}
                        Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        match self.stream.flush() {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Read what the stream has and append up to `max_frames` complete frames to `out`.
    /// Returns [`ReadStatus::Closed`] once the peer has closed and every frame has been
    /// delivered; a close in the middle of a frame is [`FrameError::Truncated`].
    ///
    /// It reads until the stream would block *unless* `max_frames` frames were delivered
    /// first: then it stops, and bytes may remain buffered here, in rustls or in the
    /// socket with no new readiness event to announce them (mio is edge-triggered). So
    /// when a call delivered exactly `max_frames`, call again once ready for more, without
    /// waiting for readability. A frame or message error ends the connection, except that
    /// the caller decodes bodies itself: a [`DecodeError`] on one body leaves the stream in
    /// sync.
    pub fn read_frames(
        &mut self,
        out: &mut Vec<Frame>,
        max_frames: usize,
    ) -> Result<ReadStatus, ConnError> {
        if let Some(e) = self.deferred.take() {
            return Err(e);
        }
        let mut delivered = 0;
        loop {
            while delivered < max_frames {
                match self.decoder.pop()? {
                    Some(f) => {
                        out.push(f);
                        delivered += 1;
                    }
                    None => break,
                }
            }
            if delivered >= max_frames {
                // Whatever is left waits for the caller; read nothing more.
                return Ok(ReadStatus::Open);
            }
            if self.eof {
                self.decoder.finish()?;
                return Ok(ReadStatus::Closed);
            }
            if !self.fill()? {
                return Ok(ReadStatus::Open);
            }
        }
    }

    /// Move more plaintext into the decoder. `Ok(false)` when the stream would block.
    /// Only called when the decoder lacks bytes for its next frame, so it has room.
    fn fill(&mut self) -> Result<bool, ConnError> {
        let room = self.decoder.room().min(READ_CHUNK);
        if room == 0 {
            // Cannot happen (a full decoder holds a complete frame); never read past it.
            return Ok(false);
        }
        match &mut self.security {
            Security::Plain => match self.stream.read(&mut self.scratch[..room]) {
                Ok(0) => {
                    self.eof = true;
                    Ok(true)
                }
                Ok(n) => {
                    let taken = self.decoder.push(&self.scratch[..n.min(room)]);
                    debug_assert_eq!(taken, n);
                    Ok(true)
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(false),
                Err(e) if e.kind() == ErrorKind::Interrupted => Ok(true),
                Err(e) => Err(e.into()),
            },
            Security::Tls(tls) => {
                // Plaintext rustls already decrypted comes first, pushed into the decoder
                // straight from rustls's buffer (a large body's bytes go from there into
                // the body, with no copy in between).
                let mut reader = tls.reader();
                match reader.fill_buf() {
                    Ok([]) => {
                        self.eof = true; // close_notify
                        return Ok(true);
                    }
                    Ok(plain) => {
                        let taken = self.decoder.push(plain);
                        debug_assert!(taken > 0);
                        reader.consume(taken);
                        return Ok(true);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == ErrorKind::UnexpectedEof => {
                        // TCP EOF without close_notify. Frames carry their own lengths
                        // and checksums, so this is a close like any other; a cut frame
                        // is still caught by the decoder.
                        self.eof = true;
                        return Ok(true);
                    }
                    Err(e) => return Err(e.into()),
                }
                // Nothing decrypted is waiting: give rustls records, read from the stream
                // into `scratch` first when it holds none.
                if self.tls_in == self.tls_end {
                    match self.stream.read(&mut self.scratch) {
                        Ok(n) => {
                            self.tls_in = 0;
                            self.tls_end = n;
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                        Err(e) if e.kind() == ErrorKind::Interrupted => return Ok(true),
                        Err(e) => return Err(e.into()),
                    }
                }
                // From a slice, `read_tls` returns 0 only when the slice is empty: at the
                // stream's end, which rustls then knows of.
                let mut records = &self.scratch[self.tls_in..self.tls_end];
                let got = tls.read_tls(&mut records)?;
                self.tls_in += got;
                if let Err(e) = tls.process_new_packets() {
                    // Let the peer see the alert rustls queued, if the stream takes it.
                    let _ = tls.write_tls(&mut self.stream);
                    return Err(tls_err(e));
                }
                if got == 0 && tls.is_handshaking() {
                    return Err(ConnError::Tls(
                        "connection closed during the TLS handshake".into(),
                    ));
                }
                if tls.wants_write() {
                    self.flush()?;
                }
                Ok(true)
            }
        }
    }

    /// Blocking helper: queue `req` as a frame and write it out. On a non-blocking stream
    /// whatever does not fit stays queued (see [`flush`](Self::flush)). A request whose
    /// body exceeds [`MAX_BODY_BYTES`] is refused here ([`FrameError::TooLarge`]).
    pub fn send_request(
        &mut self,
        version: u16,
        request_id: u64,
        req: &Request,
    ) -> Result<(), ConnError> {
        let (op, body) = req.encode();
        if body.len() > MAX_BODY_BYTES {
            return Err(FrameError::TooLarge(u32::try_from(body.len()).unwrap_or(u32::MAX)).into());
        }
        let mut frame = Vec::new();
        encode_frame_into(&mut frame, version, op as u16, request_id, &body);
        self.queue_frame(&frame);
        self.flush()?;
        Ok(())
    }

    /// Blocking helper: flush, then read until one frame arrives. [`ConnError::Closed`]
    /// if the peer closes first.
    pub fn recv_frame(&mut self) -> Result<Frame, ConnError> {
        self.recv_frame_until(None)
    }

    /// Blocking helper: as [`recv_frame`](Self::recv_frame), but fails with
    /// `ErrorKind::TimedOut` once `timeout` has passed without a whole frame. The stream's
    /// own read timeout must be set (shorter or equal): it is what ends each wait.
    pub fn recv_frame_within(&mut self, timeout: std::time::Duration) -> Result<Frame, ConnError> {
        self.recv_frame_until(Some(std::time::Instant::now() + timeout))
    }

    /// Blocking helper: the next response within `timeout` (see
    /// [`recv_frame_within`](Self::recv_frame_within)).
    pub fn recv_response_within(
        &mut self,
        timeout: std::time::Duration,
    ) -> Result<(u64, Response), ConnError> {
        let f = self.recv_frame_within(timeout)?;
        Ok((f.request_id, Response::decode(f.opcode, &f.body)?))
    }

    fn recv_frame_until(
        &mut self,
        deadline: Option<std::time::Instant>,
    ) -> Result<Frame, ConnError> {
        let mut frames = Vec::with_capacity(1);
        loop {
            if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                return Err(ConnError::Io(io::Error::new(
                    ErrorKind::TimedOut,
                    "no answer in time",
                )));
            }
            if self.wants_write() {
                self.flush()?;
            }
            let status = self.read_frames(&mut frames, 1)?;
            if let Some(f) = frames.pop() {
                return Ok(f);
            }
            if status == ReadStatus::Closed {
                return Err(ConnError::Closed);
            }
        }
    }

    /// Blocking helper: the next response and the request id it answers.
    pub fn recv_response(&mut self) -> Result<(u64, Response), ConnError> {
        let f = self.recv_frame()?;
        Ok((f.request_id, Response::decode(f.opcode, &f.body)?))
    }

    /// Blocking helper (simple servers, tests): the next request and its id.
    pub fn recv_request(&mut self) -> Result<(u64, Request), ConnError> {
        let f = self.recv_frame()?;
        Ok((f.request_id, Request::decode(f.opcode, &f.body)?))
    }
}

fn tls_err(e: rustls::Error) -> ConnError {
    ConnError::Tls(crate::tls::describe_error(&e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::{ChunkId, Codec, DedupeKey};
    use crate::frame::{encode_frame, HEADER_BYTES, MAX_FRAME_BYTES, PROTOCOL_VERSION_MAX};
    use crate::proto::{
        frame_request, frame_response, ErrorCode, Opcode, PutChunk, PutResult, MAX_BATCH_IDS,
    };
    use crate::tls;
    use std::os::unix::net::UnixStream;
    use std::thread;

    const V: u16 = PROTOCOL_VERSION_MAX;

    fn id(n: u32) -> ChunkId {
        ChunkId::compute(&DedupeKey([1; 32]), &n.to_le_bytes())
    }

    /// A blocking echo-ish server: answers Hello, Has, Put, Get until the client closes.
    fn serve(mut conn: FramedConn<UnixStream>) -> usize {
        let mut served = 0;
        loop {
            let (rid, req) = match conn.recv_request() {
                Ok(r) => r,
                Err(ConnError::Closed) => return served,
                Err(e) => panic!("server: {e}"),
            };
            let resp = match req {
                Request::Hello { client_name, .. } => Response::HelloOk {
                    version: V,
                    node_id: format!("node-for-{client_name}"),
                    shard: 0,
                    shard_count: 1,
                    credits: 8,
                },
                Request::Has { ids, .. } => Response::HasReply {
                    claim_epoch: 3,
                    present: ids.iter().map(|i| i.0[1] & 1 == 1).collect(),
                },
                Request::Put { chunks, .. } => Response::PutReply {
                    claim_epoch: 3,
                    results: chunks.iter().map(|_| PutResult::Stored).collect(),
                },
                Request::Get { .. } => Response::GetReply {
                    chunk: Some((Codec::Raw, 1 << 20, vec![0x5a; 1 << 20])),
                },
                _ => Response::error(ErrorCode::BadRequest, "unsupported here"),
            };
            conn.queue_frame(&frame_response(V, rid, &resp));
            assert!(conn.flush().unwrap());
            served += 1;
        }
    }

    fn exercise(client: &mut FramedConn<UnixStream>) {
        client
            .send_request(
                V,
                1,
                &Request::Hello {
                    min_version: 1,
                    max_version: 1,
                    token: "t".into(),
                    client_name: "c1".into(),
                },
            )
            .unwrap();
        let (rid, resp) = client.recv_response().unwrap();
        assert_eq!(rid, 1);
        assert!(
            matches!(resp, Response::HelloOk { ref node_id, .. } if node_id == "node-for-c1"),
            "{resp:?}"
        );
        let ids: Vec<ChunkId> = (0..MAX_BATCH_IDS as u32).map(id).collect();
        client
            .send_request(
                V,
                2,
                &Request::Has {
                    level: 1,
                    ids: ids.clone(),
                },
            )
            .unwrap();
        let (rid, resp) = client.recv_response().unwrap();
        assert_eq!(rid, 2);
        let Response::HasReply { present, .. } = resp else {
            panic!("{resp:?}")
        };
        assert_eq!(
            present,
            ids.iter().map(|i| i.0[1] & 1 == 1).collect::<Vec<_>>()
        );
        let chunks = (0..12)
            .map(|n| PutChunk {
                id: id(n),
                codec: Codec::Raw,
                raw_len: 1 << 20,
                data: vec![n as u8; 1 << 20],
            })
            .collect();
        client
            .send_request(V, 3, &Request::Put { level: 1, chunks })
            .unwrap();
        let (rid, resp) = client.recv_response().unwrap();
        assert_eq!(
            (rid, resp),
            (
                3,
                Response::PutReply {
                    claim_epoch: 3,
                    results: vec![PutResult::Stored; 12]
                }
            )
        );
        client
            .send_request(V, 4, &Request::Get { id: id(0) })
            .unwrap();
        let (rid, resp) = client.recv_response().unwrap();
        assert_eq!(rid, 4);
        let Response::GetReply {
            chunk: Some((_, _, data)),
        } = resp
        else {
            panic!()
        };
        assert_eq!(data.len(), 1 << 20);
        client.send_request(V, 5, &Request::Stats).unwrap();
        assert!(matches!(
            client.recv_response().unwrap(),
            (
                5,
                Response::Error {
                    code: ErrorCode::BadRequest,
                    ..
                }
            )
        ));
    }

    #[test]
    fn plain_round_trip() {
        let (a, b) = UnixStream::pair().unwrap();
        let server = thread::spawn(move || serve(FramedConn::new_server(b, None).unwrap()));
        let mut client = FramedConn::new_client(a, None).unwrap();
        assert!(!client.is_tls());
        exercise(&mut client);
        drop(client);
        assert_eq!(server.join().unwrap(), 5);
    }

    #[test]
    fn a_silent_peer_times_out_a_bounded_wait() {
        // The peer stays connected and says nothing (a host that died behind a userspace
        // stack): each read ends at the stream's timeout, the wait at its own.
        let (a, _b) = UnixStream::pair().unwrap();
        a.set_read_timeout(Some(std::time::Duration::from_millis(20)))
            .unwrap();
        let mut client = FramedConn::new_client(a, None).unwrap();
        let t = std::time::Instant::now();
        match client.recv_response_within(std::time::Duration::from_millis(100)) {
            Err(ConnError::Io(e)) => assert_eq!(e.kind(), ErrorKind::TimedOut),
            other => panic!("{other:?}"),
        }
        assert!(t.elapsed() >= std::time::Duration::from_millis(100));
    }

    #[test]
    fn tls_round_trip() {
        let p = tls::tests::pki();
        let sc = tls::server_config(&p.node_cert, &p.node_key, &p.ca.cert_pem).unwrap();
        let cc = tls::client_config_pinned(&tls::fingerprint_pem(&p.ca.cert_pem).unwrap()).unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        let server = thread::spawn(move || serve(FramedConn::new_server(b, Some(sc)).unwrap()));
        let mut client =
            FramedConn::new_client(a, Some((cc, tls::server_name("localhost").unwrap()))).unwrap();
        assert!(client.is_tls());
        exercise(&mut client);
        assert!(!client.is_handshaking());
        assert_eq!(
            client
                .tls()
                .unwrap()
                .negotiated_cipher_suite()
                .unwrap()
                .suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256,
            "both sides prefer AES-128-GCM"
        );
        client.send_close();
        client.flush().unwrap();
        drop(client);
        assert_eq!(server.join().unwrap(), 5);
    }

    /// The engine's way: a non-blocking server polled with `read_frames`/`flush`, TLS,
    /// against a blocking client; flow control of 2 frames per call.
    #[test]
    fn tls_non_blocking_server_loop() {
        let p = tls::tests::pki();
        let sc = tls::server_config(&p.node_cert, &p.node_key, &p.ca.cert_pem).unwrap();
        let cc = tls::client_config_pinned(&tls::fingerprint_pem(&p.ca.cert_pem).unwrap()).unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let server = thread::spawn(move || {
            let mut conn = FramedConn::new_server(b, Some(sc)).unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            let mut served = 0;
            loop {
                assert!(
                    std::time::Instant::now() < deadline,
                    "server loop timed out"
                );
                let mut frames = Vec::new();
                let status = conn.read_frames(&mut frames, 2).unwrap();
                let progressed = !frames.is_empty();
                for f in frames {
                    let resp = match Request::decode(f.opcode, &f.body).unwrap() {
                        Request::Has { ids, .. } => Response::HasReply {
                            claim_epoch: 1,
                            present: vec![false; ids.len()],
                        },
                        _ => Response::StatsReply { json: "{}".into() },
                    };
                    conn.queue_frame(&frame_response(V, f.request_id, &resp));
                    served += 1;
                }
                if conn.wants_write() {
                    conn.flush().unwrap();
                }
                if status == ReadStatus::Closed {
                    return served;
                }
                if !progressed {
                    thread::sleep(std::time::Duration::from_millis(1));
                }
            }
        });
        let mut client =
            FramedConn::new_client(a, Some((cc, tls::server_name("127.0.0.1").unwrap()))).unwrap();
        // Pipeline 20 requests, then collect the answers in order.
        for i in 0..20u64 {
            let req = if i % 2 == 0 {
                Request::Has {
                    level: 1,
                    ids: (0..1000).map(id).collect(),
                }
            } else {
                Request::Stats
            };
            client.send_request(V, i, &req).unwrap();
        }
        for i in 0..20u64 {
            let (rid, resp) = client.recv_response().unwrap();
            assert_eq!(rid, i);
            match resp {
                Response::HasReply { present, .. } => assert_eq!(present.len(), 1000),
                other => assert_eq!(other, Response::StatsReply { json: "{}".into() }),
            }
        }
        client.send_close();
        client.flush().unwrap();
        drop(client);
        assert_eq!(server.join().unwrap(), 20);
    }

    /// TLS records read ahead of what the caller asked for wait in the connection, and
    /// each call hands out what it may with no new bytes on the socket (the engine's
    /// event loop is edge-triggered): 20 frames of ~5 KiB (more than one 64 KiB socket
    /// read) delivered one per call, then a TCP close without `close_notify` ends it.
    #[test]
    fn tls_records_read_ahead_are_delivered_without_new_readiness() {
        let p = tls::tests::pki();
        let sc = tls::server_config(&p.node_cert, &p.node_key, &p.ca.cert_pem).unwrap();
        let cc = tls::client_config_pinned(&tls::fingerprint_pem(&p.ca.cert_pem).unwrap()).unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        let mut server = FramedConn::new_server(b, Some(sc)).unwrap();
        let mut client =
            FramedConn::new_client(a, Some((cc, tls::server_name("127.0.0.1").unwrap()))).unwrap();
        let mut got = Vec::new();
        for _ in 0..100 {
            if !client.is_handshaking() && !server.is_handshaking() {
                break;
            }
            client.flush().unwrap();
            server.read_frames(&mut got, 1).unwrap();
            server.flush().unwrap();
            client.read_frames(&mut got, 1).unwrap();
        }
        assert!(!client.is_handshaking() && !server.is_handshaking());
        assert!(got.is_empty());
        const FRAMES: u64 = 20;
        for i in 0..FRAMES {
            let ids = (0..150 + i as u32).map(id).collect();
            client.queue_frame(&frame_request(V, i, &Request::Has { level: 1, ids }));
        }
        assert!(client.flush().unwrap(), "the socket takes it all");
        for i in 0..FRAMES {
            assert_eq!(server.read_frames(&mut got, 1).unwrap(), ReadStatus::Open);
            assert_eq!(got.len() as u64, i + 1, "one frame per call");
            assert_eq!(got[i as usize].request_id, i);
            let Request::Has { ids, .. } =
                Request::decode(got[i as usize].opcode, &got[i as usize].body).unwrap()
            else {
                panic!("not a Has")
            };
            assert_eq!(ids.len() as u64, 150 + i);
        }
        assert_eq!(server.read_frames(&mut got, 1).unwrap(), ReadStatus::Open);
        assert_eq!(got.len() as u64, FRAMES);
        assert_eq!(server.buffered_in(), 0);
        drop(client);
        assert_eq!(server.read_frames(&mut got, 1).unwrap(), ReadStatus::Closed);
    }

    #[test]
    fn tls_wrong_pin_fails_on_both_sides() {
        let p = tls::tests::pki();
        let sc = tls::server_config(&p.node_cert, &p.node_key, &p.ca.cert_pem).unwrap();
        let cc = tls::client_config_pinned(&"00".repeat(32)).unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        let server = thread::spawn(move || {
            let mut s = FramedConn::new_server(b, Some(sc)).unwrap();
            s.recv_request().unwrap_err()
        });
        let mut client =
            FramedConn::new_client(a, Some((cc, tls::server_name("127.0.0.1").unwrap()))).unwrap();
        client.send_request(V, 1, &Request::Stats).unwrap();
        let err = client.recv_response().unwrap_err();
        assert!(
            matches!(&err, ConnError::Tls(m) if m.contains("hive CA fingerprint mismatch: pinned 0000")),
            "{err}"
        );
        drop(client);
        let server_err = server.join().unwrap();
        assert!(matches!(server_err, ConnError::Tls(_)), "{server_err}");
    }

    #[test]
    fn plain_client_to_tls_server_fails_without_panicking() {
        let p = tls::tests::pki();
        let sc = tls::server_config(&p.node_cert, &p.node_key, &p.ca.cert_pem).unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        let server = thread::spawn(move || {
            FramedConn::new_server(b, Some(sc))
                .unwrap()
                .recv_request()
                .unwrap_err()
        });
        let mut client = FramedConn::new_client(a, None).unwrap();
        client.send_request(V, 1, &Request::Stats).unwrap();
        assert!(client.recv_response().is_err());
        drop(client);
        assert!(matches!(server.join().unwrap(), ConnError::Tls(_)));
    }

    #[test]
    fn oversize_request_is_refused_before_sending() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut client = FramedConn::new_client(a, None).unwrap();
        let chunks = (0..17)
            .map(|n| PutChunk {
                id: id(n),
                codec: Codec::Raw,
                raw_len: 1 << 20,
                data: vec![0; 1 << 20],
            })
            .collect();
        let err = client
            .send_request(V, 1, &Request::Put { level: 1, chunks })
            .unwrap_err();
        assert!(matches!(err, ConnError::Frame(FrameError::TooLarge(_))));
        assert_eq!(err.code(), Some(ErrorCode::TooLarge));
        assert!(!client.wants_write());
    }

    /// Non-blocking flow control: with undelivered frames nothing more is read, and what
    /// is read is bounded.
    #[test]
    fn flow_control_stops_reading() {
        let (a, b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let mut server = FramedConn::new_server(b, None).unwrap();
        let mut w = a;
        let mut sent = Vec::new();
        for i in 0..50u64 {
            sent.extend_from_slice(&frame_request(V, i, &Request::Get { id: id(i as u32) }));
        }
        w.write_all(&sent).unwrap();
        let mut frames = Vec::new();
        assert_eq!(
            server.read_frames(&mut frames, 0).unwrap(),
            ReadStatus::Open
        );
        assert!(frames.is_empty());
        assert_eq!(server.buffered_in(), 0, "max_frames=0 reads nothing");
        assert_eq!(
            server.read_frames(&mut frames, 3).unwrap(),
            ReadStatus::Open
        );
        assert_eq!(frames.len(), 3);
        assert!(server.buffered_in() <= READ_CHUNK);
        assert_eq!(
            server.read_frames(&mut frames, 100).unwrap(),
            ReadStatus::Open
        );
        assert_eq!(frames.len(), 50);
        for (i, f) in frames.iter().enumerate() {
            assert_eq!(f.request_id, i as u64);
            assert_eq!(
                Request::decode(f.opcode, &f.body).unwrap(),
                Request::Get { id: id(i as u32) }
            );
        }
        // A frame cut by EOF is an error, not a hang.
        w.write_all(&frame_request(V, 99, &Request::Stats)[..HEADER_BYTES - 1])
            .unwrap();
        drop(w);
        let mut more = Vec::new();
        assert!(matches!(
            server.read_frames(&mut more, 10),
            Err(ConnError::Frame(FrameError::Truncated { buffered: 31 }))
        ));
    }

    #[test]
    fn clean_close_after_frames() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let mut server = FramedConn::new_server(b, None).unwrap();
        a.write_all(&frame_request(V, 1, &Request::Map)).unwrap();
        a.write_all(&frame_request(V, 2, &Request::Map)).unwrap();
        drop(a);
        let mut frames = Vec::new();
        assert_eq!(
            server.read_frames(&mut frames, 1).unwrap(),
            ReadStatus::Open
        );
        assert_eq!(
            server.read_frames(&mut frames, 1).unwrap(),
            ReadStatus::Open
        );
        assert_eq!(
            server.read_frames(&mut frames, 1).unwrap(),
            ReadStatus::Closed
        );
        assert_eq!(frames.len(), 2);
        assert!(matches!(server.recv_frame(), Err(ConnError::Closed)));
    }

    /// The decoder refuses a 4 GiB header from the socket without allocating for it.
    #[test]
    fn huge_header_over_a_socket() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let mut server = FramedConn::new_server(b, None).unwrap();
        let mut f = encode_frame(V, Opcode::Put as u16, 1, b"");
        f[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        crate::frame::reseal_header(&mut f);
        a.write_all(&f).unwrap();
        let err = server.recv_request().unwrap_err();
        assert!(matches!(
            err,
            ConnError::Frame(FrameError::TooLarge(u32::MAX))
        ));
        assert_eq!(err.code(), Some(ErrorCode::TooLarge));
    }

    #[test]
    fn bad_messages_over_a_socket() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let mut server = FramedConn::new_server(b, None).unwrap();
        a.write_all(&encode_frame(V, 4242, 1, b"")).unwrap();
        let err = server.recv_request().unwrap_err();
        assert!(matches!(
            err,
            ConnError::Decode(DecodeError::UnknownOpcode(4242))
        ));
        assert_eq!(err.code(), Some(ErrorCode::UnknownOpcode));
        // A message error does not desynchronise the stream: the next frame is fine.
        let (op, mut body) = Request::Get { id: id(1) }.encode();
        body.push(0);
        a.write_all(&encode_frame(V, op as u16, 2, &body)).unwrap();
        assert!(matches!(
            server.recv_request(),
            Err(ConnError::Decode(DecodeError::TrailingBytes(1)))
        ));
        a.write_all(&frame_request(V, 3, &Request::Stats)).unwrap();
        assert_eq!(server.recv_request().unwrap(), (3, Request::Stats));
    }

    /// xorshift64*: the tests' own PRNG.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    fn mutate(rng: &mut Rng, mut v: Vec<u8>) -> Vec<u8> {
        for _ in 0..=rng.below(4) {
            if v.is_empty() {
                break;
            }
            let i = rng.below(v.len() as u64) as usize;
            match rng.below(4) {
                0 => v[i] ^= 1 << rng.below(8),
                1 => v[i] = 0xff,
                2 => v.truncate(i),
                _ => v.insert(i, rng.next() as u8),
            }
        }
        v
    }

    /// Random and mutated bytes through the frame decoder and both message decoders never
    /// panic and never allocate beyond the frame limit.
    #[test]
    fn fuzz_decoders_never_panic() {
        let mut valid: Vec<(u16, Vec<u8>)> = Vec::new();
        for r in crate::proto::tests::sample_requests() {
            let (op, body) = r.encode();
            valid.push((op as u16, body));
        }
        for r in crate::proto::tests::sample_responses() {
            let (op, body) = r.encode();
            valid.push((op as u16, body));
        }
        let mut outcomes = [0usize; 2];
        for seed in 1..=3000u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            // Message decoders: pure noise under every opcode, and mutated valid bodies.
            let n = rng.below(200) as usize;
            let noise = rng.bytes(n);
            let opcode = if rng.below(4) == 0 {
                rng.next() as u16
            } else {
                rng.below(20) as u16
            };
            let _ = Request::decode(opcode, &noise);
            let _ = Response::decode(opcode, &noise);
            let (op, body) = &valid[rng.below(valid.len() as u64) as usize];
            let m = mutate(&mut rng, body.clone());
            let ok = Request::decode(*op, &m).is_ok() | Response::decode(*op, &m).is_ok();
            outcomes[ok as usize] += 1;

            // Frame decoder: noise, and mutated valid frame streams, in random pieces.
            let stream = if rng.below(2) == 0 {
                let n = rng.below(300) as usize;
                rng.bytes(n)
            } else {
                let mut s = Vec::new();
                for _ in 0..=rng.below(3) {
                    let (op, body) = &valid[rng.below(valid.len() as u64) as usize];
                    encode_frame_into(&mut s, V, *op, rng.next(), body);
                }
                mutate(&mut rng, s)
            };
            let mut d = FrameDecoder::new();
            let mut rest = &stream[..];
            'feed: while !rest.is_empty() {
                let n = (rng.below(64) as usize + 1).min(rest.len());
                let taken = d.push(&rest[..n]);
                assert_eq!(taken, n);
                rest = &rest[n..];
                loop {
                    match d.pop() {
                        Ok(Some(f)) => {
                            let _ = Request::decode(f.opcode, &f.body);
                            let _ = Response::decode(f.opcode, &f.body);
                        }
                        Ok(None) => break,
                        Err(_) => break 'feed,
                    }
                }
                assert!(d.buffered() <= MAX_FRAME_BYTES);
            }
            let _ = d.finish();
        }
        assert!(outcomes[0] > 0 && outcomes[1] > 0, "{outcomes:?}");
    }
}
