//! The metadata client: a pool of connections to a hive's metadata port, exactly-once
//! mutations, and linearizable queries.
//!
//! Every mutation gets this client's next sequence number and carries `acked_below`, the
//! lowest sequence still waiting for its answer. If a connection breaks before the answer
//! arrives, the same command (same sequence) is sent again on a new connection: the hive
//! stores each answer with the mutation it applied, so a retry is answered, never applied
//! twice. A client id is random per [`MetaClient`] (one per mount).
//!
//! The client is `Sync`: FUSE threads share it; each call takes an idle connection from
//! the pool (or dials a new one) and returns it afterwards.

use crate::hive::{dial, ClientError, ClientOptions};
use hivefs_net::conn::FramedConn;
use hivefs_net::frame::{PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN};
use hivefs_net::meta::{self, MetaCommand, MetaReply, MetaRequest, Mutation, Query, Timespec};
use hivefs_net::proto::{ClusterMap, Request, Response};
use std::collections::BTreeSet;
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a call keeps retrying over broken connections before it gives up.
pub const RETRY_FOR: Duration = Duration::from_secs(30);
/// Idle connections kept in the pool.
const POOL_KEEP: usize = 16;

struct MetaConn {
    conn: FramedConn<TcpStream>,
    version: u16,
    next_req: u64,
}

impl MetaConn {
    fn open(o: &ClientOptions, port: u16) -> Result<MetaConn, ClientError> {
        let conn = dial(o, port as u32)?;
        let mut mc = MetaConn {
            conn,
            version: PROTOCOL_VERSION_MIN,
            next_req: 1,
        };
        let hello = Request::Hello {
            min_version: PROTOCOL_VERSION_MIN,
            max_version: PROTOCOL_VERSION_MAX,
            token: o.token.clone(),
            client_name: o.client_name.clone(),
        };
        match mc.call(&hello)? {
            Response::HelloOk { version, .. } => {
                mc.version = version;
                Ok(mc)
            }
            other => Err(unexpected(other)),
        }
    }

    fn call(&mut self, req: &Request) -> Result<Response, ClientError> {
        let id = self.next_req;
        self.next_req += 1;
        let conn_err = |source| ClientError::Conn {
            shard: u16::MAX,
            source,
        };
        self.conn
            .send_request(self.version, id, req)
            .map_err(conn_err)?;
        let (rid, resp) = self.conn.recv_response().map_err(conn_err)?;
        if rid != id {
            return Err(ClientError::Protocol {
                shard: u16::MAX,
                detail: format!("metadata reply to request {rid}, expected {id}"),
            });
        }
        Ok(resp)
    }
}

fn unexpected(r: Response) -> ClientError {
    match r {
        Response::Error { code, message } => ClientError::Refused {
            shard: u16::MAX,
            code,
            message,
        },
        other => ClientError::Protocol {
            shard: u16::MAX,
            detail: format!("unexpected metadata reply {:?}", other.opcode()),
        },
    }
}

/// A metadata client. See the module docs.
pub struct MetaClient {
    opts: ClientOptions,
    port: u16,
    map: ClusterMap,
    client_id: u64,
    next_seq: AtomicU64,
    waiting: Mutex<BTreeSet<u64>>,
    pool: Mutex<Vec<MetaConn>>,
}

impl MetaClient {
    /// Connect to the metadata service at `o.host:port` and fetch the cluster map.
    pub fn connect(o: &ClientOptions, port: u16) -> Result<MetaClient, ClientError> {
        let mut first = MetaConn::open(o, port)?;
        let map = match first.call(&Request::Map)? {
            Response::MapReply { map } => map,
            other => return Err(unexpected(other)),
        };
        let mut id = [0u8; 8];
        getrandom(&mut id);
        Ok(MetaClient {
            opts: o.clone(),
            port,
            map,
            client_id: u64::from_le_bytes(id) | 1,
            next_seq: AtomicU64::new(1),
            waiting: Mutex::new(BTreeSet::new()),
            pool: Mutex::new(vec![first]),
        })
    }

    /// The cluster map (shard ports, buckets, dedupe key).
    pub fn map(&self) -> &ClusterMap {
        &self.map
    }

    /// Options for reaching the shards of the same hive (for a [`crate::hive::HiveClient`]).
    pub fn chunk_options(&self) -> ClientOptions {
        ClientOptions {
            base_port: self.map.base_port,
            ..self.opts.clone()
        }
    }

    pub fn client_id(&self) -> u64 {
        self.client_id
    }

    /// Apply a mutation to `volume` exactly once.
    pub fn mutate(&self, volume: u32, op: Mutation) -> Result<MetaReply, ClientError> {
        let seq = self.next_seq.fetch_add(1, Ordering::SeqCst);
        let acked_below = {
            let mut w = self.waiting.lock().expect("waiting lock");
            w.insert(seq);
            *w.iter().next().expect("just inserted")
        };
        let req = MetaRequest::Mutate(MetaCommand {
            volume,
            client: self.client_id,
            seq,
            acked_below,
            now: Timespec::default(),
            op,
        });
        let r = self.call(&req);
        self.waiting.lock().expect("waiting lock").remove(&seq);
        r
    }

    /// A linearizable read of `volume`.
    pub fn query(&self, volume: u32, query: Query) -> Result<MetaReply, ClientError> {
        self.call(&MetaRequest::Query { volume, query })
    }

    /// Send `req` until it is answered (reconnecting over broken connections, for up to
    /// [`RETRY_FOR`]). A refusal by the service is returned at once.
    fn call(&self, req: &MetaRequest) -> Result<MetaReply, ClientError> {
        let body = meta::encode(req);
        let deadline = Instant::now() + RETRY_FOR;
        let mut backoff = Duration::from_millis(20);
        loop {
            let pooled = self.pool.lock().expect("pool lock").pop();
            let conn = match pooled {
                Some(c) => Ok(c),
                None => MetaConn::open(&self.opts, self.port),
            };
            let result = conn.and_then(|mut c| {
                let r = c.call(&Request::Meta { body: body.clone() })?;
                Ok((c, r))
            });
            match result {
                Ok((c, Response::MetaReply { body })) => {
                    let mut pool = self.pool.lock().expect("pool lock");
                    if pool.len() < POOL_KEEP {
                        pool.push(c);
                    }
                    return meta::decode::<MetaReply>(&body).map_err(|e| ClientError::Protocol {
                        shard: u16::MAX,
                        detail: e.to_string(),
                    });
                }
                Ok((_, other)) => return Err(unexpected(other)),
                Err(e @ (ClientError::Conn { .. } | ClientError::Connect { .. }))
                    if Instant::now() < deadline =>
                {
                    tracing::debug!("metadata call: {e}; retrying");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Random bytes from the kernel (client ids need not be secret, only distinct).
fn getrandom(buf: &mut [u8]) {
    use std::io::Read;
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        if f.read_exact(buf).is_ok() {
            return;
        }
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64
        ^ ((std::process::id() as u64) << 32);
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (t >> ((i % 8) * 8)) as u8;
    }
}
