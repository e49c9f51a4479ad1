//! Admin links: a blocking, authenticated connection from the node's own tools (`hive
//! status`, `hive fsck`, the metadata service's fsck) to a shard port or the metadata
//! port, with the node's token and its CA pinned. The same Hello as any client's.

use crate::config::{self, NodeConfig};
use anyhow::{bail, Context, Result};
use hivefs_net::conn::FramedConn;
use hivefs_net::frame::{PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN};
use hivefs_net::proto::{Request, Response};
use std::net::TcpStream;
use std::path::Path;

pub struct Link {
    conn: FramedConn<TcpStream>,
    version: u16,
    next_id: u64,
    what: String,
}

impl Link {
    /// Connect to `port` of the node in `dir` (TLS pinned to its CA unless `insecure`)
    /// and authenticate with its admin token.
    pub fn open(
        dir: &Path,
        cfg: &NodeConfig,
        port: u16,
        insecure: bool,
        who: &str,
    ) -> Result<Link> {
        Link::open_at(dir, &cfg.listen, port, insecure, who)
    }

    /// [`Link::open`] to `host:port`, another node of the same hive (same admin token and
    /// CA as the node in `dir`).
    pub fn open_at(dir: &Path, host: &str, port: u16, insecure: bool, who: &str) -> Result<Link> {
        let token =
            std::fs::read_to_string(dir.join("admin.token")).context("reading admin.token")?;
        let addr = hivefs_net::meta::NodeSpec::addr_of(host, port);
        let stream = TcpStream::connect(&addr)
            .with_context(|| format!("connecting to {addr} (is `hive run` up?)"))?;
        let _ = stream.set_nodelay(true);
        let tls = if insecure {
            None
        } else {
            // The node's current CA and, after a rotation, the previous one: the node
            // presents its new certificate within a second of the new CA being here.
            let trusted = config::trust_bundle(dir)?;
            Some((
                hivefs_net::tls::client_config_trusting(&trusted)
                    .map_err(|e| anyhow::anyhow!("{e}"))?,
                hivefs_net::tls::server_name(host).map_err(|e| anyhow::anyhow!("{e}"))?,
            ))
        };
        let mut link = Link {
            conn: FramedConn::new_client(stream, tls)?,
            version: PROTOCOL_VERSION_MIN,
            next_id: 1,
            what: addr,
        };
        let hello = Request::Hello {
            min_version: PROTOCOL_VERSION_MIN,
            max_version: PROTOCOL_VERSION_MAX,
            token: token.trim().to_string(),
            client_name: who.to_string(),
        };
        match link.call(&hello)? {
            Response::HelloOk { version, .. } => link.version = version,
            Response::Error { code, message } => bail!("{}: {code:?}: {message}", link.what),
            other => bail!("{}: unexpected {:?}", link.what, other.opcode()),
        }
        Ok(link)
    }

    /// Send one request and wait for its answer.
    pub fn call(&mut self, req: &Request) -> Result<Response> {
        let id = self.next_id;
        self.next_id += 1;
        self.conn.send_request(self.version, id, req)?;
        let (rid, resp) = self.conn.recv_response()?;
        if rid != id {
            bail!("{}: answer to request {rid}, expected {id}", self.what);
        }
        Ok(resp)
    }
}
