//! Garbage collection with epochs and claims, on a real node: chunks nobody references are
//! swept, everything referenced survives, and a writer uploading and committing while
//! collections run never loses a chunk (its claims are spared; a commit with a claim
//! from an older epoch is refused and claimed again). `hive fsck --verify` is the oracle.

use hivefs_client::hive::HiveClient;
use hivefs_client::meta::MetaClient;
use hivefs_client::pipeline::{ChunkerConfig, Pipeline};
use hivefs_harness::{NodeOptions, Rng, TestNode};
use hivefs_net::chunk::Codec;
use hivefs_net::meta::{Answer, Errno, Extent, FileKind, Mutation, Query, ROOT_INO};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

struct Writer {
    meta: Arc<MetaClient>,
    chunks: HiveClient,
    pipeline: Pipeline,
    vol: u32,
}

impl Writer {
    fn new(meta: Arc<MetaClient>, vol: u32) -> Writer {
        let chunks = HiveClient::connect(&meta.chunk_options()).expect("chunk connect");
        let pipeline = Pipeline::new(
            meta.map().dedupe_key,
            ChunkerConfig::default(),
            Codec::Lz4,
            1,
        )
        .unwrap();
        Writer {
            meta,
            chunks,
            pipeline,
            vol,
        }
    }

    /// Upload without committing: garbage for the next collection.
    fn upload_only(&mut self, data: &[u8]) -> usize {
        let c = self.pipeline.prepare(data);
        self.chunks.upload(&c).expect("upload");
        c.len()
    }

    /// Create `name` holding `data`, as `hi` does: upload, commit with the claim; if the
    /// epoch moved on meanwhile (EAGAIN), claim again. Returns (ino, commit retries).
    fn write_file(&mut self, name: &str, data: &[u8]) -> (u64, u32) {
        let ino = match self
            .meta
            .mutate(
                self.vol,
                Mutation::Create {
                    parent: ROOT_INO,
                    name: name.into(),
                    kind: FileKind::File,
                    perm: 0o644,
                    uid: 0,
                    gid: 0,
                    rdev: 0,
                },
            )
            .unwrap()
        {
            Ok(Answer::Attr(a)) => a.ino,
            other => panic!("create {name}: {other:?}"),
        };
        let chunks = self.pipeline.prepare(data);
        let extents: Vec<Extent> = chunks
            .iter()
            .map(|c| Extent {
                offset: c.offset,
                len: c.raw_len,
                chunk: c.id,
                chunk_offset: 0,
            })
            .collect();
        for retry in 0..20 {
            let up = self.chunks.upload(&chunks).expect("upload");
            match self
                .meta
                .mutate(
                    self.vol,
                    Mutation::CommitWrite {
                        ino,
                        extents: extents.clone(),
                        size_at_least: data.len() as u64,
                        claim_epoch: up.claim_epoch,
                        lease: 0,
                    },
                )
                .unwrap()
            {
                Ok(_) => return (ino, retry),
                Err(e) if e == Errno::AGAIN => continue,
                Err(e) => panic!("commit {name}: {e}"),
            }
        }
        panic!("commit {name}: still refused after 20 claims");
    }

    fn read_file(&mut self, ino: u64) -> Vec<u8> {
        let (extents, size) = match self
            .meta
            .query(
                self.vol,
                Query::Extents {
                    ino,
                    from: 0,
                    to: u64::MAX,
                    max: 16384,
                },
            )
            .unwrap()
        {
            Ok(Answer::Extents { extents, size, .. }) => (extents, size),
            other => panic!("extents of {ino}: {other:?}"),
        };
        let ids: Vec<_> = extents.iter().map(|e| e.chunk).collect();
        let got = self.chunks.get(&ids).expect("get");
        let mut out = vec![0u8; size as usize];
        for (e, d) in extents.iter().zip(got) {
            let d = d.unwrap_or_else(|| panic!("chunk {} of inode {ino} is gone", e.chunk));
            let s = e.chunk_offset as usize;
            out[e.offset as usize..e.end() as usize].copy_from_slice(&d[s..s + e.len as usize]);
        }
        out
    }
}

