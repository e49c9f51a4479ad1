//! Crash consistency under SIGKILL: a client streams puts of fresh chunks while the node is
//! killed with SIGKILL at a random moment; after a restart, every chunk whose put was
//! acknowledged (Stored or Duplicate), in this round or any earlier one, must be there and
//! read back verified. Same data directory across all rounds.
//!
//! Knobs: `HIVE_CRASH_ROUNDS` (default 20), `HIVE_CRASH_SEED` (default 0x5eed_c0de).

use hivefs_client::hive::{ClientError, HiveClient};
use hivefs_client::pipeline::{ChunkerConfig, Pipeline};
use hivefs_harness::{env_u64, NodeOptions, Rng, TestNode};
use hivefs_net::chunk::{ChunkId, Codec};
use hivefs_net::proto::{PutChunk, PutResult};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Random bytes per put call: with 4/16/64 KiB chunks, about 4 chunks a batch.
const BATCH_BYTES: usize = 64 << 10;
/// Earlier chunks re-read each round besides this round's.
const RESAMPLE: usize = 256;

struct Outcome {
    batches: u64,
    stored: u64,
    duplicate: u64,
    rejected: u64,
    wrong: Vec<String>,
    /// Why the stream stopped: the node went away under it.
    ended_with: ClientError,
}

/// Put fresh random chunks in small batches until the node goes away (a put fails),
/// pushing every acknowledged id to `acked`. Each batch also re-puts one chunk of the
/// previous batch, which must come back Duplicate.
fn stream(
    mut client: HiveClient,
    pipeline: Pipeline,
    seed: u64,
    acked: Arc<Mutex<Vec<ChunkId>>>,
) -> Outcome {
    let mut rng = Rng::new(seed);
    let (mut batches, mut stored, mut duplicate, mut rejected, mut wrong) =
        (0, 0, 0, 0, Vec::new());
    let mut again: Option<PutChunk> = None;
    loop {
        let data = rng.bytes(BATCH_BYTES);
        let mut puts: Vec<PutChunk> = pipeline
            .prepare(&data)
            .into_iter()
            .map(|c| PutChunk {
                id: c.id,
                codec: c.codec,
                raw_len: c.raw_len,
                data: c.stored,
            })
            .collect();
        let fresh = puts.len();
        let next_again = puts[0].clone();
        if let Some(a) = again.take() {
            puts.push(a);
        }
        match client.put(&puts) {
            Ok((results, _)) => {
                batches += 1;
                let mut ok = Vec::with_capacity(puts.len());
                for (i, (p, r)) in puts.iter().zip(&results).enumerate() {
                    match r {
                        PutResult::Stored => stored += 1,
                        PutResult::Duplicate => duplicate += 1,
                        PutResult::Rejected => rejected += 1,
                    }
                    let expect = if i < fresh {
                        PutResult::Stored
                    } else {
                        PutResult::Duplicate
                    };
                    if *r != expect {
                        wrong.push(format!("{:?}: {r:?}, expected {expect:?}", p.id));
                    }
                    if matches!(r, PutResult::Stored | PutResult::Duplicate) {
                        ok.push(p.id);
                    }
                }
                acked.lock().unwrap().extend(ok);
                again = Some(next_again);
            }
            Err(e) => {
                return Outcome {
                    batches,
                    stored,
                    duplicate,
                    rejected,
                    wrong,
                    ended_with: e,
                }
            }
        }
    }
}

/// Every id answers has = true; `read` come back and verify (HiveClient::get checks each
/// against its id). Returns the number read.
fn verify(node: &TestNode, all: &[ChunkId], read: &[ChunkId], what: &str) -> usize {
    let mut c = node.client();
    let (present, _) = c.has(all).unwrap_or_else(|e| panic!("{what}: has: {e}"));
    let missing: Vec<&ChunkId> = all
        .iter()
        .zip(&present)
        .filter(|(_, p)| !**p)
        .map(|(id, _)| id)
        .collect();
    assert!(
        missing.is_empty(),
        "{what}: {} of {} acknowledged chunks are missing after the crash, e.g. {:?}",
        missing.len(),
        all.len(),
        &missing[..missing.len().min(5)]
    );
    let got = c.get(read).unwrap_or_else(|e| panic!("{what}: get: {e}"));
    let absent = got.iter().filter(|g| g.is_none()).count();
    assert_eq!(
        absent,
        0,
        "{what}: get found {absent} of {} acknowledged chunks absent",
        read.len()
    );
    // Duplicates in the acked list count once in the node.
    let unique: HashSet<&ChunkId> = all.iter().collect();
    let stats = c.stats().expect("stats");
    let chunks: u64 = stats
        .iter()
        .map(|j| {
            serde_json::from_str::<serde_json::Value>(j).unwrap()["chunks"]
                .as_u64()
                .unwrap()
        })
        .sum();
    assert!(
        chunks >= unique.len() as u64,
        "{what}: node reports {chunks} chunks, fewer than the {} acknowledged",
        unique.len()
    );
    read.len()
}

