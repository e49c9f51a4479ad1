//! Node-to-node links on the metadata port: Raft's transport between the members of the
//! metadata cluster, and the link a joining node uses to ask the hive to admit it.
//!
//! - [`PeerLink`]: one blocking, framed, TLS connection to another node's metadata port
//!   (address `host:port`), with the same `Hello` as any client. A member authenticates
//!   with its node certificate (mutual TLS, see `hivefs_net::tls`): its `Hello` carries no
//!   token. A joining node is no member yet and authenticates with the admin token.
//! - [`PeerNet`]: openraft's network factory. Each target gets a [`Peer`] holding at most
//!   one `PeerLink`, dialled on first use and again after any failure. An RPC runs on
//!   tokio's blocking pool (the socket calls must not stall Raft's one worker thread), with
//!   openraft's per-RPC deadline as the socket timeout.
//!
//! # Invariants
//! - Raft traffic travels only between holders of node certificates of this hive: a server
//!   refuses `PeerRequest::Raft` on a connection whose client presented none.
//! - A failure to connect is `Unreachable` (openraft backs off before trying that node
//!   again); any failure after connecting drops the link and is a `Network` error; an
//!   answer that does not decode is a `Network` error too, never a panic.
//! - openraft's answers travel as the postcard encoding of its own `Result` types, so a
//!   remote Raft error (e.g. a higher vote) reaches the sender's Raft as that error.

use super::raft::TypeConfig;
use hivefs_net::conn::FramedConn;
use hivefs_net::frame::PROTOCOL_VERSION_MIN;
use hivefs_net::meta::{self, Answer, MetaReply, MetaRequest, PeerRequest, RaftRpc};
use hivefs_net::proto::{ErrorCode, Request, Response};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, RaftNetwork, RaftNetworkFactory};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

/// How long a node waits to connect to another.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a call to another node failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PeerError {
    /// No connection could be made.
    #[error("cannot connect to {addr}: {why}")]
    Connect { addr: String, why: String },
    /// The connection failed or timed out after it was made (the request may have arrived).
    #[error("link to {addr} failed: {why}")]
    Link { addr: String, why: String },
    /// The node answered with an error.
    #[error("{addr} refused: {code:?}: {message}")]
    Refused {
        addr: String,
        code: ErrorCode,
        message: String,
    },
}

impl PeerError {
    /// The leader's address, when the node refused because it does not lead and knows who
    /// does.
    pub fn leader(&self) -> Option<&str> {
        match self {
            PeerError::Refused {
                code: ErrorCode::NotLeader,
                message,
                ..
            } if !message.is_empty() => Some(message),
            _ => None,
        }
    }
}

/// The host part of `host:port` (`[v6]:port` too), for TLS's server name.
pub fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// One blocking connection to another node's metadata port. See the module docs.
pub struct PeerLink {
    conn: FramedConn<TcpStream>,
    /// The longest wait for an answer (the stream's read timeout ends each read).
    timeout: Duration,
    version: u16,
    next_id: u64,
    addr: String,
}

