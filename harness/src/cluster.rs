//! Helpers for tests of hives of several nodes: metadata clients, the members and leader
//! the nodes report, directory listings through the metadata service.

use crate::{NodeOptions, TestNode};
use hivefs_client::meta::MetaClient;
use hivefs_net::meta::{Answer, FileKind, Member, MetaReply, Mutation, Query};
use hivefs_net::placement::NodeState;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// Three nodes of 2 shards each with devices of `size` (sparse files), named `r1`..`r3`,
/// the hive's default copies; returned once the placement map every node publishes lists
/// all three up.
pub fn three_nodes_sized(size: &str) -> Vec<TestNode> {
    let o = |name: &str| NodeOptions::default().shards(2).name(name).size(size);
    let mut a = TestNode::start(o("r1"));
    let mut b = TestNode::join(o("r2"), &mut a);
    let c = TestNode::join(o("r3"), &mut b);
    let nodes = vec![a, b, c];
    let deadline = Instant::now() + Duration::from_secs(20);
    for n in &nodes {
        loop {
            let mut cl = n.client();
            let map = cl.hive_map();
            if map.nodes.len() == 3 && map.nodes.iter().all(|m| m.state == NodeState::Up) {
                break;
            }
            assert!(Instant::now() < deadline, "maps not published: {map:?}");
            std::thread::sleep(Duration::from_millis(200));
            cl.refresh_map();
        }
    }
    nodes
}

/// Chunks `node` holds, over its shards (from its stats).
pub fn chunk_count(node: &TestNode) -> u64 {
    chunk_count_of(&mut node.client())
}

/// Chunks the node that `c` first contacted holds, over its shards.
pub fn chunk_count_of(c: &mut hivefs_client::hive::HiveClient) -> u64 {
    c.stats()
        .expect("stats")
        .iter()
        .map(|j| {
            let v: serde_json::Value = serde_json::from_str(j).expect("stats json");
            v["chunks"].as_u64().expect("chunks")
        })
        .sum()
}

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

/// Create volume `name` (the default copies, 3); returns its id.
pub fn create_volume(m: &MetaClient, name: &str) -> u32 {
    match m.mutate(
        0,
        Mutation::CreateVolume {
            name: name.into(),
            copies: hivefs_client::hive::DEFAULT_LEVEL,
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
