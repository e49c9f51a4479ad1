//! Bad input on the wire: each bad input, on a fresh connection, gets an `Error` frame with
//! the right code, then the node closes that connection and logs a warning naming the
//! peer; nothing else is affected (a kept, authenticated connection still does a
//! has/put/get round trip after every case, and the node stays up).
//!
//! Run against a TLS node (bad bytes inside TLS, over `FramedConn` with the pinned CA) and
//! an `--insecure` node (the same bad bytes raw over TCP), plus raw non-TLS garbage at a
//! TLS port.

use hivefs_client::hive::HiveClient;
use hivefs_harness::{finish_handshake, recv_until, NodeOptions, Rng, TestNode};
use hivefs_net::chunk::{ChunkId, Codec, DedupeKey};
use hivefs_net::frame::{
    encode_frame, encode_frame_checked_with, BodyCheck, HEADER_BYTES, MAGIC, PROTOCOL_VERSION_MAX,
    PROTOCOL_VERSION_MIN,
};
use hivefs_net::proto::{frame_request, ErrorCode, PutChunk, PutResult, Request, Response};
use std::io::{Read, Write};
use std::net::Shutdown;
use std::time::{Duration, Instant};

const V: u16 = PROTOCOL_VERSION_MIN;
const REPLY_TIMEOUT: Duration = Duration::from_secs(20);

/// How the client ends its side after sending.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Ending {
    /// Keep the connection open; the node must answer and close.
    Open,
    /// Shut down our writing side (EOF to the node) but keep reading.
    HalfClose,
    /// Close the socket outright: nothing can be answered.
    Close,
}

struct Case {
    name: &'static str,
    bytes: Vec<u8>,
    ending: Ending,
    /// Good replies expected before the error (a Hello first, for instance).
    ok_replies: usize,
    /// The error expected: code and the request id it answers (0 for frame-level errors).
    expect: Option<(ErrorCode, u64)>,
    /// What the node's warning line must contain (besides the peer address); `None` for
    /// inputs the node does not log (see `second_hello_is_logged`).
    log: Option<&'static str>,
}

fn hello(token: &str, min: u16, max: u16) -> Request {
    Request::Hello {
        min_version: min,
        max_version: max,
        token: token.into(),
        client_name: "bad-frames".into(),
    }
}

/// Recompute the header checksum after editing header fields.
fn fix_header_crc(f: &mut [u8]) {
    let mut covered = f[..24].to_vec();
    covered.extend_from_slice(&f[28..32]);
    let crc = crc32c(&covered);
    f[24..28].copy_from_slice(&crc.to_le_bytes());
}

