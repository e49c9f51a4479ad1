//! A hive of several real node processes on loopback: `hive join`, the metadata Raft group
//! over mutual TLS, leader failover under a stream of mutations (`kill -9`), a restarted
//! member catching up, and a minority that refuses namespace changes within a bound.
//!
//! Node links: Raft traffic only from a node certificate of this hive.
//!
//! Oracle: every mutation a client saw acknowledged is present afterwards, exactly once
//! (a create applied twice would answer EEXIST to its own retry), on whichever node leads.

use hivefs_client::meta::MetaClient;
use hivefs_harness::cluster::{
    create_file, create_volume as volume, list_names, members, meta_client as connect, new_file,
    settled_leader,
};
use hivefs_harness::mount::TestMount;
use hivefs_harness::{NodeOptions, TestNode};
use hivefs_net::conn::FramedConn;
use hivefs_net::frame::{PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN};
use hivefs_net::meta::{self, Answer, Errno, MetaRequest, PeerRequest, Query, RaftRpc, ROOT_INO};
use hivefs_net::placement::NodeState;
use hivefs_net::proto::{ErrorCode, Request, Response};
use std::collections::BTreeSet;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn opts(name: &str) -> NodeOptions {
    NodeOptions::default().shards(1).name(name).size("512M")
}

/// A hive of three voters: `n[0]` made it, `n[1]` joined through it, `n[2]` through `n[1]`
/// (a follower, which points the join to the leader).
fn three_nodes() -> Vec<TestNode> {
    let mut a = TestNode::start(opts("c1"));
    let mut b = TestNode::join(opts("c2"), &mut a);
    let c = TestNode::join(opts("c3"), &mut b);
    vec![a, b, c]
}

fn names(m: &MetaClient, vol: u32, dir: u64) -> BTreeSet<String> {
    list_names(m, vol, dir).into_iter().collect()
}

