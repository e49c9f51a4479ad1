//! The replication transport: a shard's links to the shards of other nodes, over which a
//! bucket's primary sends copies of the chunks it stores (`Replicate` requests).
//!
//! [`ReplicationTransport`] is the seam (TCP + TLS here; RDMA later): the shard loop
//! hands it copies to send and gets back, for each, the other node's answer or a failure.
//! [`TcpLinks`] keeps one connection per (node, shard) in the shard's own `mio` poll, so
//! a shard forwards without threads or locks. A link authenticates as a *peer*: mutual
//! TLS with this node's certificate (issued by the hive CA) and an empty token; the other
//! node accepts `Replicate` only from such connections.
//!
//! With `--net dpdk` ([`TcpLinks::over_user_stack`]) a link to an IPv4 address that is
//! not loopback is a connection of the shard's userspace TCP stack, from the shard's own
//! source-port range (so the other node's answers come back to this shard's queue or are
//! handed to it), under the same framed connection and TLS; no poll reports its
//! readiness, so the shard loop calls [`ReplicationTransport::poll_streams`] every turn.
//!
//! Failure: a dial refused, a TLS or framing error, a peer that closes, or a connect that
//! does not complete within [`CONNECT_TIMEOUT`] fails every send in flight on that link
//! (reported, never silently dropped) and the link is redialled on the next send, but not
//! within [`REDIAL_AFTER`] of a failed dial: sends to a node that cannot be reached fail
//! at once. A peer that accepts and then goes silent is the caller's concern: the
//! replicator's per-attempt deadline fails the copy over to another node.

use crate::stream::Stream;
use hivefs_net::conn::{FramedConn, ReadStatus};
use hivefs_net::frame::{Frame, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN};
use hivefs_net::placement::MapNode;
use hivefs_net::proto::{
    frame_replicate_into, frame_request, ChunkRef, PutResult, Request, Response,
};
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A connect that has not completed by then fails its link.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A node whose dial failed is not dialled again for this long (its sends fail at once).
pub const REDIAL_AFTER: Duration = Duration::from_millis(500);
/// Tokens at and above this belong to links (a shard's own connections count up from 3).
pub const FIRST_LINK_TOKEN: usize = 1 << 40;
/// Frames answered per link per readiness event before the loop moves on.
const READ_BATCH: usize = 64;

/// Identifies one send, for matching its outcome.
pub type SendId = u64;

/// What became of a send: the other node's per-chunk results, or why there are none.
pub type SendOutcome = Result<Vec<PutResult>, String>;