impl PeerLink {
    /// Connect to `addr` (`host:port`) with TLS (`tls`: the hive CA pinned, and for a
    /// member its node certificate) or, with `None`, plain TCP (`--insecure` hives), and
    /// say `Hello` with `token` (empty for a member: its certificate speaks for it).
    pub fn dial(
        addr: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
        token: &str,
        who: &str,
        timeout: Duration,
    ) -> Result<PeerLink, PeerError> {
        let connect = |why: String| PeerError::Connect {
            addr: addr.to_string(),
            why,
        };
        let sock = addr
            .to_socket_addrs()
            .map_err(|e| connect(e.to_string()))?
            .next()
            .ok_or_else(|| connect("no address".into()))?;
        let stream = TcpStream::connect_timeout(&sock, CONNECT_TIMEOUT.min(timeout))
            .map_err(|e| connect(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        stream
            .set_read_timeout(Some(timeout))
            .and_then(|_| stream.set_write_timeout(Some(timeout)))
            .map_err(|e| connect(e.to_string()))?;
        let tls = match tls {
            Some(c) => Some((
                c,
                hivefs_net::tls::server_name(host_of(addr)).map_err(|e| connect(e.to_string()))?,
            )),
            None => None,
        };
        let conn = FramedConn::new_client(stream, tls).map_err(|e| connect(e.to_string()))?;
        let mut link = PeerLink {
            conn,
            timeout,
            version: PROTOCOL_VERSION_MIN,
            next_id: 1,
            addr: addr.to_string(),
        };
        let hello = Request::Hello {
            min_version: PROTOCOL_VERSION_MIN,
            max_version: super::version::speaks(),
            token: token.to_string(),
            client_name: who.to_string(),
        };
        match link.request(&hello) {
            Ok(Response::HelloOk { version, .. }) => {
                link.version = version;
                Ok(link)
            }
            Ok(other) => Err(link.refused(other)),
            // The handshake happens during the first exchange: a failure there is a
            // failure to connect.
            Err(PeerError::Link { why, .. }) => Err(connect(why)),
            Err(e) => Err(e),
        }
    }

    /// The protocol version this link negotiated (what the node at the other end speaks,
    /// up to this build's).
    pub fn version(&self) -> u16 {
        self.version
    }

    /// Set the deadline of each later call.
    pub fn set_timeout(&mut self, t: Duration) {
        self.timeout = t;
        let s = self.conn.get_ref();
        let _ = s.set_read_timeout(Some(t));
        let _ = s.set_write_timeout(Some(t));
    }

    /// Send one request (any port: metadata or shard) and wait for its answer.
    pub fn request(&mut self, req: &Request) -> Result<Response, PeerError> {
        let id = self.next_id;
        self.next_id += 1;
        let link = |why: String| PeerError::Link {
            addr: self.addr.clone(),
            why,
        };
        self.conn
            .send_request(self.version, id, req)
            .map_err(|e| link(e.to_string()))?;
        let (rid, resp) = self
            .conn
            .recv_response_within(self.timeout)
            .map_err(|e| link(e.to_string()))?;
        if rid != id {
            return Err(link(format!("answer to request {rid}, expected {id}")));
        }
        Ok(resp)
    }

    fn refused(&self, r: Response) -> PeerError {
        match r {
            Response::Error { code, message } => PeerError::Refused {
                addr: self.addr.clone(),
                code,
                message,
            },
            other => PeerError::Link {
                addr: self.addr.clone(),
                why: format!("unexpected answer {:?}", other.opcode()),
            },
        }
    }

    /// Send a metadata request and return its answer.
    pub fn call(&mut self, req: &MetaRequest) -> Result<MetaReply, PeerError> {
        let body = meta::encode(req);
        match self.request(&Request::Meta { body })? {
            Response::MetaReply { body } => meta::decode(&body).map_err(|e| PeerError::Link {
                addr: self.addr.clone(),
                why: e.to_string(),
            }),
            other => Err(self.refused(other)),
        }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }
}

/// openraft's network factory for the metadata cluster (see the module docs).
#[derive(Clone)]
pub struct PeerNet {
    tls: Arc<rustls::ClientConfig>,
    who: String,
}

impl PeerNet {
    /// `tls`: the hive CA pinned and this node's certificate (see
    /// `hivefs_net::tls::peer_client_config`); `who`: this node, for the other side's logs.
    pub fn new(tls: Arc<rustls::ClientConfig>, who: String) -> PeerNet {
        PeerNet { tls, who }
    }
}

impl RaftNetworkFactory<TypeConfig> for PeerNet {
    type Network = Peer;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> Peer {
        Peer {
            target,
            addr: node.addr.clone(),
            net: self.clone(),
            link: None,
        }
    }
}

/// openraft's connection to one member (see the module docs).
pub struct Peer {
    target: u64,
    addr: String,
    net: PeerNet,
    link: Option<PeerLink>,
}

#[derive(Debug, thiserror::Error)]
#[error("metadata node {target} at {addr}: {why}")]
struct PeerFailure {
    target: u64,
    addr: String,
    why: String,
}

impl Peer {
    /// Send one Raft RPC and decode openraft's `Result` from the answer.
    async fn rpc<Req, Resp, E>(
        &mut self,
        kind: RaftRpc,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<u64, BasicNode, RaftError<u64, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned + Send + 'static,
        E: std::error::Error + DeserializeOwned + Send + 'static,
    {
        let body = postcard::to_allocvec(req).expect("openraft requests encode");
        let request = MetaRequest::Peer(PeerRequest::Raft { rpc: kind, body });
        let timeout = option.hard_ttl().max(Duration::from_millis(100));
        let mut link = self.link.take();
        let (addr, tls, who) = (
            self.addr.clone(),
            self.net.tls.clone(),
            self.net.who.clone(),
        );
        let done = tokio::task::spawn_blocking(move || {
            let mut l = match link.take() {
                Some(mut l) => {
                    l.set_timeout(timeout);
                    l
                }
                None => match PeerLink::dial(&addr, Some(tls), "", &who, timeout) {
                    Ok(l) => l,
                    Err(e) => return (Err(e), None),
                },
            };
            let r = l.call(&request);
            // A link that failed is dropped: the next RPC dials again.
            let keep = r.is_ok();
            (r, keep.then_some(l))
        })
        .await;
        let fail = |why: String| PeerFailure {
            target: self.target,
            addr: self.addr.clone(),
            why,
        };
        let reply = match done {
            Err(e) => return Err(RPCError::Network(NetworkError::new(&fail(e.to_string())))),
            Ok((Err(e @ PeerError::Connect { .. }), _)) => {
                return Err(RPCError::Unreachable(Unreachable::new(&fail(
                    e.to_string(),
                ))))
            }
            Ok((Err(e), _)) => {
                return Err(RPCError::Network(NetworkError::new(&fail(e.to_string()))))
            }
            Ok((Ok(reply), l)) => {
                self.link = l;
                reply
            }
        };
        let bytes = match reply {
            Ok(Answer::Raft(b)) => b,
            other => {
                self.link = None;
                return Err(RPCError::Network(NetworkError::new(&fail(format!(
                    "unexpected answer {other:?}"
                )))));
            }
        };
        match postcard::from_bytes::<Result<Resp, RaftError<u64, E>>>(&bytes) {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(RPCError::RemoteError(RemoteError::new_with_node(
                self.target,
                BasicNode::new(self.addr.clone()),
                e,
            ))),
            Err(e) => {
                self.link = None;
                Err(RPCError::Network(NetworkError::new(&fail(format!(
                    "answer does not decode: {e}"
                )))))
            }
        }
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.rpc(RaftRpc::AppendEntries, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>,
    > {
        self.rpc(RaftRpc::InstallSnapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.rpc(RaftRpc::Vote, &rpc, &option).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_of_addresses() {
        assert_eq!(host_of("127.0.0.1:7399"), "127.0.0.1");
        assert_eq!(host_of("node-2.example:1"), "node-2.example");
        assert_eq!(host_of("[::1]:7399"), "::1");
        assert_eq!(host_of("bare"), "bare");
    }

    #[test]
    fn not_leader_refusals_name_the_leader() {
        let e = PeerError::Refused {
            addr: "a:1".into(),
            code: ErrorCode::NotLeader,
            message: "b:2".into(),
        };
        assert_eq!(e.leader(), Some("b:2"));
        let unknown = PeerError::Refused {
            addr: "a:1".into(),
            code: ErrorCode::NotLeader,
            message: String::new(),
        };
        assert_eq!(unknown.leader(), None);
    }
}
