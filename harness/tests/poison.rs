//! Poisoning: a client offering bytes that do not hash to the id it claims must never get
//! them stored under that id, nor displace the genuine chunk.

use hivefs_harness::{NodeOptions, Rng, TestNode};
use hivefs_net::chunk::{compress, ChunkId, Codec};
use hivefs_net::proto::{PutChunk, PutResult};

fn raw(id: ChunkId, data: &[u8]) -> PutChunk {
    PutChunk {
        id,
        codec: Codec::Raw,
        raw_len: data.len() as u32,
        data: data.to_vec(),
    }
}

#[test]
fn poisoned_puts_are_rejected_and_genuine_chunks_survive() {
    let mut node = TestNode::start(NodeOptions::default().shards(2).name("poison"));
    let mut c = node.client();
    let key = c.map().dedupe_key;
    let mut rng = Rng::new(0x9015_0000);
    let mut rejected = 0u64;

    // 1. Garbage under a valid-looking id: a real chunk's id with one byte changed.
    let a = rng.bytes(50_000);
    let id_a = ChunkId::compute(&key, &a);
    let mut id_a2 = id_a;
    id_a2.0[32] ^= 0x01;
    let garbage = rng.bytes(50_000);
    let (r, _) = c.put(&[raw(id_a2, &garbage)]).unwrap();
    assert_eq!(r, vec![PutResult::Rejected], "garbage under a made-up id");
    rejected += 1;
    assert_eq!(c.has(&[id_a2]).unwrap().0, vec![false]);
    assert_eq!(c.get(&[id_a2]).unwrap(), vec![None]);
    assert_eq!(c.get_stored(&[id_a2]).unwrap(), vec![None]);

    // 2. Wrong bytes under the id of a chunk never stored (one bit flipped).
    let b = rng.bytes(40_000);
    let id_b = ChunkId::compute(&key, &b);
    let mut b_bad = b.clone();
    b_bad[12_345] ^= 0x10;
    let (r, _) = c.put(&[raw(id_b, &b_bad)]).unwrap();
    assert_eq!(
        r,
        vec![PutResult::Rejected],
        "wrong bytes under a real, unstored id"
    );
    rejected += 1;
    assert_eq!(c.has(&[id_b]).unwrap().0, vec![false]);
    assert_eq!(c.get(&[id_b]).unwrap(), vec![None]);
    // The rejection left nothing behind: the genuine bytes are then stored normally.
    assert_eq!(c.put(&[raw(id_b, &b)]).unwrap().0, vec![PutResult::Stored]);
    assert_eq!(c.get(&[id_b]).unwrap(), vec![Some(b.clone())]);

    // 3. Wrong bytes under the id of a chunk already stored: not Stored (Duplicate), and the
    //    node keeps serving the genuine bytes.
    assert_eq!(c.put(&[raw(id_a, &a)]).unwrap().0, vec![PutResult::Stored]);
    let (r, _) = c.put(&[raw(id_a, &garbage)]).unwrap();
    assert_eq!(
        r,
        vec![PutResult::Duplicate],
        "wrong bytes under a stored id"
    );
    let (r, _) = c
        .put(&[PutChunk {
            id: id_a,
            codec: Codec::Raw,
            raw_len: 10,
            data: vec![0; 10],
        }])
        .unwrap();
    assert_eq!(
        r,
        vec![PutResult::Duplicate],
        "short bytes under a stored id"
    );
    assert_eq!(c.has(&[id_a]).unwrap().0, vec![true]);
    assert_eq!(
        c.get(&[id_a]).unwrap(),
        vec![Some(a.clone())],
        "genuine bytes, verified by the client"
    );

    // 4. Lies about the encoding: compressed bytes labelled raw, garbage labelled LZ4, the
    //    right bytes with a wrong raw length.
    let text = b"the hive keeps what hashes right; ".repeat(2000);
    let id_t = ChunkId::compute(&key, &text);
    let (codec, packed) = compress(Codec::Lz4, &text);
    assert_eq!(codec, Codec::Lz4, "test data must compress");
    let lies = vec![
        PutChunk {
            id: id_t,
            codec: Codec::Raw,
            raw_len: text.len() as u32,
            data: packed.clone(),
        },
        PutChunk {
            id: id_t,
            codec: Codec::Lz4,
            raw_len: text.len() as u32,
            data: rng.bytes(packed.len()),
        },
        PutChunk {
            id: id_t,
            codec: Codec::Raw,
            raw_len: text.len() as u32 + 1,
            data: text.clone(),
        },
    ];
    let (r, _) = c.put(&lies).unwrap();
    assert_eq!(r, vec![PutResult::Rejected; 3], "encoding lies");
    rejected += 3;
    assert_eq!(c.has(&[id_t]).unwrap().0, vec![false]);

    // 5. A poisoned chunk in the middle of a batch fails alone.
    let g1 = rng.bytes(20_000);
    let g2 = rng.bytes(20_000);
    let p = rng.bytes(20_000);
    let id_p = ChunkId::compute(&key, &rng.bytes(20_000));
    let batch = vec![
        raw(ChunkId::compute(&key, &g1), &g1),
        raw(id_p, &p),
        raw(ChunkId::compute(&key, &g2), &g2),
        PutChunk {
            id: id_t,
            codec,
            raw_len: text.len() as u32,
            data: packed,
        },
    ];
    let (r, _) = c.put(&batch).unwrap();
    assert_eq!(
        r,
        vec![
            PutResult::Stored,
            PutResult::Rejected,
            PutResult::Stored,
            PutResult::Stored
        ]
    );
    rejected += 1;
    assert_eq!(c.get(&[id_t]).unwrap(), vec![Some(text.clone())]);
    assert_eq!(c.has(&[id_p]).unwrap().0, vec![false]);

    // `hive status --json` counts every rejection, and nothing else.
    let st = node.status_json();
    println!("status after poisoning: {}", st["total"]);
    assert_eq!(
        st["total"]["puts_rejected"].as_u64(),
        Some(rejected),
        "total.puts_rejected"
    );
    let per_shard: u64 = st["shards"]
        .as_array()
        .expect("shards array")
        .iter()
        .map(|s| {
            s["puts_rejected"]
                .as_u64()
                .expect("per-shard puts_rejected")
        })
        .sum();
    assert_eq!(per_shard, rejected, "per-shard puts_rejected add up");
    assert_eq!(
        st["total"]["chunks"].as_u64(),
        Some(5),
        "a, b, text, g1, g2"
    );
    assert_eq!(st["total"]["gets_corrupt"].as_u64(), Some(0));
    let warned = node
        .log()
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("put rejected"))
        .count() as u64;
    assert_eq!(warned, rejected, "one warning per rejected put");

    // After a crash and restart nothing poisoned has appeared, and the genuine bytes stand.
    drop(c);
    node.kill9();
    node.run();
    let mut c = node.client();
    assert_eq!(
        c.has(&[id_a2, id_b, id_a, id_t, id_p]).unwrap().0,
        vec![false, true, true, true, false]
    );
    assert_eq!(
        c.get(&[id_a, id_b, id_a2]).unwrap(),
        vec![Some(a), Some(b), None]
    );
    println!("poison: {rejected} poisoned puts rejected, 2 wrong-bytes puts under stored ids answered Duplicate, genuine chunks intact after kill -9");
}

