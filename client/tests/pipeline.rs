//! Behaviour of the chunking pipeline: exact tiling, ids, encodings, boundaries independent
//! of block size and thread count, and the dedupe it exists for.

use std::collections::HashSet;
use std::io::{self, Read};

use fastcdc::v2020;
use hivefs_client::pipeline::{ChunkerConfig, ConfigError, Pipeline, PipelineError, PreparedChunk};
use hivefs_net::chunk::{verify, ChunkId, Codec, DedupeKey, MAX_CHUNK_RAW_BYTES};

const KEY: DedupeKey = DedupeKey([0x5a; 32]);

/// Small chunks so a few MiB gives hundreds of them.
const SMALL: ChunkerConfig = ChunkerConfig {
    min_bytes: 2048,
    avg_bytes: 8192,
    max_bytes: 32768,
};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for block in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            block.copy_from_slice(&v[..block.len()]);
        }
    }
}

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0; n];
    Rng(seed).fill(&mut v);
    v
}

/// Text-like bytes: random words from a small vocabulary (compresses well, still chunks).
fn text_bytes(n: usize, seed: u64) -> Vec<u8> {
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
    let mut rng = Rng(seed);
    let mut v = Vec::with_capacity(n + 16);
    while v.len() < n {
        v.extend_from_slice(WORDS[rng.below(WORDS.len())].as_bytes());
        v.push(b' ');
    }
    v.truncate(n);
    v
}

/// Random, text and zero runs (zeros force max-size cuts) back to back.
fn mixed_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        let len = (1 + rng.below(200_000)).min(n - v.len());
        match rng.below(3) {
            0 => v.extend(random_bytes(len, rng.next())),
            1 => v.extend(text_bytes(len, rng.next())),
            _ => v.resize(v.len() + len, 0),
        }
    }
    v
}

fn pipeline(cfg: ChunkerConfig, codec: Codec, threads: usize) -> Pipeline {
    Pipeline::new(KEY, cfg, codec, threads).unwrap()
}

/// Boundaries of one FastCDC 2020 pass over the whole input: the reference.
fn reference_cuts(data: &[u8], cfg: ChunkerConfig) -> Vec<(u64, u32)> {
    v2020::FastCDC::new(data, cfg.min_bytes, cfg.avg_bytes, cfg.max_bytes)
        .map(|c| (c.offset as u64, c.length as u32))
        .collect()
}

fn cuts(chunks: &[PreparedChunk]) -> Vec<(u64, u32)> {
    chunks.iter().map(|c| (c.offset, c.raw_len)).collect()
}

fn stream(p: &Pipeline, reader: impl Read) -> (u64, Vec<PreparedChunk>) {
    let mut out = Vec::new();
    let total = p
        .prepare_reader(reader, |c| {
            out.push(c);
            Ok::<(), ()>(())
        })
        .unwrap();
    (total, out)
}

/// Everything a correct output must satisfy, checked against the input bytes.
fn check_chunks(data: &[u8], chunks: &[PreparedChunk], cfg: ChunkerConfig) {
    let mut expect_offset = 0u64;
    for (i, c) in chunks.iter().enumerate() {
        assert_eq!(
            c.offset,
            expect_offset,
            "chunk {i} does not start where chunk {} ended",
            i.wrapping_sub(1)
        );
        let plain = &data[c.offset as usize..(c.offset + c.raw_len as u64) as usize];
        assert_eq!(c.id, ChunkId::compute(&KEY, plain), "chunk {i} id");
        let back = verify(&KEY, &c.id, c.codec, &c.stored, c.raw_len as usize)
            .unwrap_or_else(|e| panic!("chunk {i} does not verify: {e}"));
        assert_eq!(back, plain, "chunk {i} does not decode to its bytes");
        let last = i + 1 == chunks.len();
        assert!(
            c.raw_len <= cfg.max_bytes,
            "chunk {i} has {} bytes > max",
            c.raw_len
        );
        assert!(c.raw_len > 0, "chunk {i} is empty");
        if !last {
            assert!(
                c.raw_len >= cfg.min_bytes,
                "chunk {i} has {} bytes < min",
                c.raw_len
            );
        }
        expect_offset += c.raw_len as u64;
    }
    assert_eq!(
        expect_offset,
        data.len() as u64,
        "chunks do not cover the input"
    );
}

