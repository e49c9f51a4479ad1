//! The metadata log version: which commands the hive's metadata log may carry.
//!
//! A node cannot apply a committed command its build does not know (`store.rs` stops its
//! apply rather than answer it differently from the other members). So a command newer
//! than protocol version 2 ([`Mutation::log_version`]) enters the log only once the hive's
//! log version (group 0, raised by [`Mutation::SetLogVersion`]) is at least its own, and
//! the leader raises the log version only once every member speaks it: the protocol
//! version each member negotiated on the leader's ping link (`health.rs`). In a hive being
//! upgraded node by node, the new commands wait until the last member runs the new build;
//! until then they are refused `NOTSUP` and clients send the older form (`hi` commits a
//! file's bytes and its setattrs as separate entries).
//!
//! # Invariants
//! - The log version never goes down.
//! - No member is sent an entry above the version it speaks: a raise counts every member of
//!   Raft's effective membership (one whose version is unknown holds it back), a node joins
//!   and is admitted only if it speaks the log version, and raises and admissions are
//!   serialized (`Shared::membership`).
//! - A command above the log version is refused before it is proposed.
//! - A node whose build speaks less than its store's log version refuses to start
//!   ([`check_build`]) rather than fail at the next apply. (Builds older than this rule
//!   cannot check: a downgrade below the log version is not supported.)

use super::server::{self, Shared};
use super::store::MetaStore;
use hivefs_net::frame::{PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN};
use hivefs_net::meta::{Errno, Mutation};
use std::collections::{BTreeSet, HashMap};
use std::sync::OnceLock;

/// The highest protocol version this node's metadata service speaks (on its port, on its
/// links to other nodes, and in its log): this build's [`PROTOCOL_VERSION_MAX`], unless
/// `HIVE_TEST_SPEAK_VERSION` holds it lower, so that a test can stand in a node of an
/// older build (`harness/tests/cluster.rs`).
pub fn speaks() -> u16 {
    static SPEAKS: OnceLock<u16> = OnceLock::new();
    *SPEAKS.get_or_init(|| {
        let Ok(v) = std::env::var("HIVE_TEST_SPEAK_VERSION") else {
            return PROTOCOL_VERSION_MAX;
        };
        match v.parse::<u16>() {
            Ok(v) if (PROTOCOL_VERSION_MIN..=PROTOCOL_VERSION_MAX).contains(&v) => {
                tracing::warn!(
                    version = v,
                    "HIVE_TEST_SPEAK_VERSION: this node's metadata service speaks as an older build"
                );
                v
            }
            _ => {
                tracing::warn!(
                    "HIVE_TEST_SPEAK_VERSION={v:?} is not a version this build speaks \
                     ({PROTOCOL_VERSION_MIN}..={PROTOCOL_VERSION_MAX}): ignored"
                );
                PROTOCOL_VERSION_MAX
            }
        }
    })
}

/// The version every member of `members` speaks, `me` (this build) included, as far as
/// `known` (a member's negotiated version, by id) tells; `None` while one is unknown.
pub fn members_speak(me: u64, members: &BTreeSet<u64>, known: &HashMap<u64, u16>) -> Option<u16> {
    members
        .iter()
        .filter(|m| **m != me)
        .try_fold(speaks(), |v, m| known.get(m).map(|k| v.min(*k)))
}

/// Refuse to serve a store whose log may hold commands this build cannot decode.
pub fn check_build(store: &MetaStore) -> anyhow::Result<()> {
    let at = store.log_version()?;
    if at > speaks() {
        anyhow::bail!(
            "this hive's metadata log is at version {at}, and this build speaks versions up to \
             {}: run a newer `hive` on this node",
            speaks()
        );
    }
    Ok(())
}

/// The leader's step (once a second, `health.rs`): raise the log version to what every
/// member speaks, when that is more. `known`: the versions negotiated on this leader's
/// ping links. Returns the new version when it raised it.
pub(super) fn raise(sh: &Shared, known: &HashMap<u64, u16>) -> anyhow::Result<Option<u16>> {
    // An admission is running: the next round counts its node.
    let Ok(_serial) = sh.membership.try_lock() else {
        return Ok(None);
    };
    let at = sh.store.log_version()?;
    if at >= speaks() {
        return Ok(None);
    }
    let members = server::block_on(sh.raft.members())?;
    let Some(all) = members_speak(sh.cfg.raft_id, &members, known) else {
        return Ok(None);
    };
    if all <= at {
        return Ok(None);
    }
    let cmd = server::one_off_command(Mutation::SetLogVersion { version: all })?;
    match server::block_on(server::mutate(sh, cmd, false))? {
        Ok(_) => {
            tracing::info!(
                from = at,
                to = all,
                members = members.len(),
                "metadata log version raised: every member speaks it"
            );
            Ok(Some(all))
        }
        Err(e) => anyhow::bail!("raising the metadata log version to {all}: {e}"),
    }
}

/// May `op` be proposed now? `NOTSUP` when it is newer than the log version.
pub(super) fn admits(sh: &Shared, op: &Mutation) -> anyhow::Result<Result<(), Errno>> {
    let needs = op.log_version();
    if needs <= PROTOCOL_VERSION_MIN || sh.store.log_version()? >= needs {
        return Ok(Ok(()));
    }
    Ok(Err(Errno::NOTSUP))
}

/// May a node whose link negotiated `version` join the hive (and be admitted)? `NOTSUP`
/// when it cannot read what the log may hold already. The caller holds
/// `Shared::membership` until the node is a member.
pub(super) fn may_join(sh: &Shared, version: u16, who: &str) -> anyhow::Result<Result<(), Errno>> {
    let at = sh.store.log_version()?;
    if version >= at {
        return Ok(Ok(()));
    }
    tracing::warn!(
        node = who,
        speaks = version,
        log_version = at,
        "refusing a node whose build cannot read this hive's metadata log: upgrade it first"
    );
    Ok(Err(Errno::NOTSUP))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_member_must_be_known_and_the_lowest_counts() {
        let members: BTreeSet<u64> = [1, 2, 3].into();
        let mut known = HashMap::from([(2, PROTOCOL_VERSION_MAX)]);
        assert_eq!(members_speak(1, &members, &known), None, "3 unknown");
        known.insert(3, PROTOCOL_VERSION_MIN);
        assert_eq!(
            members_speak(1, &members, &known),
            Some(PROTOCOL_VERSION_MIN),
            "an older member holds the version down"
        );
        known.insert(3, PROTOCOL_VERSION_MAX);
        assert_eq!(
            members_speak(1, &members, &known),
            Some(PROTOCOL_VERSION_MAX)
        );
        // Versions of nodes that are not members do not count; this build's own does.
        known.insert(9, PROTOCOL_VERSION_MIN);
        assert_eq!(
            members_speak(1, &members, &known),
            Some(PROTOCOL_VERSION_MAX)
        );
        assert_eq!(
            members_speak(1, &[1].into(), &HashMap::new()),
            Some(PROTOCOL_VERSION_MAX),
            "a one-member hive speaks this build's version"
        );
    }
}
