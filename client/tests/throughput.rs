//! A quick throughput look at the pipeline, run by hand:
//!
//! ```text
//! cargo test -p hivefs-client --release --test throughput -- --ignored --nocapture
//! ```
//!
//! Prints GB/s (10^9 bytes per second) for 256 MiB of pseudo-random and of text-like data,
//! for each stage alone on one thread and for the whole pipeline with 1 and 2 threads. The
//! perf crate owns real measurements; this only sanity-checks that the pipeline scales.

use std::hint::black_box;
use std::time::Instant;

use fastcdc::v2020;
use hivefs_client::pipeline::{ChunkerConfig, Pipeline};
use hivefs_net::chunk::{compress, ChunkId, Codec, DedupeKey};

const KEY: DedupeKey = DedupeKey([0x5a; 32]);
const LEN: usize = 256 << 20;

fn random_bytes(n: usize) -> Vec<u8> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    v
}

/// Random words from a small vocabulary: compresses about 3x with LZ4.
fn text_bytes(n: usize) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "hive",
        "chunk",
        "node",
        "bucket",
        "replica",
        "the",
        "of",
        "and",
        "deduplicate",
        "stored",
        "upload",
        "fastcdc",
        "blake3",
        "compress",
        "a",
        "is",
        "to",
        "in",
        "keyed",
        "boundary",
        "stream",
        "block",
        "\n",
    ];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut v = Vec::with_capacity(n + 16);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(WORDS[(x % WORDS.len() as u64) as usize].as_bytes());
        v.push(b' ');
    }
    v.truncate(n);
    v
}

/// Best of three runs, so a busy neighbour on the machine skews less.
fn gbps(bytes: usize, mut f: impl FnMut()) -> f64 {
    (0..3)
        .map(|_| {
            let t = Instant::now();
            f();
            bytes as f64 / t.elapsed().as_secs_f64() / 1e9
        })
        .fold(0.0, f64::max)
}

#[test]
#[ignore = "throughput measurement, run by hand with --ignored --nocapture"]
fn throughput() {
    let cfg = ChunkerConfig::default();
    for (name, data) in [("random", random_bytes(LEN)), ("text", text_bytes(LEN))] {
        let cuts: Vec<_> =
            v2020::FastCDC::new(&data, cfg.min_bytes, cfg.avg_bytes, cfg.max_bytes).collect();
        let cut = gbps(LEN, || {
            black_box(
                v2020::FastCDC::new(&data, cfg.min_bytes, cfg.avg_bytes, cfg.max_bytes).count(),
            );
        });
        let hash = gbps(LEN, || {
            for c in &cuts {
                black_box(ChunkId::compute(&KEY, &data[c.offset..c.offset + c.length]));
            }
        });
        let mut stored = 0;
        let lz4 = gbps(LEN, || {
            stored = 0;
            for c in &cuts {
                stored += compress(Codec::Lz4, &data[c.offset..c.offset + c.length])
                    .1
                    .len();
            }
        });
        println!(
            "{name}: {} chunks, lz4 stores {:.0}%; one thread: cut {cut:.2} GB/s, hash {hash:.2} GB/s, compress {lz4:.2} GB/s",
            cuts.len(),
            100.0 * stored as f64 / LEN as f64
        );
        for threads in [1, 2] {
            let p = Pipeline::new(KEY, cfg, Codec::Lz4, threads).unwrap();
            let mut n = 0;
            let in_memory = gbps(LEN, || n = p.prepare(&data).len());
            assert_eq!(n, cuts.len());
            let with_sink = gbps(LEN, || {
                n = 0;
                p.prepare_with(&data, |c| {
                    n += 1;
                    black_box(c);
                    Ok::<(), ()>(())
                })
                .unwrap();
            });
            assert_eq!(n, cuts.len());
            let streamed = gbps(LEN, || {
                n = 0;
                p.prepare_reader(&data[..], |c| {
                    n += 1;
                    black_box(c);
                    Ok::<(), ()>(())
                })
                .unwrap();
            });
            assert_eq!(n, cuts.len());
            println!(
                "{name}: pipeline threads={threads}: prepare (collect) {in_memory:.2} GB/s, \
                 prepare_with {with_sink:.2} GB/s, prepare_reader {streamed:.2} GB/s"
            );
        }
    }
}
