//! Stored-bytes growth under edits, measured by the node (`hive status --json`).
//!
//! A file of N pseudo-random (incompressible) bytes is uploaded; then the same file with
//! one byte inserted at the front; then the original with 1% of its bytes rewritten in
//! E = 50 places. Content-defined chunking must confine the new chunks to the edits:
//! - after the insert: growth <= 2 * max_chunk + 2 * avg_chunk;
//! - after the 1% rewrite: new unique chunks <= E * (2 + L / avg_chunk) + 2, where L is
//!   one edit's length (so 2E + 2 while an edit is shorter than an average chunk, as at
//!   the default 64 MiB), and growth <= edited bytes + (2E + 2) * 2 * avg_chunk.
//!
//! N is `HIVE_DEDUPE_BYTES` (default 64 MiB; try 1 GiB by hand:
//! `HIVE_DEDUPE_BYTES=1073741824 cargo test --release -p hivefs-harness --test dedupe -- --nocapture`).

use hivefs_client::hive::HiveClient;
use hivefs_client::pipeline::{ChunkerConfig, Pipeline, PreparedChunk};
use hivefs_harness::{env_u64, NodeOptions, Rng, TestNode};
use hivefs_net::chunk::{ChunkId, Codec};
use std::collections::HashSet;
use std::time::Instant;

const EDITS: u64 = 50;

#[derive(Clone, Copy, Debug)]
struct Totals {
    chunks: u64,
    logical: u64,
    stored: u64,
    dedupe_ratio: f64,
}

fn totals(node: &TestNode) -> Totals {
    let t = &node.status_json()["total"];
    let u = |k: &str| {
        t[k].as_u64()
            .unwrap_or_else(|| panic!("total.{k} missing: {t}"))
    };
    Totals {
        chunks: u("chunks"),
        logical: u("logical_bytes"),
        stored: u("stored_bytes"),
        dedupe_ratio: t["dedupe_ratio"].as_f64().expect("dedupe_ratio"),
    }
}

fn upload(c: &mut HiveClient, p: &Pipeline, data: &[u8], what: &str) -> Vec<PreparedChunk> {
    let t = Instant::now();
    let chunks = p.prepare(data);
    let up = c
        .upload(&chunks)
        .unwrap_or_else(|e| panic!("{what}: upload: {e}"));
    assert_eq!(up.chunks, chunks.len() as u64);
    assert_eq!(up.raw_bytes, data.len() as u64);
    println!(
        "{what}: {} bytes -> {} chunks, {} uploaded, {} deduped, {} bytes sent, in {:?}",
        data.len(),
        up.chunks,
        up.uploaded,
        up.deduped,
        up.sent_bytes,
        t.elapsed()
    );
    chunks
}

fn mib(b: u64) -> String {
    format!("{:.3} MiB", b as f64 / (1u64 << 20) as f64)
}

