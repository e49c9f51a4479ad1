//! The Raft layer of the hive's metadata service: a replicated log (openraft 0.9) whose
//! committed entries are applied, in order, to an [`Applier`] (the namespace store).
//!
//! # Invariants
//!
//! **What is durable when.**
//! - The vote is written to the log's state file (`raft-log/`, [`super::wal`]) and synced
//!   before openraft's `save_vote` returns, so a node never votes twice in a term.
//! - Appended entries are written to the log and synced before openraft's flush callback
//!   runs; only then may Raft count them towards a quorum. A truncation is one synced
//!   record; a purge records the last purged log id (synced) before deleting anything.
//! - Applying is the applier's business: [`Applier::apply_batch`] stores the effects of a
//!   batch *and* Raft's bookkeeping (`raft_state`: last applied log id and last membership)
//!   in one atomic transaction, so the state and the applied position never disagree.
//!   [`MetaRaft::write`] returns only after that transaction committed. The applier may
//!   commit it without an fsync (the entries are durable in the log already): a crash then
//!   rolls it back to an earlier applied position, atomically, and Raft applies the entries
//!   after it again. What [`Applier::export`] returns (a snapshot, behind which the log may
//!   be purged) must be durable when it returns.
//! - The commit index is not persisted (openraft's optional `save_committed` is not used).
//!
//! **What [`MetaRaft::open`] does on restart.** It reads the applier's `raft_state` (the
//! applied log id and membership), the vote and the log (all checked up front: the file
//! belongs to `node_id`, every value passes its checksum and decodes, no hole between
//! entries; so a corrupt file fails `open` with a message naming it), and starts Raft from
//! there: openraft never hands the applier an entry at or below the applied log id
//! (the state machine also checks this and fails loudly instead of applying twice). If the
//! log was purged behind a snapshot, openraft rebuilds the in-memory snapshot from
//! [`Applier::export`]. The sole voter of a one-member cluster then leads at once (it resumes
//! its committed vote, or else elects itself without waiting for a timeout); being its own
//! quorum, it commits every entry of its log (after a fresh election, through the new
//! term's blank entry), and `open` waits on a read barrier until all of them are applied,
//! each exactly once. When `open` returns, the applier's state includes every write ever
//! acknowledged, and every entry that was logged but not applied when the node stopped. A
//! brand-new directory (no log, no vote, nothing applied) is initialized as a one-member
//! cluster `{node_id: addr}`.
//!
//! **Snapshots and compaction.** Every [`SNAPSHOT_EVERY`] applied entries openraft asks for
//! a snapshot; it is `Applier::export` with the applier's `raft_state` as its metadata, taken
//! under the same lock that serializes every applier call (so the two agree), kept in
//! memory (for a future lagging follower) and never written to disk: the applier's own
//! durable state *is* the snapshot. The log is then purged up to the snapshot, keeping
//! [`KEEP_LOGS_AFTER_SNAPSHOT`] entries behind it for followers that are a little behind.
//!
//! **The network is a stub**, `NoTransport`: a one-member cluster is its own quorum, so
//! openraft never sends it an RPC (no append-entries, votes or snapshots go out). Should it
//! try, every RPC fails with `Unreachable` ("replication transport arrives with the cluster
//! issue"), never a panic. The cluster issue replaces that struct with a real transport and
//! adds members; nothing else here assumes a single member.
//!
//! **Runtime.** See [`MetaRaft`]: Raft runs on a private one-worker tokio runtime.

use super::raft_log::{self, LogStore};
use hivefs_net::meta::{RaftRpc, MAX_VOTERS};
use openraft::error::{
    CheckIsLeaderError, ClientWriteError, Fatal, ForwardToLeader, InstallSnapshotError, RPCError,
    RaftError as OrError, Unreachable,
};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::storage::RaftStateMachine;
use openraft::{
    AnyError, BasicNode, ChangeMembers, Config, Entry, EntryPayload, LogId, RaftNetwork,
    RaftNetworkFactory, RaftSnapshotBuilder, ServerState, Snapshot, SnapshotMeta, SnapshotPolicy,
    StorageError, StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the replicated log is applied to (the namespace store implements it).
/// Every method is called from Raft's state-machine task, one at a time.
pub trait Applier: Send + Sync + 'static {
    /// Raft's own bookkeeping (last applied log id and last membership), as opaque bytes
    /// the applier stored atomically with the effects of the entries applied; `None`
    /// before anything was applied.
    fn raft_state(&self) -> anyhow::Result<Option<Vec<u8>>>;
    /// Apply committed entries in log order, then record `raft_state`, all in one atomic
    /// transaction (durable now, or by the next `export`; see the module doc). `cmds[i]` is `Some(command bytes)` for a normal entry, `None` for a
    /// blank or membership entry (nothing to apply). Returns one response per entry
    /// (empty for `None`). Must be deterministic.
    fn apply_batch(
        &self,
        cmds: &[Option<&[u8]>],
        raft_state: &[u8],
    ) -> anyhow::Result<Vec<Vec<u8>>>;
    /// The whole state as bytes (for a snapshot), made durable first.
    fn export(&self) -> anyhow::Result<Vec<u8>>;
    /// Replace the whole state with a snapshot's bytes, and record `raft_state`, durably.
    fn import(&self, data: &[u8], raft_state: &[u8]) -> anyhow::Result<()>;
}

/// A node's view of its metadata cluster ([`MetaRaft::view`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterView {
    /// This node's id.
    pub id: u64,
    pub leader: Option<u64>,
    /// The leader's address (its metadata port), when known.
    pub leader_addr: Option<String>,
    pub term: u64,
    pub last_applied: Option<u64>,
    /// Every member: (id, address, voter).
    pub members: Vec<(u64, String, bool)>,
}

/// Why a metadata operation did not happen (or, for a write, may not have happened).
#[derive(Debug, thiserror::Error)]
pub enum RaftError {
    /// This node is not the leader; `leader` is the address of the one it knows, if any.
    #[error("not the metadata leader (leader: {leader:?})")]
    NotLeader { leader: Option<String> },
    /// No quorum / shutting down / storage failure, with a message that says which.
    #[error("metadata service unavailable: {0}")]
    Unavailable(String),
    /// This node could not reach a majority of the metadata cluster in time (it is in a
    /// minority, or the others are down): nothing was decided here; another node may do
    /// better.
    #[error("metadata service unavailable: no quorum: {0}")]
    NoQuorum(String),
}