#[test]
fn config_defaults_and_validation() {
    let d = ChunkerConfig::default();
    assert_eq!(
        (d.min_bytes, d.avg_bytes, d.max_bytes),
        (16 << 10, 64 << 10, 256 << 10)
    );
    assert_eq!(d.validate(), Ok(()));
    assert_eq!(SMALL.validate(), Ok(()));

    let cfg = |min, avg, max| ChunkerConfig {
        min_bytes: min,
        avg_bytes: avg,
        max_bytes: max,
    };
    assert_eq!(
        cfg(4096, 4096, 8192).validate(),
        Err(ConfigError::NotIncreasing {
            min: 4096,
            avg: 4096,
            max: 8192
        })
    );
    assert!(matches!(
        cfg(8192, 4096, 16384).validate(),
        Err(ConfigError::NotIncreasing { .. })
    ));
    assert!(matches!(
        cfg(1024, 65536, 32768).validate(),
        Err(ConfigError::NotIncreasing { .. })
    ));
    assert!(matches!(
        cfg(32, 4096, 8192).validate(),
        Err(ConfigError::OutOfRange {
            field: "min_bytes",
            ..
        })
    ));
    assert!(matches!(
        cfg(64, 128, 8192).validate(),
        Err(ConfigError::OutOfRange {
            field: "avg_bytes",
            ..
        })
    ));
    assert!(matches!(
        cfg(64, 256, 512).validate(),
        Err(ConfigError::OutOfRange {
            field: "max_bytes",
            ..
        })
    ));
    let too_big = MAX_CHUNK_RAW_BYTES as u32 + 2;
    assert_eq!(
        cfg(16384, 65536, too_big).validate(),
        Err(ConfigError::OutOfRange {
            field: "max_bytes",
            value: too_big,
            lo: 1024,
            hi: MAX_CHUNK_RAW_BYTES as u32
        })
    );
    assert_eq!(
        cfg(16384, 65536, MAX_CHUNK_RAW_BYTES as u32).validate(),
        Ok(())
    );
    assert_eq!(
        cfg(2049, 8192, 32768).validate(),
        Err(ConfigError::OddMinimum(2049))
    );

    let err = Pipeline::new(KEY, cfg(8192, 4096, 16384), Codec::Lz4, 1).unwrap_err();
    assert!(err.to_string().contains("min < avg < max"), "{err}");
    assert!(
        Pipeline::new(KEY, cfg(16384, 65536, too_big), Codec::Lz4, 1)
            .unwrap_err()
            .to_string()
            .contains("max_bytes")
    );
    assert!(pipeline(d, Codec::Lz4, 0).threads() >= 1);
}

#[test]
fn chunks_tile_the_input_hash_and_verify() {
    let inputs = [
        ("random", random_bytes(3 << 20, 1)),
        ("text", text_bytes(3 << 20, 2)),
        ("zeros", vec![0u8; (3 << 20) + 777]),
        ("mixed", mixed_bytes(3 << 20, 3)),
    ];
    for (name, data) in &inputs {
        let reference = reference_cuts(data, SMALL);
        assert!(
            reference.len() > 90,
            "{name}: only {} chunks",
            reference.len()
        );
        for codec in [Codec::Raw, Codec::Lz4, Codec::Zstd] {
            for threads in [1, 3] {
                let chunks = pipeline(SMALL, codec, threads).prepare(data);
                check_chunks(data, &chunks, SMALL);
                assert_eq!(
                    cuts(&chunks),
                    reference,
                    "{name} {codec:?} threads={threads}: not FastCDC's boundaries"
                );
            }
        }
    }
}

#[test]
fn default_config_chunk_sizes() {
    let data = random_bytes(8 << 20, 4);
    let cfg = ChunkerConfig::default();
    let chunks = pipeline(cfg, Codec::Lz4, 2).prepare(&data);
    check_chunks(&data, &chunks, cfg);
    assert_eq!(cuts(&chunks), reference_cuts(&data, cfg));
    let mean = data.len() / chunks.len();
    assert!(
        (32 << 10..=128 << 10).contains(&mean),
        "mean chunk size {mean}"
    );
}

#[test]
fn codecs_are_used_only_when_they_pay() {
    let text = text_bytes(1 << 20, 5);
    let random = random_bytes(1 << 20, 6);
    for codec in [Codec::Lz4, Codec::Zstd] {
        let chunks = pipeline(SMALL, codec, 1).prepare(&text);
        assert!(
            chunks.iter().all(|c| c.codec == codec),
            "{codec:?} not used on text"
        );
        let stored: usize = chunks.iter().map(|c| c.stored.len()).sum();
        assert!(
            stored < text.len() / 2,
            "{codec:?} stored {stored} of {}",
            text.len()
        );

        let chunks = pipeline(SMALL, codec, 1).prepare(&random);
        assert!(
            chunks.iter().all(|c| c.codec == Codec::Raw),
            "{codec:?} kept on random data"
        );
        assert!(chunks.iter().all(|c| c.stored.len() == c.raw_len as usize));
    }
    let chunks = pipeline(SMALL, Codec::Raw, 1).prepare(&text);
    assert!(chunks
        .iter()
        .all(|c| c.codec == Codec::Raw && c.stored.len() == c.raw_len as usize));
}