/// The streaming put counts what the shards did, rejects garbage as the plain put does,
/// and leaves exactly the genuine chunks readable.
#[test]
fn streamed_puts_store_count_and_reject() {
    let node = TestNode::start(NodeOptions::default().shards(2).name("put-stream"));
    let mut c = node.client();
    let key = c.map().dedupe_key;
    let mut rng = Rng::new(0x5743_0001);
    let mut chunks = Vec::new();
    for _ in 0..300 {
        let len = 20_000 + rng.below(40_000) as usize;
        let d = rng.bytes(len);
        chunks.push(raw(ChunkId::compute(&key, &d), &d));
    }
    // Every tenth chunk goes first in a call of its own; the rest follow in calls of 17,
    // so the streamed calls overlap the duplicates.
    let first: Vec<PutChunk> = chunks.iter().step_by(10).cloned().collect();
    assert_eq!(c.put_stream([first.as_slice()]).unwrap().stored, 30);
    let mut poisoned = chunks[5].clone();
    poisoned.id.0[32] ^= 0x01;
    let mut all = chunks.clone();
    all.push(poisoned.clone());
    let st = c.put_stream(all.chunks(17)).unwrap();
    assert_eq!(st.stored, 270, "unique chunks stored");
    assert_eq!(st.duplicate, 30, "chunks stored by the first stream");
    assert_eq!(st.rejected, vec![poisoned.id]);
    assert!(!st.request_latency.is_empty());
    let ids: Vec<ChunkId> = chunks.iter().map(|c| c.id).collect();
    assert!(c.has(&ids).unwrap().0.iter().all(|p| *p));
    assert_eq!(c.has(&[poisoned.id]).unwrap().0, vec![false]);
    let got = c.get(&ids).unwrap();
    for (g, want) in got.iter().zip(&chunks) {
        assert_eq!(g.as_deref(), Some(want.data.as_slice()));
    }
    node.fsck(true);
}