/// Name of the Raft log (a directory: [`super::wal`]) under the directory given to
/// [`MetaRaft::open`].
pub const LOG_FILE: &str = "raft-log";
/// Build a snapshot (and purge the log behind it) every this many applied entries.
pub const SNAPSHOT_EVERY: u64 = 10_000;
/// Entries kept in the log behind the latest snapshot.
pub const KEEP_LOGS_AFTER_SNAPSHOT: u64 = 1_000;
/// How long `open` waits for a one-member cluster to elect itself and catch up.
const LEADER_WAIT: Duration = Duration::from_secs(30);
/// How long stopping waits for in-flight storage calls (a redb commit, an apply batch).
const STOP_WAIT: Duration = Duration::from_secs(30);
/// How long a write or a read barrier waits for a quorum before it fails.
pub const QUORUM_WAIT: Duration = Duration::from_secs(4);
/// The leader's heartbeat to its followers.
pub const HEARTBEAT_MS: u64 = 250;
/// A follower that hears no leader for a random time in this range starts an election.
/// Generous for loaded 2-core machines (a redb commit and a busy core must not depose a
/// healthy leader), and short enough that a lost leader is replaced within ~3 s.
pub const ELECTION_TIMEOUT_MS: (u64, u64) = (1_000, 2_000);
/// Entries per append-entries RPC: a mutation encodes to at most ~0.6 MB (8192 extents),
/// so 16 of them fit a frame ([`hivefs_net::frame::MAX_BODY_BYTES`], 16 MiB).
pub const MAX_PAYLOAD_ENTRIES: u64 = 16;

openraft::declare_raft_types!(
    /// openraft's types for the metadata service: commands and responses are opaque bytes
    /// (the applier gives them meaning), nodes are `u64` ids with an address.
    pub TypeConfig:
        D = Vec<u8>,
        R = Vec<u8>,
        NodeId = u64,
        Node = BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

type Sto = StorageError<u64>;
type Membership = StoredMembership<u64, BasicNode>;

/// What `raft_state` holds: the applier stores it opaquely, we decode it on open and for
/// snapshots. Encoded with [`raft_log::encode`] (format byte, checksum, postcard).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct AppliedState {
    last_applied: Option<LogId<u64>>,
    last_membership: Membership,
}

/// A failure of the applier or of the state machine's own checks. Kept small (openraft's
/// `StorageError` is large); it becomes one at the `RaftStateMachine` boundary.
#[derive(Debug)]
struct SmError(String);

impl From<SmError> for Sto {
    fn from(e: SmError) -> Sto {
        StorageIOError::write_state_machine(AnyError::error(e.0)).into()
    }
}

fn sm_error(what: impl std::fmt::Display) -> SmError {
    SmError(what.to_string())
}

/// The latest snapshot, kept in memory for replication.
struct HeldSnapshot {
    meta: SnapshotMeta<u64, BasicNode>,
    data: Vec<u8>,
}

/// Guarded by [`SmShared::state`]: every applier call happens with this lock held, which
/// keeps them one at a time even though openraft builds snapshots on a task of its own.
struct SmState {
    applied: Option<LogId<u64>>,
    membership: Membership,
    snapshot: Option<HeldSnapshot>,
    snapshots_built: u64,
}

struct SmShared {
    applier: Arc<dyn Applier>,
    state: Mutex<SmState>,
}

/// openraft's state machine (and snapshot builder) over an [`Applier`]. Every call runs
/// inline on the Raft runtime's worker (appliers commit to disk, which blocks it briefly).
#[derive(Clone)]
struct StateMachine {
    shared: Arc<SmShared>,
}

impl StateMachine {
    /// Blocking: reads and decodes the applier's `raft_state`.
    fn load(applier: Arc<dyn Applier>) -> Result<StateMachine, String> {
        let state = read_applied_state(applier.as_ref())?;
        Ok(StateMachine {
            shared: Arc::new(SmShared {
                applier,
                state: Mutex::new(SmState {
                    applied: state.last_applied,
                    membership: state.last_membership,
                    snapshot: None,
                    snapshots_built: 0,
                }),
            }),
        })
    }

    /// Runs `f` under the state lock, inline on the Raft runtime's worker (not on the
    /// blocking pool: see `LogStore::blocking` in `raft_log.rs` for the measurement).
    async fn blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Applier, &mut SmState) -> Result<R, SmError> + Send + 'static,
    ) -> Result<R, SmError> {
        let mut state = self
            .shared
            .state
            .lock()
            .map_err(|_| sm_error("state machine lock poisoned by an earlier panic"))?;
        f(self.shared.applier.as_ref(), &mut state)
    }
}

fn read_applied_state(applier: &dyn Applier) -> Result<AppliedState, String> {
    match applier.raft_state() {
        Ok(None) => Ok(AppliedState::default()),
        Ok(Some(bytes)) => raft_log::decode(&bytes)
            .map_err(|e| format!("the applier's raft_state is corrupt: {e}")),
        Err(e) => Err(format!("cannot read the applier's raft_state: {e:#}")),
    }
}

fn apply_entries(
    applier: &dyn Applier,
    st: &mut SmState,
    entries: Vec<Entry<TypeConfig>>,
) -> Result<Vec<Vec<u8>>, SmError> {
    let Some(last) = entries.last().map(|e| e.log_id) else {
        return Ok(Vec::new());
    };
    let mut membership = st.membership.clone();
    let mut cmds = Vec::with_capacity(entries.len());
    for e in &entries {
        if Some(e.log_id) <= st.applied {
            return Err(sm_error(format_args!(
                "refusing to apply log entry {} again (applied up to {:?})",
                e.log_id, st.applied
            )));
        }
        cmds.push(match &e.payload {
            EntryPayload::Normal(cmd) => Some(cmd.as_slice()),
            EntryPayload::Blank => None,
            EntryPayload::Membership(m) => {
                membership = StoredMembership::new(Some(e.log_id), m.clone());
                None
            }
        });
    }
    let state = raft_log::encode(&AppliedState {
        last_applied: Some(last),
        last_membership: membership.clone(),
    });
    let replies = applier
        .apply_batch(&cmds, &state)
        .map_err(|e| sm_error(format_args!("applying up to log entry {last}: {e:#}")))?;
    if replies.len() != entries.len() {
        return Err(sm_error(format_args!(
            "applier returned {} replies for {} entries",
            replies.len(),
            entries.len()
        )));
    }
    st.applied = Some(last);
    st.membership = membership;
    Ok(replies)
}

