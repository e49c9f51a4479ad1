//! The client's chunking pipeline (FastCDC cut, keyed BLAKE3, compression) over a buffer in
//! memory: no network, no node.

use crate::util::{self, Rng};
use anyhow::{Context, Result};
use hivefs_client::pipeline::{ChunkerConfig, Pipeline};
use hivefs_net::chunk::{Codec, DedupeKey};
use std::convert::Infallible;
use std::path::Path;
use std::time::Instant;

/// The input: a file read into memory, or `bytes` of generated data that compresses about
/// 2:1 with LZ4 and has no duplicate chunks.
pub fn input(file: Option<&Path>, bytes: u64, seed: u64) -> Result<Vec<u8>> {
    if let Some(f) = file {
        return std::fs::read(f).with_context(|| format!("reading {}", f.display()));
    }
    let mut rng = Rng::new(seed);
    let mut data = vec![0u8; bytes as usize];
    for block in data.chunks_mut(4096) {
        // Random first half, a repeated 32-byte pattern second half.
        let (a, b) = block.split_at_mut(block.len() / 2);
        rng.fill(a);
        let mut pat = [0u8; 32];
        rng.fill(&mut pat);
        for (i, x) in b.iter_mut().enumerate() {
            *x = pat[i % 32];
        }
    }
    Ok(data)
}

/// One measurement.
pub struct PipeRun {
    pub threads: usize,
    pub secs: f64,
    pub bytes: u64,
    pub chunks: u64,
    pub stored: u64,
    pub cpu: f64,
}

impl PipeRun {
    pub fn gbps(&self) -> f64 {
        self.bytes as f64 / self.secs / 1e9
    }
}

/// Prepare `data` with `threads` workers (1: inline on this thread), every CPU allowed.
pub fn run(data: &[u8], threads: usize, codec: Codec) -> Result<PipeRun> {
    let key = DedupeKey([0x5a; 32]);
    let p = Pipeline::new(key, ChunkerConfig::default(), codec, threads)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let (secs, chunks, stored, cpu) = util::with_all_cpus(|| {
        let c0 = util::self_cpu_secs();
        let t0 = Instant::now();
        let (mut chunks, mut stored) = (0u64, 0u64);
        let r: Result<(), Infallible> = p.prepare_with(data, |c| {
            chunks += 1;
            stored += c.stored.len() as u64;
            Ok(())
        });
        let _ = r;
        (
            t0.elapsed().as_secs_f64(),
            chunks,
            stored,
            util::self_cpu_secs() - c0,
        )
    });
    Ok(PipeRun {
        threads: p.threads(),
        secs,
        bytes: data.len() as u64,
        chunks,
        stored,
        cpu,
    })
}