fn swept(report: &str) -> u64 {
    TestNode::swept_count(report)
}

#[test]
fn gc_sweeps_garbage_and_spares_racing_writers() {
    let (node, meta, vol) = node_with_volume("gc");
    let mut rng = Rng::new(0x6c);
    let mut w = Writer::new(meta.clone(), vol);
    let keep = rng.bytes(3 << 20);
    let (keep_ino, _) = w.write_file("keep", &keep);
    let garbage = w.upload_only(&rng.bytes(2 << 20));
    let gone_data = rng.bytes(2 << 20);
    let (gone, _) = w.write_file("gone", &gone_data);
    match meta
        .mutate(
            vol,
            Mutation::Unlink {
                parent: ROOT_INO,
                name: b"gone".to_vec(),
            },
        )
        .unwrap()
    {
        Ok(Answer::Attr(a)) => assert_eq!(a.nlink, 0),
        other => panic!("{other:?}"),
    }
    meta.mutate(vol, Mutation::Reclaim { ino: gone })
        .unwrap()
        .unwrap();
    node.fsck(true);
    let first = node.gc();
    eprintln!("{first}");
    assert!(
        swept(&first) >= garbage as u64,
        "the uncommitted and the deleted chunks go: {first}"
    );

    // A writer keeps uploading and committing new files while collections run.
    let done = Arc::new(AtomicBool::new(false));
    let racer = {
        let meta = meta.clone();
        let done = done.clone();
        std::thread::spawn(move || {
            let mut w = Writer::new(meta, vol);
            let mut rng = Rng::new(0x7ace);
            let mut files = Vec::new();
            let mut retries = 0;
            let mut i = 0;
            while !done.load(Ordering::SeqCst) || i < 20 {
                let data = rng.bytes(256 << 10);
                let (ino, r) = w.write_file(&format!("race{i}"), &data);
                retries += r;
                files.push((ino, data));
                i += 1;
            }
            (files, retries)
        })
    };
    let mut reports = Vec::new();
    for _ in 0..4 {
        reports.push(node.gc());
    }
    done.store(true, Ordering::SeqCst);
    let (files, retries) = racer.join().expect("racer");
    for r in &reports {
        eprintln!("{r}");
    }
    eprintln!(
        "{} files written during 4 collections, {retries} commits claimed again",
        files.len()
    );
    // Everything referenced is stored and verifies; every file reads back whole.
    eprintln!("{}", node.fsck(true));
    assert_eq!(w.read_file(keep_ino), keep);
    for (ino, data) in &files {
        assert!(w.read_file(*ino) == *data, "race file {ino} differs");
    }
    // Two more collections with nothing new: nothing referenced goes, nothing is left.
    node.gc();
    let last = node.gc();
    assert_eq!(swept(&last), 0, "{last}");
    node.fsck(true);
}

/// A node with volume `v`, and a metadata client.
fn node_with_volume(name: &str) -> (TestNode, Arc<MetaClient>, u32) {
    let node = TestNode::start(NodeOptions::default().shards(2).name(name));
    let meta = Arc::new(
        MetaClient::connect(&node.client_options(), node.meta_port()).expect("meta connect"),
    );
    let vol = match meta
        .mutate(
            0,
            Mutation::CreateVolume {
                name: "v".into(),
                copies: 1,
            },
        )
        .unwrap()
    {
        Ok(Answer::Volume(v)) => v.id,
        other => panic!("{other:?}"),
    };
    (node, meta, vol)
}