fn build_snapshot(
    applier: &dyn Applier,
    st: &mut SmState,
) -> Result<Snapshot<TypeConfig>, SmError> {
    // Read `raft_state` and export under the same lock: both describe the same state.
    let state = read_applied_state(applier).map_err(sm_error)?;
    let data = applier
        .export()
        .map_err(|e| sm_error(format_args!("applier export failed: {e:#}")))?;
    st.snapshots_built += 1;
    let snapshot_id = match state.last_applied {
        Some(id) => format!("{}-{}-{}", id.leader_id, id.index, st.snapshots_built),
        None => format!("none-{}", st.snapshots_built),
    };
    let meta = SnapshotMeta {
        last_log_id: state.last_applied,
        last_membership: state.last_membership,
        snapshot_id,
    };
    let snapshot = Box::new(Cursor::new(data.clone()));
    st.snapshot = Some(HeldSnapshot {
        meta: meta.clone(),
        data,
    });
    Ok(Snapshot { meta, snapshot })
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, Sto> {
        Ok(self.blocking(build_snapshot).await?)
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId<u64>>, Membership), Sto> {
        let state = self.blocking(|_, st| Ok((st.applied, st.membership.clone())));
        Ok(state.await?)
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Vec<u8>>, Sto>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<_> = entries.into_iter().collect();
        let replies = self.blocking(move |applier, st| apply_entries(applier, st, entries));
        Ok(replies.await?)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, Sto> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), Sto> {
        let meta = meta.clone();
        let installed = self.blocking(move |applier, st| {
            let state = AppliedState {
                last_applied: meta.last_log_id,
                last_membership: meta.last_membership.clone(),
            };
            let data = snapshot.into_inner();
            applier
                .import(&data, &raft_log::encode(&state))
                .map_err(|e| sm_error(format_args!("applier import failed: {e:#}")))?;
            st.applied = state.last_applied;
            st.membership = state.last_membership;
            st.snapshot = Some(HeldSnapshot { meta, data });
            Ok(())
        });
        Ok(installed.await?)
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, Sto> {
        let current = self.blocking(|_, st| {
            Ok(st.snapshot.as_ref().map(|s| Snapshot {
                meta: s.meta.clone(),
                snapshot: Box::new(Cursor::new(s.data.clone())),
            }))
        });
        Ok(current.await?)
    }
}

/// The replication transport of a one-member cluster, which has nobody to talk to: every
/// RPC fails with `Unreachable`. A plain struct, no trait of ours: the cluster issue
/// replaces it with the real transport.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct NoTransport;

/// A connection [`NoTransport`] hands out; it never sends anything.
#[derive(Clone, Copy, Debug)]
pub(crate) struct NoPeer {
    target: u64,
}

#[derive(Debug, thiserror::Error)]
#[error(
    "cannot reach metadata node {target}: replication transport arrives with the cluster issue"
)]
struct NoTransportError {
    target: u64,
}

impl NoPeer {
    fn unreachable<E: std::error::Error>(&self) -> RPCError<u64, BasicNode, E> {
        RPCError::Unreachable(Unreachable::new(&NoTransportError {
            target: self.target,
        }))
    }
}

impl RaftNetworkFactory<TypeConfig> for NoTransport {
    type Network = NoPeer;

    async fn new_client(&mut self, target: u64, _node: &BasicNode) -> NoPeer {
        NoPeer { target }
    }
}

impl RaftNetwork<TypeConfig> for NoPeer {
    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, OrError<u64>>> {
        Err(self.unreachable())
    }

    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, BasicNode, OrError<u64, InstallSnapshotError>>,
    > {
        Err(self.unreachable())
    }

    async fn vote(
        &mut self,
        _rpc: VoteRequest<u64>,
        _option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, OrError<u64>>> {
        Err(self.unreachable())
    }
}

/// Knobs that differ between production and tests.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tuning {
    pub(crate) snapshot_every: u64,
    pub(crate) keep_logs_after_snapshot: u64,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            snapshot_every: SNAPSHOT_EVERY,
            keep_logs_after_snapshot: KEEP_LOGS_AFTER_SNAPSHOT,
        }
    }
}

fn unavailable(what: impl std::fmt::Display) -> RaftError {
    RaftError::Unavailable(what.to_string())
}

fn from_fatal(f: &Fatal<u64>) -> RaftError {
    match f {
        Fatal::StorageError(e) => unavailable(format_args!("storage failure: {e}")),
        Fatal::Panicked => unavailable("the Raft core panicked"),
        Fatal::Stopped => unavailable("shutting down"),
    }
}

fn membership_error(e: OrError<u64, ClientWriteError<u64, BasicNode>>) -> RaftError {
    match e {
        OrError::APIError(ClientWriteError::ForwardToLeader(f)) => not_leader(&f),
        OrError::APIError(e) => unavailable(e),
        OrError::Fatal(f) => from_fatal(&f),
    }
}

fn not_leader(f: &ForwardToLeader<u64, BasicNode>) -> RaftError {
    RaftError::NotLeader {
        leader: f.leader_node.as_ref().map(|n| n.addr.clone()),
    }
}

/// A running metadata Raft node.
///
/// **Runtime.** Raft runs on a private tokio runtime owned by this value: multi-thread
/// flavour with one worker thread (`hivefs-meta-raft`), which also runs every redb commit
/// and every applier call inline. Why: the rest of the engine is thread-per-shard with mio
/// and no async runtime, so Raft brings its own; one worker is plenty for Raft's bookkeeping
/// on a 2-core machine and keeps Raft off the shards' cores; the multi-thread flavour drives
/// itself (no thread has to sit in `block_on`). Storage calls stall Raft's timers for the
/// length of one small commit (well under its heartbeat interval), and save two thread
/// handoffs each (see `LogStore::blocking`). Every public method runs its
/// work as a task on that runtime and awaits its result, so callers may await them from any
/// executor (or none of tokio's).
///
/// A storage failure (of the log or of the applier) stops Raft: from then on every call
/// returns [`RaftError::Unavailable`] saying what failed, until the node is reopened.
///
/// Dropping a `MetaRaft` without [`MetaRaft::shutdown`] is a crash as far as Raft is
/// concerned: its tasks are cancelled where they stand; what was acknowledged is durable.
/// (Outside an async context the drop waits for the tasks to be gone, so the files are
/// closed when it returns; inside one it cannot block, and they go in the background.)
pub struct MetaRaft {
    /// When this node last took entries (or a heartbeat) from a leader, as a follower.
    last_append: Mutex<Option<std::time::Instant>>,
    id: u64,
    raft: openraft::Raft<TypeConfig>,
    rt: RaftRuntime,
    log_path: PathBuf,
}

impl MetaRaft {
    /// Open (or create) the Raft log under `dir` (`dir/raft-log/`), start Raft for
    /// node `node_id` reachable at `addr`, and, if this is a brand-new one-node hive, make it
    /// a one-member cluster (initialize). Reopening an existing dir must resume: the applier's
    /// `raft_state` says what was applied, the log holds the rest, and entries committed but
    /// not yet applied are applied again exactly once (the applier skips nothing itself:
    /// Raft must not hand it an entry at or below its recorded applied log id).
    pub async fn open(
        dir: &Path,
        node_id: u64,
        addr: String,
        applier: Arc<dyn Applier>,
    ) -> Result<MetaRaft, RaftError> {
        Self::open_tuned(
            dir,
            node_id,
            addr,
            applier,
            NoTransport,
            true,
            Tuning::default(),
        )
        .await
    }

    /// [`MetaRaft::open`] for a node of a hive: `network` reaches the other members, and
    /// only with `bootstrap` does a brand-new directory initialize a one-member cluster (a
    /// node that joins an existing hive starts empty and is added by the leader).
    pub async fn open_member<N>(
        dir: &Path,
        node_id: u64,
        addr: String,
        applier: Arc<dyn Applier>,
        network: N,
        bootstrap: bool,
    ) -> Result<MetaRaft, RaftError>
    where
        N: RaftNetworkFactory<TypeConfig>,
    {
        Self::open_tuned(
            dir,
            node_id,
            addr,
            applier,
            network,
            bootstrap,
            Tuning::default(),
        )
        .await
    }