#[test]
fn stored_bytes_grow_only_with_the_edits() {
    let n = env_u64("HIVE_DEDUPE_BYTES", 64 << 20) as usize;
    assert!(n >= 4 << 20, "HIVE_DEDUPE_BYTES must be at least 4 MiB");
    let size = format!("{}M", (3 * n as u64 / (1 << 20)).max(512) + 512);
    let node = TestNode::start(NodeOptions::default().shards(2).size(&size).name("dedupe"));
    let mut c = node.client();
    let cfg = ChunkerConfig::default();
    let (max_chunk, avg_chunk) = (cfg.max_bytes as u64, cfg.avg_bytes as u64);
    let p = Pipeline::new(c.map().dedupe_key, cfg, Codec::Lz4, 0).unwrap();
    let mut rng = Rng::new(0xded0_0be5);
    let base = rng.bytes(n);

    let t0 = totals(&node);
    assert_eq!(t0.chunks, 0);
    let c0 = upload(&mut c, &p, &base, "original");
    let t1 = totals(&node);
    let ids0: HashSet<ChunkId> = c0.iter().map(|c| c.id).collect();
    assert_eq!(t1.chunks, ids0.len() as u64);
    assert_eq!(
        t1.logical, n as u64,
        "random data: no repeats inside the file"
    );
    assert!(
        t1.stored >= n as u64 && t1.stored <= n as u64 + n as u64 / 100,
        "incompressible: stored {} vs {n}",
        t1.stored
    );

    // One byte inserted at the front.
    let mut ins = Vec::with_capacity(n + 1);
    ins.push(0xa5);
    ins.extend_from_slice(&base);
    let c1 = upload(&mut c, &p, &ins, "1 byte inserted");
    drop(ins);
    let t2 = totals(&node);
    let new1: HashSet<ChunkId> = c1
        .iter()
        .map(|c| c.id)
        .filter(|id| !ids0.contains(id))
        .collect();
    let growth1 = t2.stored - t1.stored;
    assert_eq!(
        t2.chunks - t1.chunks,
        new1.len() as u64,
        "the node's chunk count grows by the new ids"
    );
    let bound1 = 2 * max_chunk + 2 * avg_chunk;
    println!(
        "insert: {} new chunks, stored growth {growth1} bytes ({}) = {:.5}% of N; bound {bound1}",
        new1.len(),
        mib(growth1),
        100.0 * growth1 as f64 / n as f64
    );
    assert!(
        growth1 <= bound1,
        "insert at the front grew stored bytes by {growth1} > {bound1}"
    );
    drop(c1);

    // 1% of the bytes rewritten in EDITS places, one per stratum so none overlap.
    let mut edited = base.clone();
    let edit_len = (n as u64 / 100 / EDITS) as usize;
    let stratum = n / EDITS as usize;
    let mut edited_bytes = 0u64;
    for e in 0..EDITS as usize {
        let at = e * stratum + rng.below((stratum - edit_len) as u64) as usize;
        rng.fill(&mut edited[at..at + edit_len]);
        edited_bytes += edit_len as u64;
    }
    let c2 = upload(&mut c, &p, &edited, "1% rewritten");
    let t3 = totals(&node);
    let known: HashSet<ChunkId> = ids0.iter().chain(new1.iter()).copied().collect();
    let new2: HashSet<ChunkId> = c2
        .iter()
        .map(|c| c.id)
        .filter(|id| !known.contains(id))
        .collect();
    let growth2 = t3.stored - t2.stored;
    assert_eq!(t3.chunks - t2.chunks, new2.len() as u64);
    // Per edit: the chunks it covers (L / avg + 1 on average) and one more where the
    // boundaries resynchronise.
    let max_new = EDITS * (2 + edit_len as u64 / avg_chunk) + 2;
    let bound2 = edited_bytes + (2 * EDITS + 2) * 2 * avg_chunk;
    println!(
        "rewrite: {EDITS} edits of {edit_len} bytes = {edited_bytes} bytes ({}); {} new chunks (bound {max_new}), stored growth {growth2} bytes ({}) = {:.3}% of N, {:.2}x the edited bytes; bound {bound2}",
        mib(edited_bytes),
        new2.len(),
        mib(growth2),
        100.0 * growth2 as f64 / n as f64,
        growth2 as f64 / edited_bytes as f64
    );
    assert!(
        new2.len() as u64 <= max_new,
        "{} new chunks for {EDITS} edits",
        new2.len()
    );
    assert!(
        growth2 <= bound2,
        "1% rewrite grew stored bytes by {growth2} > {bound2}"
    );
    assert!(
        growth2 >= edited_bytes,
        "the edited bytes themselves must be new (growth {growth2} < {edited_bytes})"
    );

    // The edited version reads back whole and in order.
    let ids: Vec<ChunkId> = c2.iter().map(|c| c.id).collect();
    let t = Instant::now();
    let back: Vec<u8> = c
        .get(&ids)
        .unwrap()
        .into_iter()
        .map(|g| g.expect("chunk present"))
        .collect::<Vec<_>>()
        .concat();
    assert!(
        back == edited,
        "the edited file does not read back identically"
    );
    println!(
        "read back {} of the edited version, verified, in {:?}",
        mib(back.len() as u64),
        t.elapsed()
    );

    let offered = 3 * n as u64 + 1;
    println!(
        "dedupe summary: N = {n} ({}); 3 versions offered {} ; unique stored {} ({} chunks); stored/N = {:.4}; node dedupe_ratio {:.3}",
        mib(n as u64),
        mib(offered),
        mib(t3.stored),
        t3.chunks,
        t3.stored as f64 / n as f64,
        t3.dedupe_ratio
    );
    // Every byte of the three versions was offered once (a has hit or a put), and the
    // node's dedupe ratio is offered / unique logical bytes.
    let want = offered as f64 / t3.logical as f64;
    assert!(
        (t3.dedupe_ratio - want).abs() < 1e-9,
        "dedupe_ratio {} != {offered} / {} = {want}",
        t3.dedupe_ratio,
        t3.logical
    );
    assert_eq!(t3.stored, t1.stored + growth1 + growth2);
}
