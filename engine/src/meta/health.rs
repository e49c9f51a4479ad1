//! The leader's failure detector: which nodes of the cluster map are up, down or out.
//!
//! While this node leads, it pings every other node of the map on its metadata port once
//! per [`PING_EVERY`] (a `PeerRequest::Ping` on a mutual-TLS node link, kept open between
//! pings). A node that has not answered for [`DOWN_AFTER`] is marked `Down` in the map
//! (placement keeps its buckets; puts skip it and repair owes its copies); one silent for
//! `out_after_secs` (hive.toml, default [`DEFAULT_OUT_AFTER_SECS`]) is marked `Out` (its
//! buckets move). A down node that answers again is marked `Up`. Draining and out nodes
//! keep their state: an operator's decision, or a node that must join again.
//!
//! # Invariants
//! - Only the leader changes states, through Raft (`Mutation::SetNodeState`), so every
//!   node applies the same map history; a node that stops leading forgets its timers.
//! - A new leader counts every node as heard from when it started leading: nobody is
//!   marked down for the time before this node could have heard it.
//! - The log version rises only from versions negotiated on this leader's links by the
//!   nodes that answered its latest round of pings (`version.rs`).
//! - Nothing here compares clocks of two machines: each leader measures silence on its own
//!   monotonic clock.

use super::peer::PeerLink;
use super::server::{self, Shared};
use super::version;
use hivefs_net::meta::{Answer, MetaRequest, Mutation, NodeEntry, PeerRequest, Query};
use hivefs_net::placement::NodeState;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// How often the leader pings every node.
pub const PING_EVERY: Duration = Duration::from_secs(1);
/// Silence after which a node is down.
pub const DOWN_AFTER: Duration = Duration::from_secs(5);
/// Silence after which a node is out, unless hive.toml says otherwise.
pub const DEFAULT_OUT_AFTER_SECS: u64 = 600;
/// How long one ping may take.
const PING_TIMEOUT: Duration = Duration::from_millis(900);

/// What a node's silence makes of its state (`Draining` and `Out` stay as they are).
pub fn judge(state: NodeState, silent: Duration, out_after: Duration) -> NodeState {
    match state {
        NodeState::Draining | NodeState::Out => state,
        NodeState::Up | NodeState::Down if silent >= out_after => NodeState::Out,
        NodeState::Up | NodeState::Down if silent >= DOWN_AFTER => NodeState::Down,
        NodeState::Up | NodeState::Down => NodeState::Up,
    }
}