    pub(crate) async fn open_tuned<N>(
        dir: &Path,
        node_id: u64,
        addr: String,
        applier: Arc<dyn Applier>,
        network: N,
        bootstrap: bool,
        tuning: Tuning,
    ) -> Result<MetaRaft, RaftError>
    where
        N: RaftNetworkFactory<TypeConfig>,
    {
        let rt = RaftRuntime::start()?;
        let dir = dir.to_path_buf();
        let log_path = dir.join(LOG_FILE);
        let start = start(
            dir,
            log_path.clone(),
            node_id,
            addr,
            applier,
            network,
            bootstrap,
            tuning,
        );
        let started = match rt.spawn(start).await {
            Ok(r) => r,
            Err(e) => Err(unavailable(format_args!("starting Raft failed: {e}"))),
        };
        match started {
            Ok(raft) => Ok(MetaRaft {
                last_append: Mutex::new(None),
                id: node_id,
                raft,
                rt,
                log_path,
            }),
            Err(e) => {
                rt.stop().await;
                Err(e)
            }
        }
    }

    /// Replicate `cmd`, wait until it is committed and applied, return the applier's response.
    pub async fn write(&self, cmd: Vec<u8>) -> Result<Vec<u8>, RaftError> {
        let raft = self.raft.clone();
        match self
            .run_bounded(
                "a metadata write",
                async move { raft.client_write(cmd).await },
            )
            .await?
        {
            Ok(resp) => Ok(resp.data),
            Err(OrError::APIError(ClientWriteError::ForwardToLeader(f))) => Err(not_leader(&f)),
            Err(OrError::APIError(ClientWriteError::ChangeMembershipError(e))) => {
                Err(unavailable(e))
            }
            Err(OrError::Fatal(f)) => Err(from_fatal(&f)),
        }
    }

    /// Linearizable read barrier (leader read index): after it returns Ok, a read of the
    /// applier's state sees every write acknowledged before the call.
    ///
    /// A node that leads a cluster whose only voter it is needs no round through Raft: no
    /// other node can commit anything, and every write acknowledged so far was applied here
    /// before it was acknowledged ([`MetaRaft::write`]), so the applier's state already
    /// holds it. That path is taken only while the metrics say so (leader, running, a
    /// membership, joint or not, with no voter but this node); a cluster with more voters
    /// always goes through openraft's `ensure_linearizable`. It saves two thread handoffs
    /// per metadata query (every lookup and getattr a mount sends).
    pub async fn read_barrier(&self) -> Result<(), RaftError> {
        if self.sole_voter_leader() {
            return Ok(());
        }
        let raft = self.raft.clone();
        match self
            .run_bounded(
                "a read barrier",
                async move { raft.ensure_linearizable().await },
            )
            .await?
        {
            Ok(_) => Ok(()),
            Err(OrError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => Err(not_leader(&f)),
            Err(OrError::APIError(CheckIsLeaderError::QuorumNotEnough(q))) => {
                Err(RaftError::NoQuorum(q.to_string()))
            }
            Err(OrError::Fatal(f)) => Err(from_fatal(&f)),
        }
    }

    /// This node leads, Raft is running, and no other node is a voter.
    fn sole_voter_leader(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow();
        m.running_state.is_ok()
            && m.state == ServerState::Leader
            && m.current_leader == Some(self.id)
            && m.membership_config
                .membership()
                .voter_ids()
                .all(|v| v == self.id)
    }

    /// Is this node the leader now (cheap, for status)?
    pub fn is_leader(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow();
        m.state == ServerState::Leader && m.current_leader == Some(self.id)
    }

    /// Serve an openraft RPC another member sent (`body`: the postcard-encoded request);
    /// returns the postcard-encoded `Result` of openraft's handler, for the sender's
    /// transport ([`super::peer`]) to decode. An undecodable body is an error here (the
    /// connection's business), never a Raft answer.
    pub async fn serve_rpc(&self, rpc: RaftRpc, body: &[u8]) -> Result<Vec<u8>, RaftError> {
        fn decode<T: serde::de::DeserializeOwned>(rpc: RaftRpc, b: &[u8]) -> Result<T, RaftError> {
            postcard::from_bytes(b)
                .map_err(|e| unavailable(format_args!("bad {rpc:?} request: {e}")))
        }
        fn encode<T: Serialize>(r: &T) -> Vec<u8> {
            postcard::to_allocvec(r).expect("openraft answers encode")
        }
        let raft = self.raft.clone();
        Ok(match rpc {
            RaftRpc::AppendEntries => {
                let req: AppendEntriesRequest<TypeConfig> = decode(rpc, body)?;
                encode(
                    &self
                        .run(async move { raft.append_entries(req).await })
                        .await?,
                )
            }
            RaftRpc::Vote => {
                let req: VoteRequest<u64> = decode(rpc, body)?;
                encode(&self.run(async move { raft.vote(req).await }).await?)
            }
            RaftRpc::InstallSnapshot => {
                let req: InstallSnapshotRequest<TypeConfig> = decode(rpc, body)?;
                encode(
                    &self
                        .run(async move { raft.install_snapshot(req).await })
                        .await?,
                )
            }
        })
    }

    /// Make node `id` (reachable at `addr`, its metadata port) a member: a learner first,
    /// waiting until it has caught up with the log, then a voter while the cluster has
    /// fewer than [`MAX_VOTERS`] (else it stays a learner). Only the leader can; a node
    /// that is a member already is left as it is. Returns whether it is a voter.
    pub async fn add_member(&self, id: u64, addr: String) -> Result<bool, RaftError> {
        let raft = self.raft.clone();
        self.run(async move {
            let membership = raft
                .with_raft_state(|st| st.membership_state.effective().membership().clone())
                .await
                .map_err(|e| from_fatal(&e))?;
            let voters: BTreeSet<u64> = membership.voter_ids().collect();
            if voters.contains(&id) {
                return Ok(true);
            }
            let is_learner = membership.learner_ids().any(|l| l == id);
            if !is_learner {
                raft.add_learner(id, BasicNode::new(addr), true)
                    .await
                    .map_err(membership_error)?;
            }
            if voters.len() >= MAX_VOTERS {
                return Ok(false);
            }
            let change = ChangeMembers::AddVoterIds(BTreeSet::from([id]));
            raft.change_membership(change, false)
                .await
                .map_err(membership_error)?;
            Ok(true)
        })
        .await?
    }

    /// Every member (voters and learners) of the effective membership: the nodes that apply
    /// this log, as Raft's core has it now (its metrics may trail a change just made).
    pub async fn members(&self) -> Result<BTreeSet<u64>, RaftError> {
        let raft = self.raft.clone();
        self.run(async move {
            raft.with_raft_state(|st| {
                st.membership_state
                    .effective()
                    .membership()
                    .nodes()
                    .map(|(id, _)| *id)
                    .collect::<BTreeSet<u64>>()
            })
            .await
            .map_err(|e| from_fatal(&e))
        })
        .await?
    }

    /// What this node knows of the cluster now (cheap, from Raft's metrics).
    /// The current term (cheap: no copy of the membership, unlike [`MetaRaft::view`]).
    pub fn term(&self) -> u64 {
        self.raft.metrics().borrow().current_term
    }

    pub fn view(&self) -> ClusterView {
        let m = self.raft.metrics();
        let m = m.borrow();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let members = membership
            .nodes()
            .map(|(id, n)| (*id, n.addr.clone(), voters.contains(id)))
            .collect();
        ClusterView {
            id: self.id,
            leader: m.current_leader,
            leader_addr: m
                .current_leader
                .and_then(|l| membership.get_node(&l).map(|n| n.addr.clone())),
            term: m.current_term,
            last_applied: m.last_applied.map(|l| l.index),
            members,
        }
    }

    /// Stop Raft cleanly (flush, stop tasks).
    ///
    /// Every acknowledged write is already durable; this stops Raft's core, waits for the
    /// storage calls in flight, and closes the log file (and drops every reference to the
    /// applier) before returning.
    pub async fn shutdown(self) -> Result<(), RaftError> {
        let MetaRaft {
            raft, rt, log_path, ..
        } = self;
        let res = rt.spawn(async move { raft.shutdown().await }).await;
        rt.stop().await;
        match res {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(unavailable(format_args!(
                "Raft core of {} failed while stopping: {e}",
                log_path.display()
            ))),
            Err(e) => Err(unavailable(format_args!("stopping Raft failed: {e}"))),
        }
    }

    /// [`run`](Self::run), failing with `Unavailable` after [`QUORUM_WAIT`]: what needs a
    /// quorum must not wait forever for one (a node that lost its leadership or its
    /// majority answers within that bound). A write that timed out may still commit; a
    /// client retries it with the same `(client, seq)`, which applies once.
    async fn run_bounded<F>(&self, what: &str, fut: F) -> Result<F::Output, RaftError>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match self
            .run(async move { tokio::time::timeout(QUORUM_WAIT, fut).await })
            .await?
        {
            Ok(out) => Ok(out),
            Err(_) => Err(RaftError::NoQuorum(format!(
                "{what} did not complete within {} s",
                QUORUM_WAIT.as_secs()
            ))),
        }
    }