#[test]
fn empty_and_tiny_inputs() {
    for threads in [1, 4] {
        let p = pipeline(SMALL, Codec::Lz4, threads);
        assert!(p.prepare(&[]).is_empty());
        assert_eq!(stream(&p, io::empty()), (0, vec![]));
        let max = SMALL.max_bytes as usize;
        for n in [
            1,
            SMALL.min_bytes as usize - 1,
            SMALL.min_bytes as usize,
            max,
            max + 1,
            3 * max + 5,
        ] {
            let data = random_bytes(n, n as u64);
            let chunks = p.prepare(&data);
            check_chunks(&data, &chunks, SMALL);
            assert_eq!(cuts(&chunks), reference_cuts(&data, SMALL), "n={n}");
            assert_eq!(stream(&p, &data[..]), (n as u64, chunks), "n={n}");
        }
        let zeros = vec![0u8; 3 * max + 5];
        assert_eq!(
            cuts(&p.prepare(&zeros)),
            vec![(0, 32768), (32768, 32768), (65536, 32768), (98304, 5)]
        );
    }
}

/// Hands out the input in random short pieces, with an occasional `Interrupted`.
struct Trickle<'a> {
    data: &'a [u8],
    rng: Rng,
    max_read: usize,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.rng.below(50) == 0 {
            return Err(io::ErrorKind::Interrupted.into());
        }
        let n = (1 + self.rng.below(self.max_read))
            .min(buf.len())
            .min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

#[test]
fn streaming_matches_one_pass_for_any_block_size() {
    let data = mixed_bytes(5 << 20, 7);
    let whole = pipeline(SMALL, Codec::Lz4, 1).prepare(&data);
    check_chunks(&data, &whole, SMALL);
    assert_eq!(cuts(&whole), reference_cuts(&data, SMALL));
    let max = SMALL.max_bytes as usize;
    let blocks = [
        1,
        max,
        max + 1,
        2 * max - 3,
        100_003,
        (1 << 20) + 7,
        8 << 20,
    ];
    for threads in [1, 4] {
        for block in blocks {
            let p = pipeline(SMALL, Codec::Lz4, threads).with_block_bytes(block);
            let (total, chunks) = stream(&p, &data[..]);
            assert_eq!(total, data.len() as u64);
            assert!(
                chunks == whole,
                "threads={threads} block={block}: streamed chunks differ"
            );
            let trickle = Trickle {
                data: &data,
                rng: Rng(block as u64),
                max_read: 3 * max,
            };
            let (total, chunks) = stream(&p, trickle);
            assert_eq!(total, data.len() as u64);
            assert!(
                chunks == whole,
                "threads={threads} block={block}: trickled chunks differ"
            );
        }
    }
}

#[test]
fn thread_count_does_not_change_the_output() {
    let data = mixed_bytes(8 << 20, 8);
    for cfg in [SMALL, ChunkerConfig::default()] {
        let one = pipeline(cfg, Codec::Lz4, 1).prepare(&data);
        check_chunks(&data, &one, cfg);
        for threads in [2, 4] {
            let p = pipeline(cfg, Codec::Lz4, threads).with_block_bytes(1 << 20);
            assert!(
                p.prepare(&data) == one,
                "prepare with {threads} threads differs"
            );
            assert!(
                stream(&p, &data[..]).1 == one,
                "prepare_reader with {threads} threads differs"
            );
            let mut with = Vec::new();
            p.prepare_with(&data, |c| {
                with.push(c);
                Ok::<(), ()>(())
            })
            .unwrap();
            assert!(with == one, "prepare_with with {threads} threads differs");
        }
    }
}

fn new_ids(before: &[PreparedChunk], after: &[PreparedChunk]) -> usize {
    let known: HashSet<ChunkId> = before.iter().map(|c| c.id).collect();
    after.iter().filter(|c| !known.contains(&c.id)).count()
}

#[test]
fn one_byte_inserted_at_the_front_changes_few_chunks() {
    let p = pipeline(ChunkerConfig::default(), Codec::Lz4, 2);
    for seed in [10, 11, 12] {
        let data = random_bytes(8 << 20, seed);
        let before = p.prepare(&data);
        assert!(before.len() > 64, "only {} chunks", before.len());
        let mut edited = Vec::with_capacity(data.len() + 1);
        edited.push(0xa5);
        edited.extend_from_slice(&data);
        let after = p.prepare(&edited);
        check_chunks(&edited, &after, p.config());
        let fresh = new_ids(&before, &after);
        assert!(
            fresh <= 3,
            "seed {seed}: {fresh} of {} chunks are new after a 1-byte insert",
            after.len()
        );
    }
}