/// See the module docs.
pub trait ReplicationTransport {
    /// Send copies of `chunks` to shard `shard` of node `to` (`hint_for`: 0, or the node
    /// this is a hinted copy for), to be stored at `level`. The outcome comes out of
    /// [`drain`](Self::drain), once.
    fn send(
        &mut self,
        to: &MapNode,
        shard: u16,
        hint_for: u64,
        level: u8,
        chunks: &[ChunkRef<'_>],
    ) -> SendId;
    /// Whether `token` is one of this transport's; if so, handle its readiness.
    fn ready(&mut self, token: Token) -> bool;
    /// Time passed: fail links whose connect is overdue.
    fn tick(&mut self, now: Instant);
    /// Take the outcomes so far.
    fn drain(&mut self, out: &mut Vec<(SendId, SendOutcome)>);
    /// Sends not yet answered.
    fn in_flight(&self) -> usize;
    /// Look at links whose readiness no poll reports (userspace streams): every loop
    /// turn, after the shard's network path has run.
    fn poll_streams(&mut self) {}
}

struct Link {
    key: (u64, u16),
    conn: FramedConn<Stream>,
    /// Until the connect completes nothing is written (the socket is not connected yet).
    connected: bool,
    dialled: Instant,
    hello_id: u64,
    hello_ok: bool,
    next_req: u64,
    /// Request id -> the send it carries.
    pending: HashMap<u64, SendId>,
}

/// [`ReplicationTransport`] over TCP (TLS with this node's certificate when `tls`).
pub struct TcpLinks {
    registry: Registry,
    /// The shard's userspace TCP stack (`--net dpdk`): links to other nodes go over it.
    #[cfg(feature = "dpdk")]
    user: Option<hivefs_dpdk::stack::UserStack>,
    tls: Option<Arc<rustls::ClientConfig>>,
    /// Told in each Hello (the other side logs it).
    name: String,
    links: HashMap<Token, Link>,
    by_key: HashMap<(u64, u16), Token>,
    /// When a dial to a node last failed.
    failed_dial: HashMap<u64, Instant>,
    next_token: usize,
    next_send: SendId,
    done: Vec<(SendId, SendOutcome)>,
    frame: Vec<u8>,
    frames: Vec<Frame>,
    /// Links whose last read stopped at a full batch: more may be buffered, which no
    /// readiness event will announce (edge-triggered), so `tick` reads them again.
    unread: std::collections::HashSet<Token>,
}

impl TcpLinks {
    /// Links registered in the poll of `registry` (a clone of the shard's).
    pub fn new(
        registry: Registry,
        tls: Option<Arc<rustls::ClientConfig>>,
        name: String,
    ) -> TcpLinks {
        TcpLinks {
            registry,
            #[cfg(feature = "dpdk")]
            user: None,
            tls,
            name,
            links: HashMap::new(),
            by_key: HashMap::new(),
            failed_dial: HashMap::new(),
            next_token: FIRST_LINK_TOKEN,
            next_send: 1,
            done: Vec::new(),
            frame: Vec::new(),
            frames: Vec::new(),
            unread: std::collections::HashSet::new(),
        }
    }

    /// Dial other nodes through the shard's userspace stack (see the module docs).
    #[cfg(feature = "dpdk")]
    pub fn over_user_stack(mut self, stack: hivefs_dpdk::stack::UserStack) -> TcpLinks {
        self.user = Some(stack);
        self
    }

    /// A connection to `addr`: through the userspace stack where there is one and the
    /// address is reachable through it, else a kernel socket registered with the poll.
    fn open_stream(&mut self, addr: SocketAddr, token: Token) -> Result<Stream, String> {
        #[cfg(feature = "dpdk")]
        if let (Some(stack), SocketAddr::V4(v4)) = (&self.user, addr) {
            if !v4.ip().is_loopback() {
                return stack
                    .connect(v4)
                    .map(Stream::User)
                    .map_err(|e| format!("connecting to {addr} (userspace TCP): {e}"));
            }
        }
        let mut stream =
            TcpStream::connect(addr).map_err(|e| format!("connecting to {addr}: {e}"))?;
        let _ = stream.set_nodelay(true);
        let _ = hivefs_net::tcp::detect_dead_peer(&stream);
        self.registry
            .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
            .map_err(|e| format!("registering a link to {addr}: {e}"))?;
        Ok(Stream::Kernel(stream))
    }

    fn dial(&mut self, to: &MapNode, shard: u16) -> Result<Token, String> {
        if let Some(t) = self.failed_dial.get(&to.id) {
            if t.elapsed() < REDIAL_AFTER {
                return Err(format!("node {} was unreachable moments ago", to.name));
            }
        }
        let r = self.dial_now(to, shard);
        match &r {
            Ok(_) => {
                self.failed_dial.remove(&to.id);
            }
            Err(e) => {
                tracing::warn!(node = %to.name, "replication link: {e}");
                self.failed_dial.insert(to.id, Instant::now());
            }
        }
        r
    }