#[test]
fn acknowledged_chunks_survive_kill9() {
    let rounds = env_u64("HIVE_CRASH_ROUNDS", 20);
    let seed = env_u64("HIVE_CRASH_SEED", 0x5eed_c0de);
    println!("crash_kill9: {rounds} rounds, seed {seed:#x} (HIVE_CRASH_SEED)");
    let t0 = Instant::now();
    let mut node = TestNode::start(NodeOptions::default().shards(2).size("2G").name("crash"));
    let key = node.client().map().dedupe_key;
    let cfg = ChunkerConfig {
        min_bytes: 4 << 10,
        avg_bytes: 16 << 10,
        max_bytes: 64 << 10,
    };
    let pipeline = Pipeline::new(key, cfg, Codec::Lz4, 1).unwrap();
    let mut rng = Rng::new(seed);
    let mut all: Vec<ChunkId> = Vec::new();
    let mut totals = (0u64, 0u64, 0u64); // batches, stored, duplicate
    for round in 0..rounds {
        let client = node.client();
        let acked = Arc::new(Mutex::new(Vec::new()));
        let delay = rng.range(20, 400);
        let th = {
            let (p, a) = (pipeline.clone(), acked.clone());
            let stream_seed = seed ^ (round + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            std::thread::spawn(move || stream(client, p, stream_seed, a))
        };
        std::thread::sleep(Duration::from_millis(delay));
        let st = node.kill9();
        let o = th.join().expect("client thread panicked");
        // The node vanished: the connection failed (or, for a call retried after the node
        // asked for it, the reconnect). Anything else (an Error reply, a protocol
        // violation) is a node bug.
        assert!(
            matches!(
                o.ended_with,
                ClientError::Conn { .. } | ClientError::Connect { .. }
            ),
            "round {round}: the stream ended with {} rather than a connection failure",
            o.ended_with
        );
        assert!(
            o.wrong.is_empty(),
            "round {round}: unexpected put results: {:?}",
            &o.wrong[..o.wrong.len().min(10)]
        );
        assert_eq!(o.rejected, 0);
        let this_round = std::mem::take(&mut *acked.lock().unwrap());
        all.extend_from_slice(&this_round);
        totals.0 += o.batches;
        totals.1 += o.stored;
        totals.2 += o.duplicate;

        let t = Instant::now();
        node.run();
        let restart = t.elapsed();
        // Everything acknowledged so far must answer has; this round's chunks and a sample
        // of earlier ones are read back (all of them once more at the end).
        let mut read = this_round.clone();
        let earlier = all.len() - this_round.len();
        for _ in 0..RESAMPLE.min(earlier) {
            read.push(all[rng.below(earlier as u64) as usize]);
        }
        let t = Instant::now();
        let n = verify(&node, &all, &read, &format!("round {round}"));
        println!(
            "round {round:2}: killed after {delay:3} ms ({st}); {:4} batches acked, {:5} chunks acked ({} stored, {} duplicate); total acked {:6}; restart {:?}, verified has {} + get {n} in {:?}; client ended: {}",
            o.batches,
            this_round.len(),
            o.stored,
            o.duplicate,
            all.len(),
            restart,
            all.len(),
            t.elapsed(),
            o.ended_with
        );
    }
    // A clean stop and start, then everything is read back.
    let st = node.stop();
    assert!(st.success(), "clean stop after {rounds} crashes: {st}");
    node.run();
    let t = Instant::now();
    let n = verify(&node, &all, &all, "final");
    let unique: HashSet<&ChunkId> = all.iter().collect();
    println!(
        "crash_kill9 total: {rounds} SIGKILLs, {} put batches acked, {} chunk acks ({} stored, {} duplicate), {} unique chunks; all {n} read back and verified in {:?}; test took {:?}",
        totals.0,
        all.len(),
        totals.1,
        totals.2,
        unique.len(),
        t.elapsed(),
        t0.elapsed()
    );
    assert!(
        !all.is_empty(),
        "no put was acknowledged in {rounds} rounds: the test proved nothing"
    );
    let status = node.status_json();
    println!("status total: {}", status["total"]);
}