/// The detector's loop (its own thread) until the service stops. It also reloads the
/// token registry once a second when the token table changed (every node).
pub(super) fn run(sh: &Shared) {
    let tls = sh.peer_tls.clone();
    let out_after = Duration::from_secs(sh.cfg.out_after_secs);
    let mut links: HashMap<u64, PeerLink> = HashMap::new();
    let mut heard: HashMap<u64, Instant> = HashMap::new();
    let mut leading_since: Option<Instant> = None;
    // The GC epoch this node's shards were last told (commits accept claims of the
    // current epoch only: shards of every node must stamp it).
    let mut shards_epoch: Option<u64> = None;
    let mut next = Instant::now();
    while !sh.stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        if now < next {
            std::thread::sleep((next - now).min(Duration::from_millis(200)));
            continue;
        }
        next = now + PING_EVERY;
        if let Err(e) = sh.tokens.refresh(&sh.store) {
            tracing::warn!("reloading the token table: {e:#}");
        }
        let applied_epoch = match sh.store.query(0, &Query::GcEpoch) {
            Ok(Ok(Answer::GcEpoch(e))) => Some(e),
            _ => None,
        };
        if applied_epoch.is_some() && applied_epoch != shards_epoch && !sh.gc_running() {
            match server::block_on(server::sync_gc_epoch(sh)) {
                Ok(e) => shards_epoch = Some(e),
                Err(e) => tracing::warn!("telling the shards the GC epoch: {e:#}"),
            }
        }
        if server::ensure_leader(sh).is_err() {
            leading_since = None;
            heard.clear();
            links.clear();
            continue;
        }
        let Some(tls) = tls.clone() else {
            // A plain-TCP hive has one node: this build speaks for every member.
            raise_log_version(sh, &HashMap::new());
            continue;
        };
        let since = *leading_since.get_or_insert(now);
        let nodes: Vec<NodeEntry> = match sh.store.query(0, &Query::Nodes) {
            Ok(Ok(Answer::Nodes { nodes, .. })) => nodes,
            other => {
                tracing::warn!("failure detector: reading the map: {other:?}");
                continue;
            }
        };
        // Ping every node at once (one slow or blackholed node delays nobody else's).
        let targets: Vec<(u64, String, Option<PeerLink>)> = nodes
            .iter()
            .filter(|n| n.id != sh.cfg.raft_id && n.state != NodeState::Out)
            .map(|n| (n.id, n.spec.meta_addr(), links.remove(&n.id)))
            .collect();
        let answered: Vec<(u64, PeerLink)> = std::thread::scope(|scope| {
            let pings: Vec<_> = targets
                .into_iter()
                .map(|(id, addr, link)| {
                    let tls = tls.clone();
                    scope.spawn(move || {
                        let mut l = match link {
                            Some(l) => l,
                            None => {
                                PeerLink::dial(&addr, Some(tls), "", &sh.cfg.node_id, PING_TIMEOUT)
                                    .ok()?
                            }
                        };
                        matches!(
                            l.call(&MetaRequest::Peer(PeerRequest::Ping)),
                            Ok(Ok(Answer::Done))
                        )
                        .then_some((id, l))
                    })
                })
                .collect();
            pings
                .into_iter()
                .filter_map(|p| p.join().ok().flatten())
                .collect()
        });
        // The protocol version each node's link negotiated, of the nodes that answered
        // this round only (one restarted with another build since counts from its next
        // answer): what the log version may rise to.
        let mut speaks: HashMap<u64, u16> = HashMap::new();
        for (id, l) in answered {
            heard.insert(id, Instant::now());
            speaks.insert(id, l.version());
            links.insert(id, l);
        }
        raise_log_version(sh, &speaks);
        for n in &nodes {
            if n.id == sh.cfg.raft_id {
                continue;
            }
            let last = heard.get(&n.id).copied().unwrap_or(since).max(since);
            let want = judge(n.state, last.elapsed(), out_after);
            if want == n.state {
                continue;
            }
            tracing::warn!(node = n.id, name = %n.spec.name, from = ?n.state, to = ?want, silent_ms = last.elapsed().as_millis() as u64, "node state changes");
            let cmd = match server::one_off_command(Mutation::SetNodeState {
                id: n.id,
                state: want,
            }) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("failure detector: {e:#}");
                    continue;
                }
            };
            if let Err(e) = server::block_on(server::mutate(sh, cmd, false)) {
                tracing::warn!("failure detector: recording node {} as {want:?}: {e}", n.id);
            }
        }
    }
}

/// [`version::raise`], each round (a failure is logged and tried again next round).
fn raise_log_version(sh: &Shared, speaks: &HashMap<u64, u16>) {
    if let Err(e) = version::raise(sh, speaks) {
        tracing::warn!("metadata log version: {e:#}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_makes_states() {
        let out = Duration::from_secs(600);
        let s = Duration::from_secs;
        assert_eq!(judge(NodeState::Up, s(1), out), NodeState::Up);
        assert_eq!(judge(NodeState::Up, s(5), out), NodeState::Down);
        assert_eq!(judge(NodeState::Down, s(2), out), NodeState::Up);
        assert_eq!(judge(NodeState::Down, s(600), out), NodeState::Out);
        assert_eq!(judge(NodeState::Draining, s(900), out), NodeState::Draining);
        assert_eq!(judge(NodeState::Out, s(0), out), NodeState::Out);
    }
}
