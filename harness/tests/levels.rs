//! Per-volume replication levels across real node processes: a chunk is kept at the most
//! copies any volume referencing it asks for (`has(id, level)` answers no below that, and
//! a put at a higher level raises the chunk on every replica).
//!
//! Oracle: the chunk counts every node reports (with 3 nodes, a chunk at level L is held
//! by exactly L of them), `has` at each level, reads of every chunk verified against its
//! id, and `hive fsck` (copies per chunk from the volumes referencing it).

use hivefs_client::hive::HiveClient;
use hivefs_harness::cluster::{chunk_count, three_nodes_sized};
use hivefs_harness::mount::{ensure_volume_with, hi_hive_args, TestMount};
use hivefs_harness::{hi_bin, raw_chunk, NodeOptions, TestNode};
use hivefs_net::proto::{PutChunk, PutResult};
use hivefs_nvme::rng::SplitMix64;
use std::time::{Duration, Instant};

/// `n` distinct raw chunks (4-12 KiB, from `seed`).
fn chunks(c: &HiveClient, seed: u64, n: usize) -> Vec<PutChunk> {
    let key = c.map().dedupe_key;
    let mut rng = SplitMix64::new(seed);
    (0..n)
        .map(|i| raw_chunk(&key, rng.bytes(4096 + (i * 37) % 8192)))
        .collect()
}