    fn dial_now(&mut self, to: &MapNode, shard: u16) -> Result<Token, String> {
        let port = to.base_port as u32 + shard as u32;
        let host = to.host.trim_start_matches('[').trim_end_matches(']');
        let addr: SocketAddr = (host, port as u16)
            .to_socket_addrs()
            .map_err(|e| format!("resolving {host}: {e}"))?
            .next()
            .ok_or_else(|| format!("{host}: no address"))?;
        let token = Token(self.next_token);
        self.next_token += 1;
        let stream = self.open_stream(addr, token)?;
        let tls = match &self.tls {
            Some(cfg) => Some((
                cfg.clone(),
                hivefs_net::tls::server_name(host).map_err(|e| e.to_string())?,
            )),
            None => None,
        };
        let mut conn = FramedConn::new_client(stream, tls).map_err(|e| e.to_string())?;
        // The Hello goes first; a peer authenticates by its certificate, with no token.
        let hello = Request::Hello {
            min_version: PROTOCOL_VERSION_MIN,
            max_version: PROTOCOL_VERSION_MAX,
            token: String::new(),
            client_name: format!("{} (replication)", self.name),
        };
        conn.queue_frame(&frame_request(PROTOCOL_VERSION_MIN, 1, &hello));
        self.links.insert(
            token,
            Link {
                key: (to.id, shard),
                conn,
                connected: false,
                dialled: Instant::now(),
                hello_id: 1,
                hello_ok: false,
                next_req: 2,
                pending: HashMap::new(),
            },
        );
        self.by_key.insert((to.id, shard), token);
        Ok(token)
    }

    /// Drop a link; every send in flight on it fails with `why`.
    fn fail(&mut self, token: Token, why: &str) {
        let Some(mut l) = self.links.remove(&token) else {
            return;
        };
        self.by_key.remove(&l.key);
        if let Some(k) = l.conn.get_mut().kernel() {
            let _ = self.registry.deregister(k);
        }
        if !l.pending.is_empty() {
            tracing::warn!(
                node = l.key.0,
                shard = l.key.1,
                sends = l.pending.len(),
                "replication link failed: {why}"
            );
        }
        if !l.connected {
            self.failed_dial.insert(l.key.0, Instant::now());
        }
        for (_, s) in l.pending.drain() {
            self.done.push((s, Err(why.to_string())));
        }
    }

