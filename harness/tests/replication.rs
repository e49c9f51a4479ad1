//! Replicated puts between real node processes on loopback: the client sends each chunk to
//! its bucket's primary, which stores it and forwards the other copies over mutual TLS
//! before it answers; reads fail over from replica to replica.
//!
//! Oracle: the chunk counts every node reports (with 3 nodes and 3 copies, every node
//! holds every chunk), and every chunk written read back verified (the client hashes
//! each one against its id) while nodes are killed with `kill -9`.

use hivefs_client::hive::{ClientError, HiveClient};
use hivefs_harness::{raw_chunk, NodeOptions, TestNode};
use hivefs_net::chunk::{ChunkId, Codec, DedupeKey};
use hivefs_net::frame::{PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN};
use hivefs_net::proto::{ErrorCode, PutChunk, PutResult, Request, Response};
use hivefs_nvme::rng::SplitMix64;
use std::time::{Duration, Instant};

fn opts(name: &str) -> NodeOptions {
    NodeOptions::default().shards(2).name(name).size("512M")
}

/// Three nodes with the default 3 copies (2 before acknowledging); returns them once the
/// placement map every node publishes lists all three.
fn three_nodes() -> Vec<TestNode> {
    three_nodes_sized("512M")
}

/// `n` distinct raw chunks (4-12 KiB, from `seed`).
fn chunks(key: &DedupeKey, seed: u64, n: usize) -> Vec<PutChunk> {
    let mut rng = SplitMix64::new(seed);
    (0..n)
        .map(|i| raw_chunk(key, rng.bytes(4096 + (i * 37) % 8192)))
        .collect()
}

use hivefs_harness::cluster::{chunk_count_of as chunk_count, three_nodes_sized};

fn read_back(c: &mut HiveClient, want: &[PutChunk], what: &str) {
    let ids: Vec<ChunkId> = want.iter().map(|c| c.id).collect();
    let got = c.get(&ids).unwrap_or_else(|e| panic!("{what}: get: {e}"));
    for (w, g) in want.iter().zip(got) {
        assert!(
            g.as_deref() == Some(&w.data[..]),
            "{what}: chunk {} read back as {:?} bytes",
            w.id,
            g.map(|g| g.len())
        );
    }
}