/// Wait until the nodes together hold `want` chunk copies; panics after 20 s.
fn until_total(nodes: &[TestNode], want: u64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let counts: Vec<u64> = nodes.iter().map(chunk_count).collect();
        let total: u64 = counts.iter().sum();
        if total == want {
            eprintln!("{what}: {total} copies over the nodes {counts:?}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the nodes hold {counts:?} = {total} copies, want {want}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn put_at(c: &mut HiveClient, level: u8, chunks: &[PutChunk]) -> Vec<PutResult> {
    c.set_level(level);
    let (results, _) = c
        .put(chunks)
        .unwrap_or_else(|e| panic!("put at level {level}: {e}"));
    results
}

fn has_at(c: &mut HiveClient, level: u8, chunks: &[PutChunk]) -> Vec<bool> {
    c.set_level(level);
    let ids: Vec<_> = chunks.iter().map(|c| c.id).collect();
    c.has(&ids).expect("has").0
}

#[test]
fn each_level_keeps_its_copies_and_a_higher_level_raises_a_shared_chunk() {
    let nodes = three_nodes_sized("512M");
    let mut c = nodes[0].client();
    let one = chunks(&c, 1, 200);
    let two = chunks(&c, 2, 200);
    // Level 1: one copy each (on the bucket's primary); level 2: two.
    assert!(put_at(&mut c, 1, &one)
        .iter()
        .all(|r| *r == PutResult::Stored));
    until_total(&nodes, 200, "200 chunks at level 1");
    assert!(put_at(&mut c, 2, &two)
        .iter()
        .all(|r| *r == PutResult::Stored));
    until_total(&nodes, 200 + 400, "and 200 at level 2");
    // Below its level a chunk answers has; above, it does not (its put raises it).
    assert!(has_at(&mut c, 1, &two).iter().all(|p| *p));
    assert!(has_at(&mut c, 2, &two).iter().all(|p| *p));
    assert!(has_at(&mut c, 3, &two).iter().all(|p| !*p));
    assert!(has_at(&mut c, 2, &one).iter().all(|p| !*p));
    // A volume of 3 copies writes the same chunks: stored again at level 3, on all three
    // nodes (the earlier copies are raised, the missing ones made).
    let t = Instant::now();
    assert!(put_at(&mut c, 3, &one)
        .iter()
        .all(|r| *r == PutResult::Stored));
    assert!(put_at(&mut c, 3, &two)
        .iter()
        .all(|r| *r == PutResult::Stored));
    eprintln!("400 chunks raised to level 3 in {:?}", t.elapsed());
    until_total(&nodes, 1200, "all 400 raised to level 3");
    for (i, n) in nodes.iter().enumerate() {
        let mut nc = n.client();
        assert!(
            has_at(&mut nc, 3, &one).iter().all(|p| *p),
            "node {i}: level 3 everywhere"
        );
        assert!(
            put_at(&mut nc, 2, &two)
                .iter()
                .all(|r| *r == PutResult::Duplicate),
            "a lower level is a duplicate"
        );
    }
    // Every copy reads back: each node is asked first in turn.
    for n in &nodes {
        let mut nc = n.client();
        let ids: Vec<_> = one.iter().map(|c| c.id).collect();
        let got = nc.get(&ids).expect("get");
        for (w, g) in one.iter().zip(got) {
            assert!(
                g.as_deref() == Some(&w.data[..]),
                "chunk {} read back",
                w.id
            );
        }
    }
    // The level survives a restart of every node (it is in the record headers).
    let mut nodes = nodes;
    for n in nodes.iter_mut() {
        n.restart();
    }
    let mut c = nodes[0].client();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if has_at(&mut c, 3, &one).iter().all(|p| *p) {
            break;
        }
        assert!(Instant::now() < deadline, "level 3 lost at the restart");
        std::thread::sleep(Duration::from_millis(200));
        c = nodes[0].client();
    }
    until_total(&nodes, 1200, "after restarting every node");
}

#[test]
fn volumes_of_one_and_three_copies_sharing_a_file() {
    let nodes = three_nodes_sized("512M");
    ensure_volume_with(&nodes[0], "one", 1);
    ensure_volume_with(&nodes[0], "three", 3);
    let Some(m1) = TestMount::start_or_skip(&nodes[0], "one") else {
        return;
    };
    let Some(m3) = TestMount::start_or_skip(&nodes[1], "three") else {
        return;
    };
    let bytes = SplitMix64::new(7).bytes(6 << 20);
    std::fs::write(m1.join("f"), &bytes).expect("write in volume one");
    let chunks = chunk_count(&nodes[0]) + chunk_count(&nodes[1]) + chunk_count(&nodes[2]);
    assert!(chunks > 10, "6 MiB in {chunks} chunks");
    eprintln!("volume one (copies 1): 6 MiB in {chunks} chunks, one copy each");
    let fsck = |n: &TestNode| {
        let out = n.hive(&["fsck"]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        (out.status.success(), text)
    };
    let (ok, text) = fsck(&nodes[0]);
    assert!(ok && text.contains("under-replicated 0"), "{text}");
    // The same bytes in the volume of 3 copies: every chunk now has 3.
    std::fs::write(m3.join("g"), &bytes).expect("write in volume three");
    until_total(&nodes, 3 * chunks, "the shared file at 3 copies");
    let (ok, text) = fsck(&nodes[2]);
    assert!(
        ok && text.contains("under-replicated 0") && text.contains("copies 3"),
        "{text}"
    );
    eprintln!("fsck: {}", text.lines().next().unwrap_or(""));
    assert_eq!(std::fs::read(m1.join("f")).expect("read f"), bytes);
    assert_eq!(std::fs::read(m3.join("g")).expect("read g"), bytes);
    drop((m1, m3));
}

/// `hi volume create` without `--copies` takes the hive's default (3: a one-node hive
/// keeps one copy per node and says so), with `--copies` its own; 0 and 9 are refused.
#[test]
fn hi_volume_create_takes_the_hive_default_copies() {
    let node = TestNode::start(NodeOptions::default().name("lv"));
    let hi = |args: &[&str]| {
        let out = std::process::Command::new(hi_bin())
            .arg("volume")
            .args(args.iter().take(1))
            .args(hi_hive_args(&node))
            .args(args.iter().skip(1))
            .output()
            .expect("running hi");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, text) = hi(&["create", "plain"]);
    assert!(ok && text.contains("copies 3"), "{text}");
    let (ok, text) = hi(&["create", "mirror", "--copies", "2"]);
    assert!(ok && text.contains("copies 2"), "{text}");
    let (ok, text) = hi(&["create", "scratch", "--copies", "1"]);
    assert!(ok && text.contains("ONE copy"), "{text}");
    for bad in ["0", "9"] {
        let (ok, text) = hi(&["create", "bad", "--copies", bad]);
        assert!(!ok, "--copies {bad}: {text}");
    }
    let (ok, text) = hi(&["list"]);
    assert!(ok, "{text}");
    for (name, copies) in [("plain", 3), ("mirror", 2), ("scratch", 1)] {
        let line = text.lines().find(|l| l.starts_with(&format!("{name}\t")));
        assert!(
            line.is_some_and(|l| l.ends_with(&format!("\tcopies {copies}"))),
            "{name} in {text}"
        );
    }
}