/// `hive fsck` whatever its exit status: (exit code, output).
fn fsck_any(node: &TestNode) -> (Option<i32>, String) {
    let mut args = vec!["fsck"];
    if node.is_insecure() {
        args.push("--insecure");
    }
    let out = node.hive(&args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

/// The number after `label` in an fsck report ("... stored chunks 12  verified 0  stale 3").
fn count(report: &str, label: &str) -> u64 {
    report
        .split(label)
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {label:?} count in {report:?}"))
}

fn gc_epoch(meta: &MetaClient) -> u64 {
    match meta.query(0, Query::GcEpoch).unwrap() {
        Ok(Answer::GcEpoch(e)) => e,
        other => panic!("gc epoch: {other:?}"),
    }
}

/// Uploaded and never committed: two collections remove it, so fsck's "no unreferenced
/// chunk outlives two GC epochs" holds; garbage claimed in the current epoch is no finding.
#[test]
fn garbage_does_not_outlive_two_collections() {
    let (node, meta, vol) = node_with_volume("gc-stale-clean");
    let mut rng = Rng::new(0x5a1e);
    let mut w = Writer::new(meta.clone(), vol);
    let keep = rng.bytes(1 << 20);
    let (keep_ino, _) = w.write_file("keep", &keep);
    let garbage = w.upload_only(&rng.bytes(1 << 20)) as u64;
    let e0 = gc_epoch(&meta);
    let first = node.gc();
    let second = node.gc();
    eprintln!("{first}{second}");
    assert!(swept(&first) >= garbage, "{first}");
    assert_eq!(gc_epoch(&meta), e0 + 2);
    // Fresh garbage, claimed in the current epoch: stored, unreferenced, not stale.
    let fresh = w.upload_only(&rng.bytes(1 << 20)) as u64;
    let report = node.fsck(false);
    eprintln!("{report}");
    assert_eq!(count(&report, "  stale "), 0, "{report}");
    assert_eq!(
        count(&report, "stored chunks "),
        count(&report, "referenced chunks ") + fresh,
        "only the fresh garbage is extra: {report}"
    );
    assert_eq!(w.read_file(keep_ino), keep);
}

/// The check fires: the GC epoch advances twice with no collection (as two collections
/// that advanced it and failed before their sweep), so garbage uploaded before is
/// unreferenced and unclaimed since two epochs ago. fsck names each such chunk and exits
/// 1; the next real collection removes them and fsck is clean again.
#[test]
fn fsck_reports_garbage_that_outlived_two_epochs() {
    let (node, meta, vol) = node_with_volume("gc-stale-fires");
    let mut rng = Rng::new(0xf1e5);
    let mut w = Writer::new(meta.clone(), vol);
    let keep = rng.bytes(1 << 20);
    let (keep_ino, _) = w.write_file("keep", &keep);
    let garbage = w.upload_only(&rng.bytes(1 << 20)) as u64;
    let e0 = gc_epoch(&meta);
    let (code, report) = fsck_any(&node);
    assert_eq!(code, Some(0), "young garbage is no finding: {report}");
    let advance = |want: u64| match meta.mutate(0, Mutation::AdvanceGcEpoch).unwrap() {
        Ok(Answer::GcEpoch(e)) => assert_eq!(e, want),
        other => panic!("advance: {other:?}"),
    };
    // One advance: within the slack (a collection may fail midway).
    advance(e0 + 1);
    let (code, report) = fsck_any(&node);
    assert_eq!(code, Some(0), "one epoch of slack: {report}");
    advance(e0 + 2);
    let (code, report) = fsck_any(&node);
    eprintln!("{report}");
    assert_eq!(code, Some(1), "fsck must fail: {report}");
    assert_eq!(count(&report, "  stale "), garbage, "{report}");
    let findings = report
        .lines()
        .filter(|l| {
            l.starts_with("PROBLEM: chunk ")
                && l.ends_with(&format!(
                    "is unreferenced and unclaimed since before epoch {}: it outlived two \
                     collections",
                    e0 + 1
                ))
        })
        .count() as u64;
    assert_eq!(findings, garbage, "{report}");
    // The referenced file is no finding, and reads back.
    assert_eq!(w.read_file(keep_ino), keep);
    // A real collection removes the garbage: clean again.
    let swept_now = node.gc();
    eprintln!("{swept_now}");
    assert!(swept(&swept_now) >= garbage, "{swept_now}");
    let report = node.fsck(true);
    assert_eq!(count(&report, "  stale "), 0, "{report}");
}