    /// How stale this node's applied state may be, if a linearizable read is not possible
    /// now: `None` when one is (this node leads and its majority answered within an
    /// election timeout, or it is the sole voter); else the time since a majority last
    /// answered it as leader, or since it last heard from a leader as follower (`u64::MAX`
    /// when never).
    pub fn staleness_ms(&self) -> Option<u64> {
        if self.sole_voter_leader() {
            return None;
        }
        let m = self.raft.metrics();
        let m = m.borrow();
        if m.state == ServerState::Leader && m.current_leader == Some(self.id) {
            let since = m.millis_since_quorum_ack.unwrap_or(u64::MAX);
            return (since >= ELECTION_TIMEOUT_MS.0).then_some(since);
        }
        Some(
            self.last_append
                .lock()
                .expect("last_append lock")
                .map_or(u64::MAX, |t| t.elapsed().as_millis() as u64),
        )
    }

    /// Is this node the leader and the only voter (a one-node hive)?
    pub fn is_sole_voter_leader(&self) -> bool {
        self.sole_voter_leader()
    }

    /// Runs `fut` on the Raft runtime and waits for it.
    async fn run<F>(&self, fut: F) -> Result<F::Output, RaftError>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.rt
            .spawn(fut)
            .await
            .map_err(|e| unavailable(format_args!("Raft task failed: {e}")))
    }
}

/// The private runtime Raft runs on (see [`MetaRaft`]). Dropping it never blocks inside an
/// async context (tokio would panic): there its tasks are cancelled in the background;
/// elsewhere the drop waits for them to be gone.
struct RaftRuntime(Option<tokio::runtime::Runtime>);

impl RaftRuntime {
    fn start() -> Result<RaftRuntime, RaftError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(4)
            .thread_name("hivefs-meta-raft")
            .enable_time()
            .build()
            .map_err(|e| unavailable(format_args!("cannot start the Raft runtime: {e}")))?;
        Ok(RaftRuntime(Some(rt)))
    }

    fn spawn<F>(&self, fut: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.0
            .as_ref()
            .expect("only stop() and drop take the runtime")
            .spawn(fut)
    }

    /// Shuts the runtime down from a plain thread (blocking is not allowed in async code)
    /// and waits, without blocking the caller's executor, until its tasks are gone.
    async fn stop(self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name("hivefs-meta-stop".into())
            .spawn(move || {
                let mut this = self;
                if let Some(rt) = this.0.take() {
                    rt.shutdown_timeout(STOP_WAIT);
                }
                let _ = tx.send(());
            });
        if spawned.is_ok() {
            let _ = rx.await;
        }
    }
}

impl Drop for RaftRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                rt.shutdown_background();
            } else {
                rt.shutdown_timeout(STOP_WAIT);
            }
        }
    }
}

/// Runs on the Raft runtime: opens storage, starts Raft, initializes a brand-new one-member
/// cluster, and for a one-member cluster waits until it leads and has applied everything.
#[allow(clippy::too_many_arguments)]
async fn start<N: RaftNetworkFactory<TypeConfig>>(
    dir: PathBuf,
    log_path: PathBuf,
    node_id: u64,
    addr: String,
    applier: Arc<dyn Applier>,
    network: N,
    bootstrap: bool,
    tuning: Tuning,
) -> Result<openraft::Raft<TypeConfig>, RaftError> {
    let opened = tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let log = LogStore::open(&log_path, node_id)?;
        let sm = StateMachine::load(applier)?;
        Ok::<_, String>((log, sm))
    })
    .await
    .map_err(|e| unavailable(format_args!("opening storage failed: {e}")))?;
    let (log, sm) = opened.map_err(unavailable)?;

    let config = Config {
        cluster_name: "hivefs-meta".into(),
        snapshot_policy: SnapshotPolicy::LogsSinceLast(tuning.snapshot_every),
        max_in_snapshot_log_to_keep: tuning.keep_logs_after_snapshot,
        heartbeat_interval: HEARTBEAT_MS,
        election_timeout_min: ELECTION_TIMEOUT_MS.0,
        election_timeout_max: ELECTION_TIMEOUT_MS.1,
        max_payload_entries: MAX_PAYLOAD_ENTRIES,
        ..Default::default()
    }
    .validate()
    .map_err(|e| unavailable(format_args!("bad Raft config: {e}")))?;

    let raft = openraft::Raft::new(node_id, Arc::new(config), network, log, sm)
        .await
        .map_err(|e| from_fatal(&e))?;
    match settle(&raft, node_id, addr, bootstrap).await {
        Ok(()) => Ok(raft),
        Err(e) => {
            let _ = raft.shutdown().await;
            Err(e)
        }
    }
}