fn crc32c(b: &[u8]) -> u32 {
    // CRC-32C (Castagnoli), bitwise; only for the 28 covered header bytes.
    let mut crc = !0u32;
    for &x in b {
        crc ^= x as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn cases(token: &str, rng: &mut Rng, plain: bool) -> Vec<Case> {
    let good_hello = frame_request(
        V,
        1,
        &hello(token, PROTOCOL_VERSION_MIN, PROTOCOL_VERSION_MAX),
    );
    let mut garbage = rng.bytes(1000);
    if garbage[..4] == MAGIC.to_le_bytes() {
        garbage[0] ^= 0xff;
    }
    let mut huge = encode_frame(V, 12, 9, b"");
    huge[16..20].copy_from_slice(&0xFFFF_FFFFu32.to_le_bytes());
    fix_header_crc(&mut huge);
    // Version 1, before levels: refused by version alone.
    let mut version = frame_request(V, 1, &hello(token, 1, 1));
    version[4..6].copy_from_slice(&1u16.to_le_bytes());
    fix_header_crc(&mut version);
    let mut flags = frame_request(V, 1, &Request::Stats);
    flags[28] = 2; // not a defined flag
    fix_header_crc(&mut flags);
    // A body flagged "the transport checks it": fine inside TLS, refused on plain TCP.
    let mut unchecked = good_hello.clone();
    let mut f = Vec::new();
    encode_frame_checked_with(&mut f, BodyCheck::Transport, V, 10, 3, |b| {
        b.extend_from_slice(&0u32.to_le_bytes())
    });
    unchecked.extend_from_slice(&f);
    let mut header_crc = frame_request(V, 1, &Request::Stats);
    header_crc[9] ^= 1; // the request id changes, the checksum is not fixed
    let mut body_crc = good_hello.clone();
    *body_crc.last_mut().unwrap() ^= 0x20;
    let mut unknown_op = good_hello.clone();
    unknown_op.extend_from_slice(&encode_frame(V, 4242, 2, b"whatever"));
    let mut response_op = good_hello.clone();
    response_op.extend_from_slice(&frame_request(V, 3, &Request::Stats)[..]);
    // An opcode that exists but only from node to client (HelloOk = 2).
    response_op.extend_from_slice(&encode_frame(V, 2, 4, b""));
    let mut short_has = good_hello.clone();
    // A Has claiming 3 ids but carrying one.
    let mut body = vec![1u8]; // level
    body.extend_from_slice(&3u32.to_le_bytes());
    body.extend_from_slice(&ChunkId::compute(&DedupeKey([0; 32]), b"x").0);
    short_has.extend_from_slice(&encode_frame(V, 10, 5, &body));
    // A Has asking for level 0 (no chunk can have no copies).
    let mut level_zero = good_hello.clone();
    let mut body = vec![0u8];
    body.extend_from_slice(&1u32.to_le_bytes());
    body.extend_from_slice(&ChunkId::compute(&DedupeKey([0; 32]), b"x").0);
    level_zero.extend_from_slice(&encode_frame(V, 10, 5, &body));
    // A Put whose one chunk claims more data bytes than the body holds (decoded in place).
    let mut short_put = good_hello.clone();
    let mut body = vec![1u8]; // level
    body.extend_from_slice(&1u32.to_le_bytes());
    body.extend_from_slice(&ChunkId::compute(&DedupeKey([0; 32]), b"x").0);
    body.push(Codec::Raw as u8);
    body.extend_from_slice(&1u32.to_le_bytes()); // raw_len
    body.extend_from_slice(&1000u32.to_le_bytes()); // data length, but only 1 byte follows
    body.push(b'x');
    short_put.extend_from_slice(&encode_frame(V, 12, 5, &body));
    let truncated = good_hello[..HEADER_BYTES + 8].to_vec();
    let mut second_hello = good_hello.clone();
    second_hello.extend_from_slice(&frame_request(
        V,
        2,
        &hello(token, PROTOCOL_VERSION_MIN, PROTOCOL_VERSION_MAX),
    ));
    let mut list = Vec::new();
    if plain {
        list.push(Case {
            name: "body without checksum on plain TCP",
            bytes: unchecked,
            ending: Ending::Open,
            ok_replies: 0,
            expect: Some((ErrorCode::BadFrame, 0)),
            log: Some("transport that does not authenticate it"),
        });
    }
    list.extend([
        Case {
            name: "random garbage",
            bytes: garbage,
            ending: Ending::Open,
            ok_replies: 0,
            expect: Some((ErrorCode::BadFrame, 0)),
            log: Some("bad input, closing the connection: framing: bad frame magic"),
        },
        Case {
            name: "header declaring 4 GiB (valid header crc)",
            bytes: huge,
            ending: Ending::Open,
            ok_replies: 0,
            expect: Some((ErrorCode::TooLarge, 0)),
            log: Some("frame body of 4294967295 bytes exceeds the limit"),
        },
        Case {
            name: "wrong protocol version in the frame header",
            bytes: version,
            ending: Ending::Open,
            ok_replies: 0,
            expect: Some((ErrorCode::UnsupportedVersion, 0)),
            log: Some("unsupported protocol version 1"),
        },
        Case {
            name: "Hello offering only versions above this build's",
            bytes: frame_request(
                V,
                7,
                &hello(token, PROTOCOL_VERSION_MAX + 1, PROTOCOL_VERSION_MAX + 7),
            ),
            ending: Ending::Open,
            ok_replies: 0,
            expect: Some((ErrorCode::UnsupportedVersion, 7)),
            log: Some("no common protocol version"),
        },
        Case {
            name: "unknown header flag",
            bytes: flags,
            ending: Ending::Open,
            ok_replies: 0,
            expect: Some((ErrorCode::BadFrame, 0)),
            log: Some("unknown frame flags 0x2"),
        },
        Case {
            name: "header checksum wrong",
            bytes: header_crc,
            ending: Ending::Open,
            ok_replies: 0,
            expect: Some((ErrorCode::BadChecksum, 0)),
            log: Some("frame header checksum mismatch"),
        },
        Case {
            name: "body checksum wrong",
            bytes: body_crc,
            ending: Ending::Open,
            ok_replies: 0,
            expect: Some((ErrorCode::BadChecksum, 0)),
            log: Some("frame body checksum mismatch"),
        },
        Case {
            name: "unknown opcode 4242 (after Hello)",
            bytes: unknown_op,
            ending: Ending::Open,
            ok_replies: 1,
            expect: Some((ErrorCode::UnknownOpcode, 2)),
            log: Some("bad request, closing the connection: unknown opcode 4242"),
        },
        Case {
            name: "response opcode sent as a request",
            bytes: response_op,
            ending: Ending::Open,
            ok_replies: 2,
            expect: Some((ErrorCode::BadRequest, 4)),
            log: Some(
                "bad request, closing the connection: opcode 2 is not valid in this direction",
            ),
        },
        Case {
            name: "Has body shorter than its count",
            bytes: short_has,
            ending: Ending::Open,
            ok_replies: 1,
            expect: Some((ErrorCode::BadRequest, 5)),
            log: Some("bad request, closing the connection: message truncated"),
        },
        Case {
            name: "Has at level 0",
            bytes: level_zero,
            ending: Ending::Open,
            ok_replies: 1,
            expect: Some((ErrorCode::BadRequest, 5)),
            log: Some("bad request, closing the connection: invalid level: 0"),
        },
        Case {
            name: "request before Hello (no token)",
            bytes: frame_request(
                V,
                5,
                &Request::Has {
                    level: 1,
                    ids: vec![ChunkId::compute(&DedupeKey([0; 32]), b"x")],
                },
            ),
            ending: Ending::Open,
            ok_replies: 0,
            expect: Some((ErrorCode::Unauthenticated, 5)),
            log: Some("request before Hello"),
        },
        Case {
            name: "put before Hello (no token)",
            bytes: frame_request(
                V,
                5,
                &Request::Put {
                    level: 1,
                    chunks: vec![PutChunk {
                        id: ChunkId::compute(&DedupeKey([0; 32]), b"x"),
                        codec: Codec::Raw,
                        raw_len: 1,
                        data: b"x".to_vec(),
                    }],
                },
            ),
            ending: Ending::Open,
            ok_replies: 0,
            expect: Some((ErrorCode::Unauthenticated, 5)),
            log: Some("request before Hello"),
        },
        Case {
            name: "Put body shorter than its chunk",
            bytes: short_put,
            ending: Ending::Open,
            ok_replies: 1,
            expect: Some((ErrorCode::BadRequest, 5)),
            log: Some("bad request, closing the connection: message truncated"),
        },
        Case {
            name: "Hello with a bad token",
            bytes: frame_request(
                V,
                6,
                &hello("not-the-token", PROTOCOL_VERSION_MIN, PROTOCOL_VERSION_MAX),
            ),
            ending: Ending::Open,
            ok_replies: 0,
            expect: Some((ErrorCode::BadToken, 6)),
            log: Some("bad token"),
        },
        Case {
            name: "a second Hello on an authenticated connection",
            bytes: second_hello,
            ending: Ending::Open,
            ok_replies: 1,
            expect: Some((ErrorCode::BadRequest, 2)),
            log: None,
        },
        Case {
            name: "truncated frame, then EOF (half close)",
            bytes: truncated.clone(),
            ending: Ending::HalfClose,
            ok_replies: 0,
            expect: Some((ErrorCode::BadFrame, 0)),
            log: Some("stream ended inside a frame"),
        },
        Case {
            name: "truncated frame, then close",
            bytes: truncated,
            ending: Ending::Close,
            ok_replies: 0,
            expect: None,
            log: Some("stream ended inside a frame"),
        },
    ]);
    list
}

/// The log line for `peer` containing `needle`, waiting up to 10 s for it to appear.
fn log_line(node: &TestNode, peer: &str, needle: &str) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = node.log();
        if let Some(l) = log.lines().find(|l| {
            l.contains(needle)
                && (l.contains(&format!("peer={peer} ")) || l.ends_with(&format!("peer={peer}")))
        }) {
            return Some(l.to_string());
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The kept connection still works: put a fresh chunk, has it, get it back.
fn round_trip(good: &mut HiveClient, rng: &mut Rng, after: &str) {
    let key = good.map().dedupe_key;
    let data = rng.bytes(10_000);
    let id = ChunkId::compute(&key, &data);
    let (r, _) = good
        .put(&[PutChunk {
            id,
            codec: Codec::Raw,
            raw_len: data.len() as u32,
            data: data.clone(),
        }])
        .unwrap_or_else(|e| panic!("kept connection broken after {after}: put: {e}"));
    assert_eq!(r, vec![PutResult::Stored], "after {after}");
    let (p, _) = good
        .has(&[id])
        .unwrap_or_else(|e| panic!("kept connection broken after {after}: has: {e}"));
    assert_eq!(p, vec![true], "after {after}");
    let g = good
        .get(&[id])
        .unwrap_or_else(|e| panic!("kept connection broken after {after}: get: {e}"));
    assert_eq!(g, vec![Some(data)], "after {after}");
}

fn run_cases(node: &mut TestNode, label: &str) {
    let mut rng = Rng::new(0xbad_f4a3e);
    let mut good = node.client();
    round_trip(&mut good, &mut rng, "connecting");
    let token = node.token();
    let mut seen = Vec::new();
    for case in cases(&token, &mut rng, node.is_insecure()) {
        let what = format!("{label}: {}", case.name);
        let mut conn = node.raw_conn(0);
        let peer = conn.get_ref().local_addr().unwrap().to_string();
        // Complete TLS first so that the bytes below are exactly what the node decrypts.
        finish_handshake(&mut conn, REPLY_TIMEOUT).unwrap_or_else(|e| panic!("{what}: {e}"));
        conn.queue_frame(&case.bytes);
        conn.flush()
            .unwrap_or_else(|e| panic!("{what}: sending: {e}"));
        match case.ending {
            Ending::Open => {}
            Ending::HalfClose => conn.get_ref().shutdown(Shutdown::Write).unwrap(),
            Ending::Close => drop(conn.get_ref().shutdown(Shutdown::Both)),
        }
        if case.ending != Ending::Close {
            for i in 0..case.ok_replies {
                let r = recv_until(&mut conn, REPLY_TIMEOUT);
                match r.response() {
                    Some((_, Response::HelloOk { .. } | Response::StatsReply { .. })) => {}
                    _ => panic!("{what}: good reply {i} expected, got {r:?}"),
                }
            }
            let r = recv_until(&mut conn, REPLY_TIMEOUT);
            let (code, req) = case.expect.unwrap();
            match r.response() {
                Some((rid, Response::Error { code: c, message })) => {
                    assert_eq!(c, code, "{what}: error code (message {message:?})");
                    assert_eq!(rid, req, "{what}: request id of the error");
                    println!("{what}: got {c:?} for request {rid}: {message}");
                }
                _ => panic!("{what}: expected an Error frame with {code:?}, got {r:?}"),
            }
            let end = recv_until(&mut conn, REPLY_TIMEOUT);
            assert!(
                end.is_closed(),
                "{what}: the node must close the connection after the error, got {end:?}"
            );
        }
        drop(conn);
        if let Some(needle) = case.log {
            let line = log_line(node, &peer, needle).unwrap_or_else(|| {
                panic!(
                    "{what}: no log line with {needle:?} for peer {peer}\n{}",
                    node.log_tail(20)
                )
            });
            assert!(
                line.contains("WARN"),
                "{what}: logged, but not as a warning: {line}"
            );
            seen.push((what.clone(), line));
        }
        assert!(node.is_running(), "{what}: the node died");
        round_trip(&mut good, &mut rng, &what);
    }

    if !node.is_insecure() {
        // Raw non-TLS garbage at a TLS port: the TLS layer refuses it; the node closes the
        // connection (possibly after an alert) and logs it.
        let what = format!("{label}: raw garbage instead of a TLS handshake");
        let mut s = node.raw_tcp(0);
        let peer = s.local_addr().unwrap().to_string();
        s.write_all(&rng.bytes(1000)).unwrap();
        let deadline = Instant::now() + REPLY_TIMEOUT;
        let mut buf = [0u8; 4096];
        let mut got = 0;
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("{what}: {e}"),
            }
            assert!(
                Instant::now() < deadline,
                "{what}: the node did not close the connection"
            );
        }
        assert!(
            got < 100,
            "{what}: {got} bytes back: at most a TLS alert expected"
        );
        let line = log_line(node, &peer, "connection ended: TLS").unwrap_or_else(|| {
            panic!("{what}: no log line for peer {peer}\n{}", node.log_tail(20))
        });
        println!("{what}: closed after {got} bytes (an alert); logged");
        seen.push((what.clone(), line));
        assert!(node.is_running());
        round_trip(&mut good, &mut rng, &what);
    }

    // Every bad input left its own line; the node neither panicked nor failed a shard.
    let log = node.log();
    assert!(
        !log.contains("panicked"),
        "{label}: a thread panicked:\n{log}"
    );
    assert!(!log.contains("ERROR"), "{label}: errors logged:\n{log}");
    let warnings = log
        .lines()
        .filter(|l| {
            l.contains("WARN")
                && (l.contains("bad input")
                    || l.contains("bad request")
                    || l.contains("bad token")
                    || l.contains("request before Hello")
                    || l.contains("no common protocol version"))
        })
        .count();
    println!(
        "{label}: {} bad inputs, {warnings} warning lines:",
        seen.len()
    );
    for (what, line) in &seen {
        println!("  {what}\n    {line}");
    }
    let expected_warnings = seen.len() - (!node.is_insecure()) as usize;
    assert_eq!(
        warnings, expected_warnings,
        "{label}: one warning line per bad input"
    );
    let st = node.stop();
    assert!(
        st.success(),
        "{label}: clean stop after the bad inputs: {st}"
    );
}

#[test]
fn bad_frames_over_tls() {
    let mut node = TestNode::start(NodeOptions::default().shards(2).name("bad-frames-tls"));
    run_cases(&mut node, "tls");
}

#[test]
fn bad_frames_over_plain_tcp() {
    let mut node = TestNode::start(
        NodeOptions::default()
            .shards(1)
            .insecure(true)
            .name("bad-frames-plain"),
    );
    run_cases(&mut node, "plain");
}

/// A second Hello is refused like every other bad request, and like them it leaves a
/// warning naming the peer (node.rs module docs: "a log line naming the peer and request
/// id"). Ignored: the node answers BadRequest and closes, but logs nothing.
#[test]
fn second_hello_is_logged() {
    let node = TestNode::start(NodeOptions::default().shards(1).name("second-hello"));
    let mut conn = node.raw_conn(0);
    let peer = conn.get_ref().local_addr().unwrap().to_string();
    finish_handshake(&mut conn, REPLY_TIMEOUT).unwrap();
    let h = hello(&node.token(), PROTOCOL_VERSION_MIN, PROTOCOL_VERSION_MAX);
    let mut bytes = frame_request(V, 1, &h);
    bytes.extend_from_slice(&frame_request(V, 2, &h));
    conn.queue_frame(&bytes);
    conn.flush().unwrap();
    assert!(matches!(
        recv_until(&mut conn, REPLY_TIMEOUT).response(),
        Some((1, Response::HelloOk { .. }))
    ));
    assert!(matches!(
        recv_until(&mut conn, REPLY_TIMEOUT).response(),
        Some((
            2,
            Response::Error {
                code: ErrorCode::BadRequest,
                ..
            }
        ))
    ));
    assert!(recv_until(&mut conn, REPLY_TIMEOUT).is_closed());
    let line = log_line(&node, &peer, "Hello");
    assert!(
        line.as_deref().is_some_and(|l| l.contains("WARN")),
        "no warning for the second Hello from {peer}:\n{}",
        node.log_tail(10)
    );
}