    /// Write what the link has queued (once connected).
    fn flush(&mut self, token: Token) {
        let Some(l) = self.links.get_mut(&token) else {
            return;
        };
        if !l.connected {
            return;
        }
        if let Err(e) = l.conn.flush() {
            let why = format!("writing: {e}");
            self.fail(token, &why);
        }
    }
}

impl ReplicationTransport for TcpLinks {
    fn send(
        &mut self,
        to: &MapNode,
        shard: u16,
        hint_for: u64,
        level: u8,
        chunks: &[ChunkRef<'_>],
    ) -> SendId {
        let id = self.next_send;
        self.next_send += 1;
        let token = match self.by_key.get(&(to.id, shard)) {
            Some(t) => *t,
            None => match self.dial(to, shard) {
                Ok(t) => t,
                Err(e) => {
                    self.done.push((id, Err(e)));
                    return id;
                }
            },
        };
        let Some(l) = self.links.get_mut(&token) else {
            self.done.push((id, Err("no link".into())));
            return id;
        };
        let req = l.next_req;
        l.next_req += 1;
        self.frame.clear();
        let check = l.conn.body_check();
        frame_replicate_into(
            &mut self.frame,
            check,
            PROTOCOL_VERSION_MIN,
            req,
            hint_for,
            level,
            chunks,
        );
        l.conn.queue_frame(&self.frame);
        l.pending.insert(req, id);
        if self.frame.capacity() > hivefs_net::frame::IDLE_BUFFER_KEEP_BYTES {
            self.frame = Vec::new();
        }
        self.flush(token);
        id
    }

    fn ready(&mut self, token: Token) -> bool {
        if token.0 < FIRST_LINK_TOKEN {
            return false;
        }
        let Some(l) = self.links.get_mut(&token) else {
            return true;
        };
        if !l.connected {
            // Writable (or an error) after a non-blocking connect: did it work?
            match connect_status(l.conn.get_mut()) {
                Ok(true) => {
                    l.connected = true;
                    let transport = match l.conn.get_mut().kernel() {
                        Some(_) => "kernel TCP",
                        None => "userspace TCP",
                    };
                    tracing::info!(
                        node = l.key.0,
                        shard = l.key.1,
                        transport,
                        "replication link connected"
                    );
                }
                Ok(false) => return true,
                Err(why) => {
                    self.fail(token, &why);
                    return true;
                }
            }
        }
        self.frames.clear();
        let status = l.conn.read_frames(&mut self.frames, READ_BATCH);
        if self.frames.len() == READ_BATCH {
            self.unread.insert(token);
        } else {
            self.unread.remove(&token);
        }
        let mut error: Option<String> = None;
        for f in self.frames.drain(..) {
            let resp = match Response::decode(f.opcode, &f.body) {
                Ok(r) => r,
                Err(e) => {
                    error = Some(format!("bad reply: {e}"));
                    break;
                }
            };
            if f.request_id == l.hello_id {
                match resp {
                    Response::HelloOk { .. } => l.hello_ok = true,
                    other => {
                        error = Some(format!("refused the link: {other:?}"));
                        break;
                    }
                }
                continue;
            }
            let Some(send) = l.pending.remove(&f.request_id) else {
                // A request id this link never sent, or an error closing the link
                // (answered to request 0): the link is out of step.
                error = Some(match resp {
                    Response::Error { code, message } => format!("{code:?}: {message}"),
                    _ => format!("reply to request {}, not in flight", f.request_id),
                });
                break;
            };
            let outcome = match resp {
                Response::PutReply { results, .. } => Ok(results),
                Response::Error { code, message } => Err(format!("{code:?}: {message}")),
                other => Err(format!("unexpected {:?}", other.opcode())),
            };
            self.done.push((send, outcome));
        }
        match (error, status) {
            (Some(e), _) => self.fail(token, &e),
            (None, Err(e)) => self.fail(token, &format!("reading: {e}")),
            (None, Ok(ReadStatus::Closed)) => self.fail(token, "closed by the other node"),
            (None, Ok(_)) => {
                // More frames may be buffered than one batch: the loop comes back while
                // sends are in flight (see `tick`); flush what the handshake queued.
                self.flush(token);
            }
        }
        true
    }

    fn tick(&mut self, now: Instant) {
        let overdue: Vec<Token> = self
            .links
            .iter()
            .filter(|(_, l)| !l.connected && now.duration_since(l.dialled) >= CONNECT_TIMEOUT)
            .map(|(t, _)| *t)
            .collect();
        for t in overdue {
            self.fail(t, "connect timed out");
        }
        // A read stops after a batch of frames, and edge-triggered readiness does not
        // announce what is already buffered: those links are read again.
        let unread: Vec<Token> = self.unread.drain().collect();
        for t in unread {
            self.ready(t);
        }
    }

    fn drain(&mut self, out: &mut Vec<(SendId, SendOutcome)>) {
        out.append(&mut self.done);
    }

    fn in_flight(&self) -> usize {
        self.links.values().map(|l| l.pending.len()).sum()
    }

    #[cfg(feature = "dpdk")]
    fn poll_streams(&mut self) {
        if self.user.is_none() {
            return;
        }
        let ready: Vec<Token> = self
            .links
            .iter_mut()
            .filter_map(|(t, l)| {
                let wants_write = l.conn.wants_write();
                match l.conn.get_mut() {
                    Stream::User(u)
                        if (!l.connected && !u.connecting()) || u.ready(wants_write) =>
                    {
                        Some(*t)
                    }
                    _ => None,
                }
            })
            .collect();
        for t in ready {
            self.ready(t);
        }
    }
}

/// Whether a non-blocking connect has completed (`Ok(false)`: not yet), or why it failed.
fn connect_status(s: &mut Stream) -> Result<bool, String> {
    match s {
        Stream::Kernel(k) => {
            match k.take_error() {
                Ok(Some(e)) | Err(e) => return Err(format!("connecting: {e}")),
                Ok(None) => {}
            }
            match k.peer_addr() {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::NotConnected => Ok(false),
                Err(e) => Err(format!("connecting: {e}")),
            }
        }
        #[cfg(feature = "dpdk")]
        Stream::User(u) => {
            if u.connecting() {
                Ok(false)
            } else if u.established() {
                Ok(true)
            } else {
                Err("connecting: refused or reset (userspace TCP)".into())
            }
        }
    }
}