#[test]
fn every_replica_holds_every_chunk_and_reads_fail_over() {
    let mut nodes = three_nodes();
    let mut c = nodes[0].client();
    let key = c.map().dedupe_key;
    let first = chunks(&key, 1, 300);
    let t = Instant::now();
    let (results, _) = c.put(&first).expect("put");
    assert!(
        results.iter().all(|r| *r == PutResult::Stored),
        "{results:?}"
    );
    eprintln!("300 chunks put with 3 copies in {:?}", t.elapsed());
    // DPDK nodes (HIVE_TEST_NET=dpdk) send their copies over their userspace stacks.
    if nodes[0].options().dpdk.is_some() {
        let log = nodes[0].log();
        assert!(
            log.contains("\"userspace TCP\"") && !log.contains("\"kernel TCP\""),
            "replication links of a DPDK node not over its userspace stack:\n{}",
            nodes[0].log_tail(40)
        );
    }
    // Copies are made before the put is answered only on min_copies (2) nodes; the third
    // follows within moments.
    let deadline = Instant::now() + Duration::from_secs(10);
    for n in &nodes {
        let mut nc = n.client();
        loop {
            let count = chunk_count(&mut nc);
            if count == 300 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node holds {count} of 300 chunks"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // Every chunk is found again through any node; duplicates are not stored again.
    let (again, _) = nodes[1].client().put(&first).expect("put again");
    assert!(
        again.iter().all(|r| *r == PutResult::Duplicate),
        "{again:?}"
    );

    // One node killed: reads fail over at once; writes go on (2 copies are enough) once
    // the hive has marked it down and the primaries moved.
    nodes[2].kill9();
    let t = Instant::now();
    read_back(&mut c, &first, "one node down");
    eprintln!("300 chunks read with a node killed in {:?}", t.elapsed());
    let second = chunks(&key, 2, 200);
    let t = Instant::now();
    let (results, _) = c.put(&second).expect("put with one node down");
    assert!(results.iter().all(|r| *r != PutResult::Rejected));
    eprintln!("200 chunks put with a node killed in {:?}", t.elapsed());
    read_back(
        &mut nodes[1].client(),
        &second,
        "written with one node down",
    );

    // Two of three killed: nothing can be stored on 2 nodes, so nothing is acknowledged;
    // what was written is still read from the survivor.
    nodes[1].kill9();
    let third = chunks(&key, 3, 20);
    let t = Instant::now();
    match c.put(&third) {
        Err(ClientError::Refused {
            code: ErrorCode::TooFewCopies | ErrorCode::NotPrimary,
            ..
        })
        | Err(ClientError::Connect { .. })
        | Err(ClientError::Conn { .. }) => {}
        other => panic!("a put with 1 of 3 nodes up answered {other:?}"),
    }
    eprintln!("put with 2 of 3 nodes down refused after {:?}", t.elapsed());
    read_back(&mut c, &first, "two nodes down");
    read_back(&mut c, &second, "two nodes down");

    // Both back: writes are acknowledged again.
    nodes[1].restart();
    nodes[2].restart();
    let t = Instant::now();
    let (results, _) = c.put(&third).expect("put after the nodes came back");
    assert!(results.iter().all(|r| *r != PutResult::Rejected));
    eprintln!(
        "put acknowledged {:?} after both nodes restarted",
        t.elapsed()
    );
    read_back(&mut nodes[2].client(), &third, "after restart");
}

/// Wait until the node `c` first contacted holds `want` chunks; returns how long it took.
fn until_count(c: &mut HiveClient, want: u64, within: Duration, what: &str) -> Duration {
    let t = Instant::now();
    loop {
        let n = chunk_count(c);
        if n == want {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < within,
            "{what}: the node holds {n} chunks, not {want}, after {within:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn repair_gives_a_returning_node_what_it_missed() {
    let mut nodes = three_nodes();
    let mut c = nodes[0].client();
    let key = c.map().dedupe_key;
    let before = chunks(&key, 11, 100);
    c.put(&before).expect("put");
    nodes[2].kill9();
    // Acknowledged with 2 copies once the hive marks the node down (the put retries).
    let during = chunks(&key, 12, 300);
    c.put(&during).expect("put with a node down");
    nodes[2].restart();
    let mut back = nodes[2].client();
    let took = until_count(&mut back, 400, Duration::from_secs(60), "after restart");
    eprintln!(
        "repair gave the returning node the 300 chunks it missed {took:?} after it served again"
    );
    read_back(&mut back, &during, "repaired copies");
    let status = nodes[0].hive(&["status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("repair:"), "{text}");
    eprintln!(
        "{}",
        text.lines()
            .find(|l| l.starts_with("repair:"))
            .unwrap_or("")
    );
    // A pass by hand, followed with its progress bar to the end.
    let out = nodes[2].hive(&["repair"]);
    let (bar, summary) = (
        String::from_utf8_lossy(&out.stderr).to_string(),
        String::from_utf8_lossy(&out.stdout).to_string(),
    );
    assert!(out.status.success(), "{bar}\n{summary}");
    assert!(bar.contains("100%") && bar.contains("repair pass"), "{bar}");
    assert!(summary.starts_with("repair: idle"), "{summary}");
    eprintln!("hive repair: {}", summary.trim());
}

#[test]
fn a_new_node_gets_exactly_the_buckets_it_now_holds() {
    let mut nodes = three_nodes();
    let mut c = nodes[0].client();
    let key = c.map().dedupe_key;
    let data = chunks(&key, 21, 600);
    c.put(&data).expect("put");
    // Readers and writers go on while the node joins and its buckets move to it.
    let (stop, worker) = busy(nodes[1].client_options(), data.clone(), None);
    let d = TestNode::join(opts("r4"), &mut nodes[0]);
    // The new map: which chunks the fourth node is now a replica of (3 copies of 4).
    let deadline = Instant::now() + Duration::from_secs(20);
    let map = loop {
        c.refresh_map();
        let m = c.hive_map().clone();
        if m.nodes.len() == 4 {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "the fourth node is not in the map"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    // Node ids follow the join order: the newest is the largest.
    let new_id = map.nodes.iter().map(|n| n.id).max().unwrap();
    let mine = data
        .iter()
        .filter(|ch| map.replicas_of(&ch.id, 3).contains(&new_id))
        .count() as u64;
    let mut dc = d.client();
    let took = until_count(&mut dc, mine, Duration::from_secs(60), "new node");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = worker
        .join()
        .unwrap()
        .expect("reads and writes while the node joined");
    assert!((0.6..0.9).contains(&(mine as f64 / 600.0)), "{mine}");
    // The nodes that are no longer replicas of the moved buckets release their copies
    // once every replica holds them: 3 copies of each chunk again, no more.
    let t = Instant::now();
    let all: Vec<&TestNode> = nodes.iter().chain(std::iter::once(&d)).collect();
    let counts = loop {
        let counts: Vec<u64> = all.iter().map(|n| chunk_count(&mut n.client())).collect();
        if counts.iter().sum::<u64>() == 3 * 600 {
            break counts;
        }
        assert!(
            t.elapsed() < Duration::from_secs(90),
            "copies beyond the replicas not released: {counts:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let settled = t.elapsed();
    // What repair moved and released, as the old nodes report it (`repair.json`, written
    // after each step: a step's copies can land before its totals do), against the bytes
    // stored (3 copies). Totals only grow: one past the range never comes back into it.
    let stored: u64 = data.iter().map(|c| c.data.len() as u64).sum::<u64>() * 3;
    let fraction = |f: fn(&std::path::Path) -> u64| {
        nodes.iter().map(|n| f(n.dir())).sum::<u64>() as f64 / stored as f64
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while (fraction(repair_copied_bytes) == 0.0 || fraction(repair_released_bytes) < 0.15)
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    let (moved, released) = (
        fraction(repair_copied_bytes),
        fraction(repair_released_bytes),
    );
    eprintln!(
        "the new node received {mine} of 600 chunks ({:.3}; ideal 0.75) in {took:?}; repair moved {moved:.3} of the {stored} bytes stored (ideal 0.25); {rounds} rounds of reads and writes meanwhile, no error; copies per node {counts:?} ({settled:?} after the copies were made); the old nodes released {released:.3} of the bytes stored",
        mine as f64 / 600.0,
    );
    // Repair never copies more than the new node's share (ideal 0.25). It may copy less:
    // the writers above put the same chunks again, and once a client has the new map those
    // puts store the new node's share at it directly (its primary), racing repair (CI
    // saw 0.143 and 0.123 after two rounds). What only repair does is release the old
    // copies: that stays strict.
    assert!(moved > 0.0 && moved < 0.35, "moved {moved}");
    assert!((0.15..0.35).contains(&released), "released {released}");
    read_back(&mut dc, &data, "through the new node");
    drop(d);
}

/// Stored bytes a node's repair released (copies beyond the replicas) since it was
/// initialised (`repair.json`).
fn repair_released_bytes(dir: &std::path::Path) -> u64 {
    let Ok(text) = std::fs::read_to_string(dir.join("repair.json")) else {
        return 0;
    };
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    v["total_released_bytes"].as_u64().unwrap_or(0)
}

/// Bytes a node's repair copied to other nodes since it was initialised (`repair.json`).
fn repair_copied_bytes(dir: &std::path::Path) -> u64 {
    let Ok(text) = std::fs::read_to_string(dir.join("repair.json")) else {
        return 0;
    };
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    v["total_copied_bytes"].as_u64().unwrap_or(0)
}

/// A client of `o` reading `data` back (checked) and writing in a loop until `stop`:
/// `data` again (duplicates), or with `fresh_seed` new chunks (20 per round, seeds from
/// it). Returns the rounds done, or the first error.
#[allow(clippy::type_complexity)]
fn busy(
    o: hivefs_client::hive::ClientOptions,
    data: Vec<PutChunk>,
    fresh_seed: Option<u64>,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::thread::JoinHandle<Result<u64, String>>,
) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    let worker = std::thread::spawn(move || -> Result<u64, String> {
        let mut c = HiveClient::connect(&o).map_err(|e| e.to_string())?;
        let key = c.map().dedupe_key;
        let ids: Vec<ChunkId> = data.iter().map(|c| c.id).collect();
        let mut rounds = 0u64;
        while !s.load(std::sync::atomic::Ordering::Relaxed) {
            let got = c.get(&ids).map_err(|e| format!("read: {e}"))?;
            if got
                .iter()
                .zip(&data)
                .any(|(g, w)| g.as_deref() != Some(&w.data[..]))
            {
                return Err("a chunk read back wrong".into());
            }
            match fresh_seed {
                Some(seed) => c.put(&chunks(&key, seed + rounds, 20)),
                None => c.put(&data),
            }
            .map_err(|e| format!("write: {e}"))?;
            rounds += 1;
        }
        Ok(rounds)
    });
    (stop, worker)
}

/// Block `i` of the big file: 8 MiB of SplitMix64 bytes seeded by `i` (incompressible, and
/// no two blocks alike, so nothing dedupes).
fn big_block(i: u64) -> Vec<u8> {
    SplitMix64::new(i + 1).bytes(BIG_BLOCK)
}

const BIG_BLOCK: usize = 8 << 20;

/// A thread writing blocks `0..blocks` of [`big_block`] to a new file at `path` (an
/// `fdatasync` after every `sync_every` blocks, if given; `fsync` at the end). Returns
/// the count of blocks written so far and the thread.
fn spawn_big_writer(
    path: &std::path::Path,
    blocks: u64,
    sync_every: Option<u64>,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicU64>,
    std::thread::JoinHandle<std::io::Result<()>>,
) {
    use std::io::Write;
    let written = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (path, w) = (path.to_path_buf(), written.clone());
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&path)?;
        for i in 0..blocks {
            f.write_all(&big_block(i))?;
            if sync_every.is_some_and(|n| i % n == n - 1) {
                f.sync_data()?;
            }
            w.store(i + 1, std::sync::atomic::Ordering::Relaxed);
        }
        f.sync_all()
    });
    (written, writer)
}

/// MiB from the environment variable `var`, else `default`.
fn env_mib(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Three nodes with devices sized for `mib` MiB written at 3 copies.
fn three_nodes_for(mib: u64) -> Vec<TestNode> {
    three_nodes_sized(&format!("{}M", mib * 3 / 2 + 512))
}

/// Read `path` back (a fresh open) and compare it with blocks `0..blocks` of [`big_block`].
fn assert_big_file(path: &std::path::Path, blocks: u64) {
    use std::io::Read;
    let mut f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; BIG_BLOCK];
    for i in 0..blocks {
        f.read_exact(&mut buf).unwrap();
        assert!(
            buf == big_block(i),
            "block {i} of the big file reads back wrong"
        );
    }
    assert_eq!(
        f.read(&mut buf).unwrap(),
        0,
        "the file is longer than written"
    );
}

/// Wait until `hive fsck` (run from `node`) is clean and finds every chunk at its copies;
/// returns how long that took. Panics after `within`.
fn until_fully_replicated(node: &TestNode, within: Duration) -> Duration {
    let t = Instant::now();
    loop {
        let out = node.hive(&["fsck"]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if out.status.success() && text.contains("under-replicated 0") {
            eprintln!("fsck: {}", text.lines().next().unwrap_or(""));
            return t.elapsed();
        }
        assert!(
            t.elapsed() < within,
            "copies not restored after {within:?}:\n{}",
            text.lines().take(5).collect::<Vec<_>>().join("\n")
        );
        std::thread::sleep(Duration::from_secs(2));
    }
}

#[test]
fn kill9_of_a_node_during_a_big_write_through_a_mount() {
    use std::sync::atomic::Ordering;
    // 2 GiB by default (the figure); HIVE_BIG_WRITE_MIB for a quicker run.
    let mib = env_mib("HIVE_BIG_WRITE_MIB", 2048);
    let blocks = (mib << 20) / BIG_BLOCK as u64;
    let mut nodes = three_nodes_for(mib);
    let Some(m) = hivefs_harness::mount::TestMount::start_or_skip(&nodes[0], "big") else {
        return;
    };
    let path = m.join("big.bin");
    let t = Instant::now();
    let (written, writer) = spawn_big_writer(&path, blocks, None);
    // A third of the way in, one node goes.
    while written.load(Ordering::Relaxed) < blocks / 3 && !writer.is_finished() {
        std::thread::sleep(Duration::from_millis(20));
    }
    nodes[2].kill9();
    let killed_at = written.load(Ordering::Relaxed);
    writer.join().expect("writer panicked").unwrap_or_else(|e| {
        panic!(
            "the write failed after a node was killed: {e}\n{}",
            m.log_tail(40)
        )
    });
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "{mib} MiB written through the mount with 3 copies in {secs:.1} s ({:.1} MiB/s), node killed after {} MiB",
        mib as f64 / secs,
        killed_at * 8
    );
    // Every byte reads back (a fresh open; the cache holds at most a little of it).
    let t = Instant::now();
    assert_big_file(&path, blocks);
    eprintln!(
        "read back and compared in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    // The node comes back; repair restores every chunk to 3 copies: fsck says so.
    nodes[2].restart();
    let took = until_fully_replicated(&nodes[0], Duration::from_secs(300));
    eprintln!("repair done {:.1} s after the restart", took.as_secs_f64());
    let status = nodes[0].hive(&["status"]);
    let text = String::from_utf8_lossy(&status.stdout).to_string();
    eprintln!(
        "{}",
        text.lines()
            .find(|l| l.starts_with("repair:"))
            .unwrap_or("")
    );
    drop(m);
}

/// The metadata leader killed while a mount on another node writes: commits stall for
/// the election, then go on under the new leader, which does not know the mount's write
/// lease: the mount reclaims it (nobody else took the file) and the write completes
/// without an error; every byte reads back; fsck is clean.
#[test]
fn kill9_of_the_metadata_leader_during_a_write_through_a_mount() {
    use std::sync::atomic::Ordering;
    let mib = env_mib("HIVE_LEADER_KILL_MIB", 256);
    let blocks = (mib << 20) / BIG_BLOCK as u64;
    let mut nodes = three_nodes_for(mib);
    let leader = hivefs_harness::cluster::settled_leader(&[&nodes[0], &nodes[1], &nodes[2]]);
    let li = (leader - 1) as usize;
    let mi = (li + 1) % 3;
    let Some(m) = hivefs_harness::mount::TestMount::start_or_skip(&nodes[mi], "lead") else {
        return;
    };
    let path = m.join("big.bin");
    // fdatasync every 64 MiB: commits all through the failover.
    let (written, writer) = spawn_big_writer(&path, blocks, Some(8));
    while written.load(Ordering::Relaxed) < blocks / 3 && !writer.is_finished() {
        std::thread::sleep(Duration::from_millis(20));
    }
    nodes[li].kill9();
    let t = Instant::now();
    writer.join().expect("writer panicked").unwrap_or_else(|e| {
        panic!(
            "the write failed after the leader was killed: {e}\n{}",
            m.log_tail(40)
        )
    });
    eprintln!(
        "leader (node {leader}) killed; the write finished {:.1} s later",
        t.elapsed().as_secs_f64()
    );
    assert_big_file(&path, blocks);
    assert!(
        m.log().contains("write lease reclaimed"),
        "no commit crossed the failover\n{}",
        m.log_tail(40)
    );
    drop(m);
    // The old leader comes back as a follower; repair gives it what it missed.
    nodes[li].restart();
    until_fully_replicated(&nodes[mi], Duration::from_secs(120));
}

/// Where `needle` first occurs in the file at `path` (read in 8 MiB pieces).
fn find_in_file(path: &std::path::Path, needle: &[u8]) -> Option<u64> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).ok()?;
    let mut buf = vec![0u8; 8 << 20];
    let mut carry: Vec<u8> = Vec::new();
    let mut base = 0u64;
    loop {
        let n = f.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        let mut hay = std::mem::take(&mut carry);
        let hay_start = base - hay.len() as u64;
        hay.extend_from_slice(&buf[..n]);
        if let Some(i) = hay.windows(needle.len()).position(|w| w == needle) {
            return Some(hay_start + i as u64);
        }
        carry = hay[hay.len().saturating_sub(needle.len())..].to_vec();
        base += n as u64;
    }
}

#[test]
fn a_flipped_copy_is_read_around_and_scrub_replaces_it() {
    use std::os::unix::fs::FileExt;
    let nodes = three_nodes();
    let mut c = nodes[0].client();
    let key = c.map().dedupe_key;
    // One chunk with a marker to find on a device.
    let marker = b"HIVEFS-SCRUB-TEST-MARKER-7f3a9c1";
    let mut data = chunks(&key, 31, 1).remove(0).data;
    data[1000..1000 + marker.len()].copy_from_slice(marker);
    let ch = PutChunk {
        id: ChunkId::compute(&key, &data),
        codec: Codec::Raw,
        raw_len: data.len() as u32,
        data: data.clone(),
    };
    c.put(std::slice::from_ref(&ch)).expect("put");
    // Flip a byte of the copy that reads try first (node ids follow the join order).
    let first = c
        .hive_map()
        .read_order(&c.hive_map().replicas_of(&ch.id, 3))[0];
    let victim = &nodes[first as usize - 1];
    let dev = victim.dir().join("chunks.dev");
    let deadline = Instant::now() + Duration::from_secs(10);
    let at = loop {
        if let Some(at) = find_in_file(&dev, marker) {
            break at;
        }
        assert!(
            Instant::now() < deadline,
            "the chunk never reached {}",
            dev.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let f = std::fs::OpenOptions::new().write(true).open(&dev).unwrap();
    f.write_all_at(b"X", at + 5).unwrap();
    f.sync_all().unwrap();
    drop(f);
    // Reads get the right bytes from another copy.
    let got = c.get(&[ch.id]).expect("get");
    assert!(
        got[0].as_deref() == Some(&data[..]),
        "read around the bad copy"
    );
    // The bad copy itself, asked for directly, is refused; a scrub removes it and repair
    // copies a good one back.
    let shard = (c.hive_map().bucket_of(&ch.id) % 2) as u16;
    let direct = |n: &TestNode| -> Option<Vec<u8>> {
        let mut conn = n.raw_conn(shard);
        let hello = Request::Hello {
            min_version: PROTOCOL_VERSION_MIN,
            max_version: PROTOCOL_VERSION_MAX,
            token: n.token(),
            client_name: "scrub-test".into(),
        };
        conn.send_request(PROTOCOL_VERSION_MIN, 1, &hello).unwrap();
        assert!(matches!(
            conn.recv_response().unwrap().1,
            Response::HelloOk { .. }
        ));
        conn.send_request(PROTOCOL_VERSION_MIN, 2, &Request::Get { id: ch.id })
            .unwrap();
        match conn.recv_response().unwrap().1 {
            Response::GetReply {
                chunk: Some((codec, raw_len, bytes)),
            } => hivefs_net::chunk::verify_owned(&key, &ch.id, codec, bytes, raw_len as usize).ok(),
            _ => None,
        }
    };
    assert!(direct(victim).is_none(), "the flipped copy was served");
    let t = Instant::now();
    assert!(victim.hive(&["scrub"]).status.success());
    loop {
        if direct(victim).as_deref() == Some(&data[..]) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the bad copy was not replaced within 60 s"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!(
        "scrub found the flipped copy and repair replaced it in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let status = victim.hive(&["status"]);
    let text = String::from_utf8_lossy(&status.stdout).to_string();
    let line = text
        .lines()
        .find(|l| l.starts_with("repair:"))
        .unwrap_or("");
    assert!(line.contains("1 bad (replaced)"), "{line}");
    eprintln!("{line}");
}

#[test]
fn a_drained_node_leaves_only_once_its_chunks_have_their_copies_elsewhere() {
    let mut nodes = three_nodes();
    let mut d = TestNode::join(opts("r4"), &mut nodes[0]);
    let mut c = nodes[0].client();
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.hive_map().nodes.len() < 4 {
        assert!(
            Instant::now() < deadline,
            "the fourth node is not in the map"
        );
        std::thread::sleep(Duration::from_millis(200));
        c.refresh_map();
    }
    let key = c.map().dedupe_key;
    let data = chunks(&key, 41, 400);
    c.put(&data).expect("put on 4 nodes");
    // Remove the fourth node (id 4: ids follow the join order) while reading and writing.
    let (stop, worker) = busy(nodes[1].client_options(), data.clone(), Some(1000));
    let t = Instant::now();
    let out = nodes[0].hive(&["node", "remove", "--id", "4"]);
    assert!(
        out.status.success(),
        "hive node remove failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "node drained and marked out in {:.1} s: {}",
        t.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&out.stderr)
            .trim()
            .rsplit('\r')
            .next()
            .unwrap_or("")
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = worker
        .join()
        .unwrap()
        .expect("reads and writes during the drain");
    eprintln!("{rounds} rounds of reads and writes went on during the drain without an error");
    // Three nodes left with 3 copies: each holds every chunk of the first batch; the
    // removed node can go.
    d.kill9();
    let total = 400 + 20 * rounds;
    for n in &nodes {
        until_count(
            &mut n.client(),
            total,
            Duration::from_secs(30),
            "after the removal",
        );
    }
    read_back(&mut c, &data, "after the removal");
    drop(d);
}