async fn settle(
    raft: &openraft::Raft<TypeConfig>,
    node_id: u64,
    addr: String,
    bootstrap: bool,
) -> Result<(), RaftError> {
    let fresh = !raft.is_initialized().await.map_err(|e| from_fatal(&e))?;
    if fresh && !bootstrap {
        // A node joining a hive: the leader adds it; until then it has no membership.
        return Ok(());
    }
    if fresh {
        let members = BTreeMap::from([(node_id, BasicNode::new(addr))]);
        match raft.initialize(members).await {
            Ok(()) => {}
            Err(OrError::Fatal(f)) => return Err(from_fatal(&f)),
            Err(OrError::APIError(e)) => return Err(unavailable(format_args!("initialize: {e}"))),
        }
    }
    let voters: BTreeSet<u64> = raft
        .with_raft_state(|st| st.membership_state.effective().voter_ids().collect())
        .await
        .map_err(|e| from_fatal(&e))?;
    if voters != BTreeSet::from([node_id]) {
        // Part of (or not yet in) a larger cluster: leadership is decided elsewhere.
        return Ok(());
    }
    if !fresh {
        // The only voter: no reason to sit out an election timeout first.
        raft.trigger().elect().await.map_err(|e| from_fatal(&e))?;
    }
    raft.wait(Some(LEADER_WAIT))
        .state(
            ServerState::Leader,
            "one-member metadata cluster elects itself",
        )
        .await
        .map_err(|e| unavailable(format_args!("no leader: {e}")))?;
    // Read index = max(this leader's first entry, committed), and as its own quorum the
    // leader committed its whole log on start: wait until all of it is applied.
    match raft.ensure_linearizable().await {
        Ok(_) => Ok(()),
        Err(OrError::APIError(e)) => Err(unavailable(format_args!("catching up: {e}"))),
        Err(OrError::Fatal(f)) => Err(from_fatal(&f)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, Vote};
    use redb::{Database, ReadableTable, TableDefinition};
    use std::ops::Range;
    use std::sync::atomic::{AtomicBool, Ordering};

    const COUNTS: TableDefinition<u64, u64> = TableDefinition::new("counts");
    const VARS: TableDefinition<&str, &[u8]> = TableDefinition::new("vars");
    const NODE: u64 = 1;

    /// A tiny applier over a redb file of its own. A command is a `u64` id (LE); applying
    /// it counts one application of that id and bumps a counter, and the reply is the
    /// counter. `raft_state` is recorded in the same transaction as the effects.
    struct TestApplier {
        db: Database,
        fail: AtomicBool,
    }

    impl TestApplier {
        fn open(path: &Path) -> Arc<TestApplier> {
            let db = Database::create(path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(COUNTS).unwrap();
            txn.open_table(VARS).unwrap();
            txn.commit().unwrap();
            Arc::new(TestApplier {
                db,
                fail: AtomicBool::new(false),
            })
        }

        fn var(&self, key: &str) -> Option<Vec<u8>> {
            let txn = self.db.begin_read().unwrap();
            let table = txn.open_table(VARS).unwrap();
            let v = table.get(key).unwrap();
            v.map(|v| v.value().to_vec())
        }

        fn counter(&self) -> u64 {
            self.var("counter").map_or(0, |v| reply(&v))
        }

        fn counts(&self) -> BTreeMap<u64, u64> {
            let txn = self.db.begin_read().unwrap();
            let table = txn.open_table(COUNTS).unwrap();
            let rows = table.iter().unwrap();
            rows.map(|r| r.unwrap())
                .map(|(k, v)| (k.value(), v.value()))
                .collect()
        }

        fn applied(&self) -> Option<LogId<u64>> {
            let bytes = self.var("raft_state")?;
            raft_log::decode::<AppliedState>(&bytes)
                .unwrap()
                .last_applied
        }
    }

    impl Applier for TestApplier {
        fn raft_state(&self) -> anyhow::Result<Option<Vec<u8>>> {
            Ok(self.var("raft_state"))
        }

        fn apply_batch(
            &self,
            cmds: &[Option<&[u8]>],
            raft_state: &[u8],
        ) -> anyhow::Result<Vec<Vec<u8>>> {
            if self.fail.load(Ordering::SeqCst) {
                anyhow::bail!("injected applier failure");
            }
            let txn = self.db.begin_write()?;
            let mut replies = Vec::with_capacity(cmds.len());
            {
                let mut counts = txn.open_table(COUNTS)?;
                let mut vars = txn.open_table(VARS)?;
                let mut counter = vars.get("counter")?.map_or(0, |v| reply(v.value()));
                for cmd in cmds {
                    let Some(cmd) = cmd else {
                        replies.push(Vec::new());
                        continue;
                    };
                    let id = u64::from_le_bytes((*cmd).try_into()?);
                    let n = counts.get(id)?.map_or(0, |v| v.value());
                    counts.insert(id, n + 1)?;
                    counter += 1;
                    replies.push(counter.to_le_bytes().to_vec());
                }
                vars.insert("counter", counter.to_le_bytes().as_slice())?;
                vars.insert("raft_state", raft_state)?;
            }
            txn.commit()?;
            Ok(replies)
        }

        fn export(&self) -> anyhow::Result<Vec<u8>> {
            let mut out = self.counter().to_le_bytes().to_vec();
            for (id, n) in self.counts() {
                out.extend_from_slice(&id.to_le_bytes());
                out.extend_from_slice(&n.to_le_bytes());
            }
            Ok(out)
        }

        fn import(&self, data: &[u8], raft_state: &[u8]) -> anyhow::Result<()> {
            anyhow::ensure!(data.len() % 16 == 8, "bad snapshot length {}", data.len());
            let txn = self.db.begin_write()?;
            {
                let mut counts = txn.open_table(COUNTS)?;
                counts.retain(|_, _| false)?;
                for row in data[8..].chunks_exact(16) {
                    counts.insert(reply(&row[..8]), reply(&row[8..]))?;
                }
                let mut vars = txn.open_table(VARS)?;
                vars.insert("counter", &data[..8])?;
                vars.insert("raft_state", raft_state)?;
            }
            txn.commit()?;
            Ok(())
        }
    }

    fn cmd(id: u64) -> Vec<u8> {
        id.to_le_bytes().to_vec()
    }

    fn reply(bytes: &[u8]) -> u64 {
        u64::from_le_bytes(bytes.try_into().expect("an 8-byte reply"))
    }

    /// The caller's executor in tests: a current-thread runtime (Raft has its own).
    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
    }

    struct Hive {
        _tmp: tempfile::TempDir,
        raft_dir: PathBuf,
        applier_path: PathBuf,
    }

    impl Hive {
        fn new() -> Hive {
            let tmp = tempfile::tempdir().unwrap();
            Hive {
                raft_dir: tmp.path().join("raft"),
                applier_path: tmp.path().join("applier.redb"),
                _tmp: tmp,
            }
        }

        fn applier(&self) -> Arc<TestApplier> {
            TestApplier::open(&self.applier_path)
        }

        async fn try_open(
            &self,
            applier: &Arc<TestApplier>,
            tuning: Tuning,
        ) -> Result<MetaRaft, RaftError> {
            let addr = "127.0.0.1:7400".to_string();
            MetaRaft::open_tuned(
                &self.raft_dir,
                NODE,
                addr,
                applier.clone(),
                NoTransport,
                true,
                tuning,
            )
            .await
        }

        async fn open(&self, applier: &Arc<TestApplier>) -> MetaRaft {
            self.try_open(applier, Tuning::default()).await.unwrap()
        }
    }

    /// Reopens the applier from its file, after checking Raft let go of it.
    fn reopen(hive: &Hive, applier: Arc<TestApplier>) -> Arc<TestApplier> {
        assert_eq!(
            Arc::strong_count(&applier),
            1,
            "Raft still holds the applier"
        );
        drop(applier);
        hive.applier()
    }

    async fn write_all(meta: &MetaRaft, ids: Range<u64>, first_reply: u64) {
        for (i, id) in ids.enumerate() {
            let r = meta.write(cmd(id)).await.unwrap();
            assert_eq!(reply(&r), first_reply + i as u64, "reply to command {id}");
        }
    }

    fn assert_once(applier: &TestApplier, ids: Range<u64>) {
        let counts = applier.counts();
        for id in ids {
            assert_eq!(counts.get(&id), Some(&1), "command {id} applied once");
        }
    }

    #[test]
    fn thousand_writes_reply_in_order() {
        let hive = Hive::new();
        let applier = hive.applier();
        rt().block_on(async {
            let meta = hive.open(&applier).await;
            assert!(meta.is_leader());
            write_all(&meta, 0..1000, 1).await;
            assert_eq!(applier.counter(), 1000);
            assert_eq!(applier.counts().len(), 1000);
            assert_once(&applier, 0..1000);
            let last_applied = meta.raft.metrics().borrow().last_applied;
            assert_eq!(applier.applied(), last_applied);
            meta.shutdown().await.unwrap();
        });
    }

    #[test]
    fn shutdown_and_reopen_resume_without_reapplying() {
        let hive = Hive::new();
        let mut applier = hive.applier();
        let rt = rt();
        rt.block_on(async {
            let meta = hive.open(&applier).await;
            write_all(&meta, 0..300, 1).await;
            meta.shutdown().await.unwrap();
        });
        applier = reopen(&hive, applier);
        assert_eq!(applier.counter(), 300);
        assert_once(&applier, 0..300);
        for round in 1..=2u64 {
            let before = applier.applied().expect("something applied");
            rt.block_on(async {
                let meta = hive.open(&applier).await;
                // Reopening applies nothing new: at most a blank entry if it had to elect.
                let now = applier.applied().unwrap();
                assert!(
                    now >= before && now.index <= before.index + 1,
                    "{before} -> {now}"
                );
                assert_eq!(applier.counter(), 300 * round);
                let ids = 300 * round..300 * (round + 1);
                write_all(&meta, ids, 300 * round + 1).await;
                meta.shutdown().await.unwrap();
            });
            applier = reopen(&hive, applier);
            assert_eq!(applier.counter(), 300 * (round + 1));
            assert_once(&applier, 0..300 * (round + 1));
        }
    }

    #[test]
    fn crash_keeps_acknowledged_writes_exactly_once() {
        let hive = Hive::new();
        let mut applier = hive.applier();
        let rt = rt();
        let meta = rt.block_on(async {
            let meta = hive.open(&applier).await;
            write_all(&meta, 0..200, 1).await;
            meta
        });
        // Fifty more in flight, then the "crash": the Raft runtime dies with them.
        for id in 200..250 {
            let raft = meta.raft.clone();
            meta.rt
                .spawn(async move { raft.client_write(cmd(id)).await });
        }
        drop(meta);
        applier = reopen(&hive, applier);
        assert_once(&applier, 0..200);
        let counts = applier.counts();
        assert!(counts.values().all(|&n| n == 1), "nothing applied twice");
        assert_eq!(applier.counter(), counts.len() as u64);

        // Reopen: whatever was logged is applied, exactly once; then it goes on.
        let n = rt.block_on(async {
            let meta = hive.open(&applier).await;
            let n = applier.counter();
            write_all(&meta, 1000..1010, n + 1).await;
            meta.shutdown().await.unwrap();
            n
        });
        applier = reopen(&hive, applier);
        let counts = applier.counts();
        assert!(counts.values().all(|&n| n == 1), "nothing applied twice");
        assert_eq!(applier.counter(), n + 10);
        assert_eq!(counts.len() as u64, n + 10);
    }

    #[test]
    fn entries_logged_but_not_applied_are_applied_once_on_reopen() {
        let hive = Hive::new();
        let mut applier = hive.applier();
        let rt = rt();
        let meta = rt.block_on(async {
            let meta = hive.open(&applier).await;
            write_all(&meta, 0..20, 1).await;
            // The applier starts failing: the entry is durably logged (hence committed in
            // a one-member cluster) but cannot be applied; Raft stops on the storage error.
            applier.fail.store(true, Ordering::SeqCst);
            // Every call from then on says what failed.
            for id in [20, 21] {
                match meta.write(cmd(id)).await {
                    Err(RaftError::Unavailable(msg)) => {
                        assert!(msg.contains("injected applier failure"), "{msg}")
                    }
                    other => panic!("expected Unavailable, got {other:?}"),
                }
            }
            assert!(matches!(
                meta.read_barrier().await,
                Err(RaftError::Unavailable(_))
            ));
            meta
        });
        drop(meta);
        applier = reopen(&hive, applier);
        assert_eq!(applier.counter(), 20);
        rt.block_on(async {
            let meta = hive.open(&applier).await;
            // `open` returned: command 20 (logged, never applied) has been applied once.
            assert_eq!(applier.counts().get(&20), Some(&1));
            let n = applier.counter();
            write_all(&meta, 100..105, n + 1).await;
            meta.shutdown().await.unwrap();
        });
        applier = reopen(&hive, applier);
        assert!(applier.counts().values().all(|&n| n == 1));
        assert_once(&applier, 0..21);
    }

    #[test]
    fn snapshot_purge_and_reopen() {
        let hive = Hive::new();
        let mut applier = hive.applier();
        let tuning = Tuning {
            snapshot_every: 100,
            keep_logs_after_snapshot: 0,
        };
        let rt = rt();
        rt.block_on(async {
            let meta = hive.try_open(&applier, tuning).await.unwrap();
            write_all(&meta, 0..350, 1).await;
            let raft = meta.raft.clone();
            let purged = meta
                .run(async move {
                    // The policy snapshots (and purges) on its own...
                    raft.wait(Some(Duration::from_secs(20)))
                        .metrics(|m| m.purged.is_some(), "purged by policy")
                        .await
                        .unwrap();
                    // ...and an explicit one covers everything applied.
                    raft.trigger().snapshot().await.unwrap();
                    let applied = raft.metrics().borrow().last_applied;
                    let m = raft
                        .wait(Some(Duration::from_secs(20)))
                        .metrics(
                            |m| m.snapshot == applied && m.purged == applied,
                            "snapshot and purge up to applied",
                        )
                        .await
                        .unwrap();
                    m.purged.unwrap()
                })
                .await
                .unwrap();
            assert!(purged.index >= 350);
            meta.shutdown().await.unwrap();
        });
        // The log file holds no entry at or below the purge point.
        {
            let log_path = hive.raft_dir.join(LOG_FILE);
            let log = LogStore::open(&log_path, NODE).unwrap();
            let state = log.db().log_state().unwrap();
            let purged = state.last_purged_log_id.unwrap();
            assert!(purged.index >= 350);
            let all = log
                .db()
                .entries((std::ops::Bound::Unbounded, std::ops::Bound::Unbounded));
            assert!(all.unwrap().iter().all(|e| e.log_id.index > purged.index));
        }
        applier = reopen(&hive, applier);
        assert_eq!(applier.counter(), 350);
        rt.block_on(async {
            let meta = hive.try_open(&applier, tuning).await.unwrap();
            assert_eq!(applier.counter(), 350);
            assert_once(&applier, 0..350);
            // Logs are purged, so openraft rebuilt a snapshot from the applier on start.
            assert!(meta.raft.metrics().borrow().snapshot.is_some());
            write_all(&meta, 350..360, 351).await;
            meta.shutdown().await.unwrap();
        });
        applier = reopen(&hive, applier);
        assert_once(&applier, 0..360);
    }

    #[test]
    fn snapshot_install_replaces_the_state() {
        let src_hive = Hive::new();
        let dst_hive = Hive::new();
        let src = src_hive.applier();
        let dst = dst_hive.applier();
        rt().block_on(async {
            let mut sm = StateMachine::load(src.clone()).unwrap();
            let leader = CommittedLeaderId::new(3, NODE);
            let entries: Vec<Entry<TypeConfig>> = (1..=10)
                .map(|i| Entry {
                    log_id: LogId::new(leader, i),
                    payload: EntryPayload::Normal(cmd(i)),
                })
                .collect();
            let replies = sm.apply(entries.clone()).await.unwrap();
            assert_eq!(replies.len(), 10);
            // An entry at or below the applied log id is refused, not applied again.
            assert!(sm.apply(entries[9..].to_vec()).await.is_err());
            assert_eq!(src.counter(), 10);

            let mut builder = sm.get_snapshot_builder().await;
            let snap = builder.build_snapshot().await.unwrap();
            assert_eq!(snap.meta.last_log_id, Some(LogId::new(leader, 10)));
            let current = sm.get_current_snapshot().await.unwrap().unwrap();
            assert_eq!(current.meta, snap.meta);

            let mut dst_sm = StateMachine::load(dst.clone()).unwrap();
            dst_sm
                .install_snapshot(&snap.meta, snap.snapshot)
                .await
                .unwrap();
            let (applied, _) = dst_sm.applied_state().await.unwrap();
            assert_eq!(applied, Some(LogId::new(leader, 10)));
            assert_eq!(dst.counts(), src.counts());
            assert_eq!(dst.counter(), 10);
            assert_eq!(dst.applied(), applied);
        });
    }

    #[test]
    fn read_barrier_on_the_single_leader() {
        let hive = Hive::new();
        let applier = hive.applier();
        rt().block_on(async {
            let meta = hive.open(&applier).await;
            assert!(meta.is_leader());
            meta.read_barrier().await.unwrap();
            write_all(&meta, 0..5, 1).await;
            meta.read_barrier().await.unwrap();
            assert_eq!(applier.counter(), 5);
            meta.shutdown().await.unwrap();
        });
    }

    fn expect_unavailable(res: Result<MetaRaft, RaftError>, needles: &[&str]) {
        match res {
            Err(RaftError::Unavailable(msg)) => {
                for needle in needles {
                    assert!(msg.contains(needle), "{msg:?} should mention {needle:?}");
                }
            }
            Err(e) => panic!("expected Unavailable, got {e}"),
            Ok(_) => panic!("expected Unavailable, got a running MetaRaft"),
        }
    }

    #[test]
    fn corrupt_log_file_is_a_clear_error() {
        let rt = rt();
        // 1. A state file that is not one.
        let hive = Hive::new();
        let applier = hive.applier();
        let log_path = hive.raft_dir.join(LOG_FILE);
        std::fs::create_dir_all(&log_path).unwrap();
        std::fs::write(log_path.join("state"), vec![0xa5; 8192]).unwrap();
        let res = rt.block_on(hive.try_open(&applier, Tuning::default()));
        expect_unavailable(
            res,
            &[&log_path.display().to_string(), "no valid state slot"],
        );

        // 2. A log whose entry in the middle was damaged: `open` checks the whole log, and
        // tells damage from a torn append (entries after it are whole).
        let hive = Hive::new();
        let mut applier = hive.applier();
        let log_path = hive.raft_dir.join(LOG_FILE);
        rt.block_on(async {
            let meta = hive.open(&applier).await;
            write_all(&meta, 0..5, 1).await;
            meta.shutdown().await.unwrap();
        });
        let (seg, off, len) = {
            let log = LogStore::open(&log_path, NODE).unwrap();
            let last = log.db().log_state().unwrap().last_log_id.unwrap().index;
            log.db().location(last - 2).unwrap()
        };
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&seg)
                .unwrap();
            let mut b = [0u8];
            let at = off + len as u64 - 1;
            f.read_exact_at(&mut b, at).unwrap();
            f.write_all_at(&[b[0] ^ 0x40], at).unwrap();
        }
        applier = reopen(&hive, applier);
        let res = rt.block_on(hive.try_open(&applier, Tuning::default()));
        let path = seg.display().to_string();
        expect_unavailable(res, &[&path, "damaged record", "valid records after it"]);

        // 3. A log that belongs to another node.
        let hive = Hive::new();
        let applier = hive.applier();
        rt.block_on(async {
            hive.open(&applier).await.shutdown().await.unwrap();
            let other = MetaRaft::open(&hive.raft_dir, 2, "x".into(), applier.clone()).await;
            expect_unavailable(other, &["belongs to node 1, not to node 2"]);
        });
    }

    #[test]
    fn meta_raft_can_be_shared_between_threads() {
        fn shareable<T: Send + Sync + 'static>() {}
        shareable::<MetaRaft>();
        shareable::<RaftError>();
    }

    #[test]
    fn the_network_stub_says_unreachable() {
        rt().block_on(async {
            let mut factory = NoTransport;
            let mut peer = factory.new_client(2, &BasicNode::new("x")).await;
            let rpc = VoteRequest::new(Vote::new(1, NODE), None);
            let err = peer
                .vote(rpc, RPCOption::new(Duration::from_secs(1)))
                .await
                .unwrap_err();
            assert!(matches!(err, RPCError::Unreachable(_)));
            assert!(err
                .to_string()
                .contains("replication transport arrives with the cluster issue"));
        });
    }
}
