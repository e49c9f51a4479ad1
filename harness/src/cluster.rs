//! Helpers for tests of hives of several nodes: metadata clients, the members and leader
//! the nodes report, directory listings through the metadata service.

use crate::TestNode;
use hivefs_client::meta::MetaClient;
use hivefs_net::meta::{Answer, FileKind, Member, MetaReply, Mutation, Query};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// A metadata client of `node` (it follows the leader from there).
pub fn meta_client(node: &TestNode) -> MetaClient {
    MetaClient::connect(&node.client_options(), node.meta_port()).expect("metadata connect")
}

/// What `node` says of the metadata cluster: (leader, applied index, members).
pub fn members(node: &TestNode) -> (Option<u64>, Option<u64>, Vec<Member>) {
    match meta_client(node).query(0, Query::Members) {
        Ok(Ok(Answer::Members {
            leader,
            last_applied,
            members,
            ..
        })) => (leader, last_applied, members),
        other => panic!("members: {other:?}"),
    }
}

/// Wait (at most 30 s) until every node of `nodes` names the same leader; returns it.
pub fn settled_leader(nodes: &[&TestNode]) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let leaders: BTreeSet<Option<u64>> = nodes.iter().map(|n| members(n).0).collect();
        if leaders.len() == 1 {
            if let Some(Some(l)) = leaders.into_iter().next() {
                return l;
            }
        }
        assert!(Instant::now() < deadline, "no common leader within 30 s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The mutation that creates regular file `name` (mode 0644, root's) under `parent`.
pub fn new_file(parent: u64, name: &str) -> Mutation {
    Mutation::Create {
        parent,
        name: name.as_bytes().to_vec(),
        kind: FileKind::File,
        perm: 0o644,
        uid: 0,
        gid: 0,
        rdev: 0,
    }
}

/// Create regular file `name` under `parent` of `vol`; panics if the call itself fails.
pub fn create_file(m: &MetaClient, vol: u32, parent: u64, name: &str) -> MetaReply {
    m.mutate(vol, new_file(parent, name)).expect("create call")
}

/// Create volume `name` (one copy); returns its id.
pub fn create_volume(m: &MetaClient, name: &str) -> u32 {
    match m.mutate(
        0,
        Mutation::CreateVolume {
            name: name.into(),
            copies: 1,
        },
    ) {
        Ok(Ok(Answer::Volume(v))) => v.id,
        other => panic!("create volume: {other:?}"),
    }
}

/// Every name in directory `dir` of `vol`, in listing order (duplicates kept: a test
/// checks there are none).
pub fn list_names(m: &MetaClient, vol: u32, dir: u64) -> Vec<String> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        match m
            .query(
                vol,
                Query::ReadDir {
                    ino: dir,
                    after,
                    max: 1000,
                },
            )
            .expect("readdir call")
        {
            Ok(Answer::Dir { entries, end }) => {
                for e in &entries {
                    out.push(String::from_utf8_lossy(&e.name).into_owned());
                    after = e.cookie;
                }
                if end || entries.is_empty() {
                    return out;
                }
            }
            other => panic!("readdir: {other:?}"),
        }
    }
}