#[test]
fn scattered_edits_change_few_chunks_each() {
    let p = pipeline(ChunkerConfig::default(), Codec::Lz4, 2);
    for seed in [20, 21, 22] {
        let data = random_bytes(8 << 20, seed);
        let before = p.prepare(&data);
        let mut edited = data.clone();
        let mut rng = Rng(seed * 1000);
        let edits = 20;
        let edit_len = data.len() / 100 / edits;
        for _ in 0..edits {
            let at = rng.below(data.len() - edit_len);
            rng.fill(&mut edited[at..at + edit_len]);
        }
        let changed = data.iter().zip(&edited).filter(|(a, b)| a != b).count();
        assert!(changed > data.len() / 120, "only {changed} bytes changed");
        let after = p.prepare(&edited);
        check_chunks(&edited, &after, p.config());
        let fresh = new_ids(&before, &after);
        assert!(
            fresh <= 2 * edits,
            "seed {seed}: {fresh} of {} chunks are new after {edits} edits",
            after.len()
        );
    }
}

/// Yields `data`, then fails.
struct FailAfter<'a>(&'a [u8]);

impl Read for FailAfter<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.0.is_empty() {
            return Err(io::Error::other("disk on fire"));
        }
        let n = buf.len().min(self.0.len()).min(100_000);
        buf[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        Ok(n)
    }
}

#[test]
fn read_errors_stop_the_pipeline() {
    let data = random_bytes(3 << 20, 30);
    for threads in [1, 4] {
        for block in [SMALL.max_bytes as usize, 1 << 20, 8 << 20] {
            let p = pipeline(SMALL, Codec::Lz4, threads).with_block_bytes(block);
            let mut got = Vec::new();
            let res = p.prepare_reader(FailAfter(&data), |c| {
                got.push(c);
                Ok::<(), ()>(())
            });
            match res {
                Err(PipelineError::Read(e)) => assert_eq!(e.to_string(), "disk on fire"),
                other => {
                    panic!("threads={threads} block={block}: expected a read error, got {other:?}")
                }
            }
            // What was delivered is an in-order prefix of the real chunks.
            let whole = p.prepare(&data);
            assert!(got.len() < whole.len());
            assert!(
                got[..] == whole[..got.len()],
                "threads={threads} block={block}"
            );
        }
    }
}

#[test]
fn sink_errors_stop_the_pipeline() {
    let data = random_bytes(4 << 20, 31);
    for threads in [1, 4] {
        let p = pipeline(SMALL, Codec::Lz4, threads);
        let whole = p.prepare(&data);
        let mut got = Vec::new();
        let res = p.prepare_reader(&data[..], |c| {
            if got.len() == 5 {
                return Err(format!("full at {}", c.offset));
            }
            got.push(c);
            Ok(())
        });
        match res {
            Err(PipelineError::Sink(e)) => assert_eq!(e, format!("full at {}", whole[5].offset)),
            other => panic!("threads={threads}: expected a sink error, got {other:?}"),
        }
        assert!(got[..] == whole[..5]);

        let mut got = Vec::new();
        let res = p.prepare_with(&data, |c| {
            if got.len() == 5 {
                return Err(c.offset);
            }
            got.push(c);
            Ok(())
        });
        assert_eq!(res, Err(whole[5].offset), "threads={threads}");
        assert!(got[..] == whole[..5]);
    }
}

/// Cutting on several threads finds exactly the one-pass boundaries, also where the
/// stretches never fall into step (long runs of one byte cut at `max_bytes` from wherever
/// a stretch starts).
#[test]
fn parallel_cut_matches_one_pass_on_any_content() {
    let mut data = vec![0u8; 3 << 20];
    data.extend(random_bytes(3 << 20, 3));
    data.extend(vec![7u8; (2 << 20) + 12345]);
    data.extend(mixed_bytes(5 << 20, 4));
    for cfg in [SMALL, ChunkerConfig::default()] {
        let want = reference_cuts(&data, cfg);
        for threads in [2, 3, 4, 7] {
            for len in [data.len(), data.len() - 777, 1 << 20, (1 << 20) + 1] {
                let got = cuts(&pipeline(cfg, Codec::Raw, threads).prepare(&data[..len]));
                assert_eq!(
                    got,
                    reference_cuts(&data[..len], cfg),
                    "threads={threads} len={len} cfg={cfg:?}"
                );
            }
        }
        assert_eq!(
            cuts(&pipeline(cfg, Codec::Raw, 2).prepare(&data)),
            want,
            "{cfg:?}"
        );
    }
}