#[test]
fn three_nodes_join_and_agree_on_the_map() {
    let nodes = three_nodes();
    let leader = settled_leader(&nodes.iter().collect::<Vec<_>>());
    for n in &nodes {
        let (l, _, ms) = members(n);
        assert_eq!(l, Some(leader));
        assert_eq!(ms.len(), 3, "{ms:?}");
        assert!(ms.iter().all(|m| m.voter), "{ms:?}");
    }
    // The cluster map (group 0), read through a follower: the client follows to the leader.
    // Node ids follow the join order: nodes[i] is node i + 1.
    let follower = &nodes[(0..3).find(|i| *i as u64 + 1 != leader).unwrap()];
    let m = connect(follower);
    match m.query(0, Query::Nodes).unwrap() {
        Ok(Answer::Nodes {
            map_epoch,
            nodes: map,
        }) => {
            assert_eq!(map_epoch, 3, "one epoch per node recorded");
            let ids: Vec<u64> = map.iter().map(|n| n.id).collect();
            assert_eq!(ids, vec![1, 2, 3]);
            for (i, n) in map.iter().enumerate() {
                assert_eq!(n.spec.meta_port, nodes[i].meta_port());
                assert_eq!(n.spec.base_port, nodes[i].base_port());
                assert_eq!(n.state, NodeState::Up);
            }
        }
        other => panic!("nodes: {other:?}"),
    }
    // `hive status` on a follower shows the cluster.
    let st = nodes[2].status_json();
    assert_eq!(
        st["cluster"]["raft"]["members"].as_array().unwrap().len(),
        3
    );

    // A token made through one node works on every node; revoked, it stops working on
    // every node within seconds (each reloads its registry from its copy of the log).
    let out = nodes[0].hive(&["token", "create", "--scope", "host"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tok = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let mut o = follower.client_options();
    o.token = tok.clone();
    let t0 = Instant::now();
    let mut c = loop {
        match hivefs_client::hive::HiveClient::connect(&o) {
            Ok(c) => break c,
            Err(e) => {
                assert!(
                    t0.elapsed() < Duration::from_secs(5),
                    "a new token not accepted by a follower: {e}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    let probe = hivefs_net::chunk::ChunkId::compute(&c.map().dedupe_key, b"probe");
    assert!(c.get(&[probe]).is_ok());
    // A token's id: hex of the first 8 bytes of its secret's SHA-256 (fingerprint_der
    // hashes any bytes).
    let id = hivefs_net::tls::fingerprint_der(tok.as_bytes())[..16].to_string();
    let out = nodes[0].hive(&["token", "revoke", "--id", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t0 = Instant::now();
    while c.get(&[probe]).is_ok() {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "revoked token still works on a follower"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "revoked on one node, refused by a follower's shard after {:?}",
        t0.elapsed()
    );
}

/// The state the map gives node `id`, asked through `via`.
fn state_of(via: &TestNode, id: u64) -> (NodeState, u64) {
    match connect(via).query(0, Query::Nodes).unwrap() {
        Ok(Answer::Nodes { map_epoch, nodes }) => (
            nodes.iter().find(|n| n.id == id).expect("in the map").state,
            map_epoch,
        ),
        other => panic!("nodes: {other:?}"),
    }
}

fn wait_state(via: &TestNode, id: u64, want: NodeState, within: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        let (s, _) = state_of(via, id);
        if s == want {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < within,
            "node {id} is {s:?}, not {want:?}, after {within:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_leader_marks_a_silent_node_down_and_up_again() {
    let mut nodes = three_nodes();
    let leader = settled_leader(&nodes.iter().collect::<Vec<_>>());
    let victim = (1..=3).find(|id| *id != leader).unwrap();
    let via = (1..=3).find(|id| *id != victim).unwrap();
    let (_, epoch0) = state_of(&nodes[(via - 1) as usize], victim);
    nodes[(victim - 1) as usize].kill9();
    let took = wait_state(
        &nodes[(via - 1) as usize],
        victim,
        NodeState::Down,
        Duration::from_secs(20),
    );
    eprintln!("node {victim} killed: marked down after {took:?}");
    assert!(
        took >= Duration::from_secs(4),
        "down only after DOWN_AFTER of silence: {took:?}"
    );
    nodes[(victim - 1) as usize].run();
    let took = wait_state(
        &nodes[(via - 1) as usize],
        victim,
        NodeState::Up,
        Duration::from_secs(20),
    );
    eprintln!("node {victim} restarted: marked up after {took:?}");
    let (_, epoch) = state_of(&nodes[(via - 1) as usize], victim);
    assert_eq!(epoch, epoch0 + 2, "one map epoch per change");
    // `hive status` shows states; `hive node remove --no-wait` starts a drain.
    let out = nodes[(via - 1) as usize].hive(&[
        "node",
        "remove",
        "--no-wait",
        "--id",
        &victim.to_string(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        state_of(&nodes[(via - 1) as usize], victim).0,
        NodeState::Draining
    );
    let text = nodes[(via - 1) as usize].status_text();
    assert!(text.contains("draining"), "{text}");
}

#[test]
fn acknowledged_mutations_survive_leader_kills() {
    let mut nodes = three_nodes();
    let leader = settled_leader(&nodes.iter().collect::<Vec<_>>());
    let idx = |id: u64| (id - 1) as usize;
    // Connect through a follower: calls find the leader, then follow it through failovers.
    let entry = (0..3).find(|i| *i != idx(leader)).unwrap();
    let m = Arc::new(connect(&nodes[entry]));
    let vol = volume(&m, "cl");

    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (m, acked, errors, stop) = (m.clone(), acked.clone(), errors.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let name = format!("f{i:06}");
                match m.mutate(vol, new_file(ROOT_INO, &name)) {
                    Ok(Ok(_)) => acked.lock().unwrap().push(name),
                    Ok(Err(e)) => errors.lock().unwrap().push(format!("{name}: errno {e:?}")),
                    Err(e) => errors.lock().unwrap().push(format!("{name}: {e}")),
                }
                i += 1;
            }
        })
    };
    let wait_acks = |n: usize| {
        let deadline = Instant::now() + Duration::from_secs(60);
        let start = acked.lock().unwrap().len();
        while acked.lock().unwrap().len() < start + n {
            assert!(
                Instant::now() < deadline,
                "writer stalled: {:?}",
                errors.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_acks(100);
    // Kill the leader mid-stream; the writer must go on at the new leader.
    let t0 = Instant::now();
    nodes[idx(leader)].kill9();
    let before = acked.lock().unwrap().len();
    wait_acks(100);
    let failover = t0.elapsed();
    eprintln!("first leader (node {leader}) killed with {before} acknowledged; 100 more acknowledged {failover:?} later");
    // Bring it back: it catches up as a follower.
    nodes[idx(leader)].run();
    let second = settled_leader(&nodes.iter().collect::<Vec<_>>());
    assert_ne!(
        second, leader,
        "a killed leader does not lead again before a new term"
    );
    wait_acks(100);
    // Kill the second leader too (the first is back, so a majority remains).
    nodes[idx(second)].kill9();
    wait_acks(100);
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    let errors = errors.lock().unwrap().clone();
    assert!(
        errors.is_empty(),
        "mutations failed during failovers: {errors:?}"
    );

    let acked = acked.lock().unwrap().clone();
    let listed = names(&m, vol, ROOT_INO);
    let missing: Vec<&String> = acked.iter().filter(|n| !listed.contains(*n)).collect();
    assert!(missing.is_empty(), "acknowledged but lost: {missing:?}");
    // Exactly once: nothing beyond what was asked (a name not acknowledged may exist only
    // as the writer's last, unanswered call).
    assert!(
        listed.len() <= acked.len() + 1,
        "{} listed, {} acknowledged",
        listed.len(),
        acked.len()
    );
    // A retry of an acknowledged create under a new sequence is refused: it exists once.
    assert_eq!(create_file(&m, vol, ROOT_INO, &acked[0]), Err(Errno::EXIST));
    eprintln!(
        "{} creates acknowledged across two leader kills, all present exactly once",
        acked.len()
    );

    // The second leader comes back and catches up: every node applies the same log.
    nodes[idx(second)].run();
    let third = settled_leader(&nodes.iter().collect::<Vec<_>>());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let applied: BTreeSet<Option<u64>> = nodes.iter().map(|n| members(n).1).collect();
        if applied.len() == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "nodes did not converge: {applied:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // And reads from whoever leads now see the same namespace.
    nodes[idx(third)].kill9();
    let m2 = connect(&nodes[(idx(third) + 1) % 3]);
    assert_eq!(names(&m2, vol, ROOT_INO), listed);
}

#[test]
fn a_minority_refuses_namespace_changes_within_a_bound() {
    let mut nodes = three_nodes();
    let leader = settled_leader(&nodes.iter().collect::<Vec<_>>());
    let m = connect(&nodes[0]);
    let vol = volume(&m, "minority");
    assert!(create_file(&m, vol, ROOT_INO, "before").is_ok());
    // Keep the leader, lose both followers: the leader is now a minority of one.
    let keep = (leader - 1) as usize;
    for (i, n) in nodes.iter_mut().enumerate() {
        if i != keep {
            n.kill9();
        }
    }
    let lone = connect(&nodes[keep]);
    let t0 = Instant::now();
    let r = lone.mutate(vol, new_file(ROOT_INO, "during"));
    let took = t0.elapsed();
    eprintln!("a minority's create answered in {took:?}: {r:?}");
    let msg = match r {
        Err(e) => e.to_string(),
        Ok(other) => panic!("a minority accepted a namespace change: {other:?}"),
    };
    assert!(took < Duration::from_secs(12), "took {took:?}");
    assert!(
        msg.contains("no quorum") || msg.contains("metadata"),
        "a clear error: {msg}"
    );
    // One follower back: a majority again, and the change goes through.
    let back = (keep + 1) % 3;
    nodes[back].run();
    let r = create_file(&lone, vol, ROOT_INO, "after");
    assert!(matches!(r, Ok(Answer::Attr(_))), "{r:?}");
    let listed = names(&lone, vol, ROOT_INO);
    assert!(
        listed.contains("before") && listed.contains("after"),
        "{listed:?}"
    );
}

/// Send one request on a fresh TLS connection to `node`'s metadata port, after a Hello
/// with `token`; `cert`: a node certificate (and key) to present, as a peer does.
fn meta_exchange(
    node: &TestNode,
    token: &str,
    cert: Option<(&str, &str)>,
    req: &MetaRequest,
) -> Result<Response, String> {
    let ca_pem = std::fs::read_to_string(node.dir().join("ca.pem")).unwrap();
    let cfg = match cert {
        Some((c, k)) => hivefs_net::tls::peer_client_config(&ca_pem, c, k).unwrap(),
        None => hivefs_net::tls::client_config_pinned(&node.ca_fingerprint()).unwrap(),
    };
    let s = TcpStream::connect(("127.0.0.1", node.meta_port())).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let name = hivefs_net::tls::server_name("127.0.0.1").unwrap();
    let mut conn = FramedConn::new_client(s, Some((cfg, name))).unwrap();
    let hello = Request::Hello {
        min_version: PROTOCOL_VERSION_MIN,
        max_version: PROTOCOL_VERSION_MAX,
        token: token.into(),
        client_name: "cluster-test".into(),
    };
    let send = |conn: &mut FramedConn<TcpStream>, id: u64, r: &Request| {
        conn.send_request(PROTOCOL_VERSION_MIN, id, r)
            .map_err(|e| e.to_string())?;
        conn.recv_response()
            .map(|(_, r)| r)
            .map_err(|e| e.to_string())
    };
    match send(&mut conn, 1, &hello)? {
        Response::HelloOk { .. } => {}
        other => return Ok(other),
    }
    send(
        &mut conn,
        2,
        &Request::Meta {
            body: meta::encode(req),
        },
    )
}

#[test]
fn raft_traffic_needs_a_node_certificate_of_the_hive() {
    let node = TestNode::start(opts("auth"));
    let vote = MetaRequest::Peer(PeerRequest::Raft {
        rpc: RaftRpc::Vote,
        body: vec![0xff; 16],
    });
    // A client with the admin token but no certificate: refused, connection closed.
    match meta_exchange(&node, &node.token(), None, &vote) {
        Ok(Response::Error { code, message }) => {
            assert_eq!(code, ErrorCode::Unauthenticated, "{message}");
        }
        other => panic!("Raft traffic from a plain client: {other:?}"),
    }
    // No token and no certificate: the Hello is refused.
    match meta_exchange(&node, "", None, &vote) {
        Ok(Response::Error { code, .. }) => assert_eq!(code, ErrorCode::BadToken),
        other => panic!("empty token without a certificate: {other:?}"),
    }
    // A node certificate of another hive: the handshake fails.
    let other = hivefs_net::tls::generate_ca("other").unwrap();
    let (c, k) = hivefs_net::tls::issue_node_cert(
        &other.cert_pem,
        &other.key_pem,
        "evil",
        &["127.0.0.1".into()],
    )
    .unwrap();
    let r = meta_exchange(&node, "", Some((&c, &k)), &vote);
    assert!(r.is_err(), "a foreign node certificate was accepted: {r:?}");
    // A node certificate of this hive, with a garbage Raft body: a clear error and the
    // link closes; the node keeps serving.
    let ca_pem = std::fs::read_to_string(node.dir().join("ca.pem")).unwrap();
    let ca_key = std::fs::read_to_string(node.dir().join("ca.key")).unwrap();
    let (c, k) =
        hivefs_net::tls::issue_node_cert(&ca_pem, &ca_key, "peer", &["127.0.0.1".into()]).unwrap();
    match meta_exchange(&node, "", Some((&c, &k)), &vote) {
        Ok(Response::Error { code, message }) => {
            assert_eq!(code, ErrorCode::BadRequest);
            assert!(message.contains("bad Vote request"), "{message}");
        }
        other => panic!("garbage Raft body: {other:?}"),
    }
    // ... and a peer link carries nothing but Raft.
    let q = MetaRequest::Query {
        volume: 0,
        query: Query::Volumes,
    };
    match meta_exchange(&node, "", Some((&c, &k)), &q) {
        Ok(Response::Error { code, .. }) => assert_eq!(code, ErrorCode::Unauthenticated),
        other => panic!("a query on a peer link: {other:?}"),
    }
    let m = connect(&node);
    assert!(matches!(
        m.query(0, Query::Volumes),
        Ok(Ok(Answer::Volumes(_)))
    ));
}

#[test]
fn with_the_majority_gone_reads_go_on_and_changes_fail_within_ten_seconds() {
    let mut nodes = three_nodes();
    let _ = settled_leader(&nodes.iter().collect::<Vec<_>>());
    // The mount talks to node 1 (its chunks live there) and survives alone.
    let Some(mnt) = TestMount::start_or_skip(&nodes[0], "stale") else {
        return;
    };
    let dir = mnt.join("d");
    std::fs::create_dir(&dir).unwrap();
    let data: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(dir.join("data.bin"), &data).unwrap();
    std::fs::write(dir.join("small.txt"), b"hello").unwrap();
    nodes[1].kill9();
    nodes[2].kill9();
    // Forget what the kernel cached: reads must go through the mount to the hive.
    std::thread::sleep(Duration::from_secs(2));
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    let t0 = Instant::now();
    let mut listed: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    listed.sort();
    assert_eq!(listed, ["data.bin", "small.txt"]);
    assert!(
        std::fs::read(dir.join("data.bin")).unwrap() == data,
        "data.bin reads back wrong"
    );
    assert_eq!(std::fs::read(dir.join("small.txt")).unwrap(), b"hello");
    eprintln!(
        "with 2 of 3 nodes down, listing and reading took {:?}",
        t0.elapsed()
    );
    let log = mnt.log();
    assert!(
        log.contains("stale"),
        "the mount reports stale reads:\n{}",
        mnt.log_tail(20)
    );
    // A change needs the majority: a clear error within 10 s.
    let t0 = Instant::now();
    let r = std::fs::write(dir.join("new.txt"), b"x");
    let took = t0.elapsed();
    eprintln!("a create without a majority failed after {took:?}: {r:?}");
    assert!(r.is_err(), "a create succeeded without a majority");
    assert!(took < Duration::from_secs(12), "took {took:?}");
    // A majority again: changes go through.
    nodes[1].run();
    let t0 = Instant::now();
    loop {
        match std::fs::write(dir.join("new.txt"), b"x") {
            Ok(()) => break,
            Err(e) => {
                assert!(t0.elapsed() < Duration::from_secs(30), "no recovery: {e}");
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
    eprintln!(
        "changes went through again {:?} after a node came back",
        t0.elapsed()
    );
    assert_eq!(std::fs::read(dir.join("new.txt")).unwrap(), b"x");
    drop(mnt);
}

fn swept(report: &str) -> u64 {
    TestNode::swept_count(report)
}

#[test]
fn gc_and_fsck_cover_every_node() {
    let nodes = three_nodes();
    let _ = settled_leader(&nodes.iter().collect::<Vec<_>>());
    // Two mounts through two nodes: each sends its chunks to their buckets' primaries.
    let Some(m1) = TestMount::start_or_skip(&nodes[0], "spread") else {
        return;
    };
    let m2 = TestMount::start(&nodes[1], "spread");
    let blob = |seed: u32| -> Vec<u8> {
        (0..2u32 << 20)
            .map(|i| (i.wrapping_add(seed).wrapping_mul(2654435761) >> 11) as u8)
            .collect()
    };
    std::fs::write(m1.join("a.bin"), blob(1)).unwrap();
    std::fs::write(m2.join("b.bin"), blob(2)).unwrap();
    // fsck, asked through the third node, finds every referenced chunk on some node.
    let report = nodes[2].fsck(true);
    eprintln!(
        "fsck with chunks on two nodes: {}",
        report.lines().next().unwrap_or("")
    );
    assert!(!report.contains("referenced chunks 0 "), "{report}");
    // Delete both; collections sweep the garbage on both nodes.
    std::fs::remove_file(m1.join("a.bin")).unwrap();
    std::fs::remove_file(m2.join("b.bin")).unwrap();
    let mut total = 0;
    for _ in 0..6 {
        let out = nodes[2].gc();
        total += swept(&out);
        if total >= 4 {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("collections swept {total} chunks across the nodes");
    assert!(
        total >= 4,
        "the deleted files' chunks on both nodes were not swept: {total}"
    );
    nodes[2].gc();
    nodes[2].fsck(false);
    // After collections, a mount on a follower node still commits: its shards stamp
    // claims with the epoch the leader advanced.
    let data = blob(3);
    if let Err(e) = std::fs::write(m2.join("c.bin"), &data) {
        panic!(
            "writing through the second node after collections: {e}\n{}",
            m2.log_tail(30)
        );
    }
    assert!(std::fs::read(m2.join("c.bin")).unwrap() == data);
    assert!(
        std::fs::read(m1.join("c.bin")).unwrap() == data,
        "seen through the other mount"
    );
    nodes[0].fsck(true);
    drop((m1, m2));
}

/// The hive's metadata log version, as `hive status` on `node` reports it.
fn log_version(node: &TestNode) -> Option<u64> {
    node.status_json()["cluster"]["log"]["version"].as_u64()
}

/// Write `name` through `mnt` with a chmod and chown made while its bytes are held (sent
/// with them at close), and check what the hive recorded.
fn write_then_chmod(mnt: &TestMount, m: &MetaClient, vol: u32, name: &str) {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let mut f = std::fs::File::create(mnt.join(name)).unwrap();
    f.write_all(&vec![7u8; 100 << 10]).unwrap();
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .unwrap();
    std::os::unix::fs::fchown(&f, Some(4321), Some(765)).unwrap();
    drop(f);
    match m.query(
        vol,
        Query::Lookup {
            parent: ROOT_INO,
            name: name.as_bytes().to_vec(),
        },
    ) {
        Ok(Ok(Answer::Attr(a))) => {
            assert_eq!(
                (a.size, a.perm & 0o7777, a.uid, a.gid),
                (100 << 10, 0o600, 4321, 765),
                "{name}: {a:?}\n{}",
                mnt.log_tail(30)
            );
        }
        other => panic!("lookup {name}: {other:?}"),
    }
}

/// A rolling upgrade: while one member runs an older build (a node told by
/// `HIVE_TEST_SPEAK_VERSION` to speak protocol version 2 only), the log stays at version
/// 2, commands of version 3 are refused `NOTSUP` and a mount sends the older form; once
/// that node runs the new build the leader raises the log to 3; from then on a node of
/// the older build may not join.
#[test]
fn a_hive_of_mixed_builds_keeps_to_what_its_oldest_member_speaks() {
    const OLD: &str = "HIVE_TEST_SPEAK_VERSION";
    let mut a = TestNode::start(opts("old1").env(OLD, "2"));
    let mut b = TestNode::join(opts("new2"), &mut a);
    let c = TestNode::join(opts("new3"), &mut b);
    let _ = settled_leader(&[&a, &b, &c]);
    // The leader counts every member each second: a few rounds, and nothing moves.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(log_version(&b), Some(2), "{}", b.status_text());
    // A leader of the new build holds it too: with the old member down (its version
    // unknown), and with it back.
    a.stop();
    let t0 = Instant::now();
    let leader = loop {
        let l = settled_leader(&[&b, &c]);
        if l != 1 {
            break l;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "no new leader");
        std::thread::sleep(Duration::from_millis(200));
    };
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        log_version(&b),
        Some(2),
        "old member down: {}",
        b.status_text()
    );
    a.run();
    std::thread::sleep(Duration::from_secs(3));
    let now = settled_leader(&[&a, &b, &c]);
    eprintln!("new-build leader {leader}, then {now}, with the old member back");
    assert_eq!(
        log_version(&b),
        Some(2),
        "old member back: {}",
        b.status_text()
    );
    let m = connect(&b);
    let vol = hivefs_harness::mount::ensure_volume(&b, "mixed");
    let ino = match create_file(&m, vol, ROOT_INO, "raw") {
        Ok(Answer::Attr(a)) => a.ino,
        other => panic!("create: {other:?}"),
    };
    let newer = |ino| meta::Mutation::CommitWriteThenSet {
        ino,
        extents: Vec::new(),
        size_at_least: 0,
        claim_epoch: 1,
        lease: 0,
        then: vec![meta::SetAttr {
            perm: Some(0o600),
            ..Default::default()
        }],
    };
    // Through either node: the old one's connection cannot carry it, the new one's
    // leader or gate refuses it.
    for via in [&a, &b] {
        assert_eq!(
            connect(via).mutate(vol, newer(ino)).unwrap(),
            Err(Errno::NOTSUP)
        );
    }
    let mnt = TestMount::start_or_skip(&b, "mixed");
    if let Some(mnt) = &mnt {
        write_then_chmod(mnt, &m, vol, "before");
        assert!(
            mnt.log()
                .contains("cannot take setattrs in their bytes' commit yet"),
            "the mount did not fall back to the older form\n{}",
            mnt.log_tail(30)
        );
    }

    // The old node is upgraded: the log follows within a few rounds.
    a.stop();
    a.set_env(OLD, None);
    a.run();
    let t0 = Instant::now();
    while log_version(&b) != Some(3) {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "log version not raised after the upgrade: {}",
            b.status_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "log version 3, {:?} after the upgraded node came back",
        t0.elapsed()
    );
    assert!(
        [&a, &b, &c]
            .iter()
            .any(|n| n.log().contains("metadata log version raised")),
        "no leader logged the raise"
    );
    assert_ne!(
        connect(&a).mutate(vol, newer(ino)).unwrap(),
        Err(Errno::NOTSUP),
        "a version-3 command is still refused after the raise"
    );
    if let Some(mnt) = &mnt {
        write_then_chmod(mnt, &m, vol, "after");
    }

    // A node of the older build cannot join a log it could not read.
    match TestNode::try_join(opts("old3").env(OLD, "2"), &mut b) {
        Ok(_) => panic!("a node speaking version 2 joined a log at version 3"),
        Err(why) => assert!(why.contains("upgrade this node's `hive` first"), "{why}"),
    }
    assert_eq!(members(&b).2.len(), 3, "the refused node is no member");
    b.fsck(true);
    drop((mnt, c));
}
