//! `hive status`: the JSON parses, has per-shard and total figures, and they match exactly
//! what was uploaded; the human output has a row per shard and a total row.

use hivefs_client::pipeline::{ChunkerConfig, Pipeline, PreparedChunk};
use hivefs_harness::{NodeOptions, Rng, TestNode};
use hivefs_net::chunk::Codec;
use serde_json::Value;
use std::collections::HashMap;

/// Random (incompressible) and textual (compressible, partly repeating) data.
fn sample_data(seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut data = rng.bytes(3 << 20);
    let words = [
        "hive", "chunk", "shard", "dedupe", "segment", "replay", "verify", "status",
    ];
    let mut text = String::new();
    while text.len() < 2 << 20 {
        text.push_str(words[rng.below(words.len() as u64) as usize]);
        text.push(if rng.below(10) == 0 { '\n' } else { ' ' });
    }
    data.extend_from_slice(text.as_bytes());
    // An exact repeat: chunks that dedupe inside the file.
    let again = data[..1 << 20].to_vec();
    data.extend_from_slice(&again);
    data
}

struct Expect {
    chunks: u64,
    logical: u64,
    stored: u64,
}

fn expected(chunks: &[PreparedChunk]) -> Expect {
    let unique: HashMap<_, _> = chunks.iter().map(|c| (c.id, c)).collect();
    Expect {
        chunks: unique.len() as u64,
        logical: unique.values().map(|c| c.raw_len as u64).sum(),
        stored: unique.values().map(|c| c.stored.len() as u64).sum(),
    }
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("field {k} missing or not an integer in {v}"))
}

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64()
        .unwrap_or_else(|| panic!("field {k} missing or not a number in {v}"))
}

/// `a / b`, and 1.0 for an empty node (the CLI's convention).
fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        1.0
    } else {
        a as f64 / b as f64
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * b.abs().max(1.0)
}

/// Structure and per-shard sums of `hive status --json`.
fn check_json(node: &TestNode, st: &Value, e: &Expect, offered: u64) {
    assert_eq!(st["node_id"].as_str(), Some("node-1"), "{st}");
    let shards = st["shards"]
        .as_array()
        .unwrap_or_else(|| panic!("no shards array: {st}"));
    assert_eq!(shards.len(), node.shards() as usize, "one entry per shard");
    let total = &st["total"];
    assert!(total.is_object(), "no total: {st}");
    for (i, s) in shards.iter().enumerate() {
        assert_eq!(u(s, "shard"), i as u64);
        for k in [
            "chunks",
            "logical_bytes",
            "stored_bytes",
            "offered_bytes",
            "device_bytes_used",
            "device_bytes_total",
            "puts_rejected",
            "gets_corrupt",
        ] {
            u(s, k);
        }
        assert!(s["failed"].is_null(), "shard {i} failed: {s}");
        assert!(
            u(s, "device_bytes_used") >= u(s, "stored_bytes"),
            "shard {i}: device use below stored bytes: {s}"
        );
    }
    for k in [
        "chunks",
        "logical_bytes",
        "stored_bytes",
        "offered_bytes",
        "device_bytes_used",
        "device_bytes_total",
        "puts_rejected",
        "gets_corrupt",
    ] {
        let sum: u64 = shards.iter().map(|s| u(s, k)).sum();
        assert_eq!(u(total, k), sum, "total.{k} is the sum over shards");
    }
    assert_eq!(
        u(total, "chunks"),
        e.chunks,
        "total.chunks = unique chunks put"
    );
    assert_eq!(
        u(total, "logical_bytes"),
        e.logical,
        "total.logical_bytes = their raw bytes"
    );
    assert_eq!(
        u(total, "stored_bytes"),
        e.stored,
        "total.stored_bytes = their encoded bytes"
    );
    assert_eq!(
        u(total, "offered_bytes"),
        offered,
        "total.offered_bytes: {st}"
    );
    assert_eq!(u(total, "puts_rejected"), 0);
    assert_eq!(u(total, "gets_corrupt"), 0);
    assert!(
        close(f(total, "compression_ratio"), ratio(e.logical, e.stored)),
        "compression_ratio {} vs {}",
        total["compression_ratio"],
        ratio(e.logical, e.stored)
    );
    assert!(
        close(f(total, "dedupe_ratio"), ratio(offered, e.logical)),
        "dedupe_ratio {} vs {}",
        total["dedupe_ratio"],
        ratio(offered, e.logical)
    );
    let used = u(total, "device_bytes_used");
    assert!(
        used >= e.stored && (used > 0) == (e.chunks > 0),
        "device_bytes_used {used} vs stored {}",
        e.stored
    );
    assert!(
        u(total, "device_bytes_total") <= 1 << 30 && u(total, "device_bytes_total") > 1 << 29,
        "device_bytes_total of a 1G device: {}",
        total["device_bytes_total"]
    );
}

/// The human table: a header, one row per shard, a total row with the chunk count.
fn check_text(node: &TestNode, text: &str, st: &Value) {
    let rows: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert!(
        text.lines()
            .next()
            .is_some_and(|l| l.starts_with("node node-1")),
        "{text}"
    );
    assert!(
        rows.iter()
            .any(|r| r.first() == Some(&"shard") && r.contains(&"chunks")),
        "no header row:\n{text}"
    );
    for (i, s) in st["shards"].as_array().unwrap().iter().enumerate() {
        let row = rows
            .iter()
            .find(|r| r.first() == Some(&i.to_string().as_str()))
            .unwrap_or_else(|| panic!("no row for shard {i}:\n{text}"));
        assert_eq!(row[1], u(s, "chunks").to_string(), "shard {i} row: {row:?}");
    }
    let total = rows
        .iter()
        .find(|r| r.first() == Some(&"total"))
        .unwrap_or_else(|| panic!("no total row:\n{text}"));
    assert_eq!(
        total[1],
        u(&st["total"], "chunks").to_string(),
        "total row: {total:?}"
    );
    let dedupe: f64 = total[4]
        .parse()
        .unwrap_or_else(|_| panic!("dedupe column {:?}", total[4]));
    assert!(
        (dedupe - f(&st["total"], "dedupe_ratio")).abs() < 0.006,
        "total row dedupe {dedupe} vs JSON {}",
        st["total"]["dedupe_ratio"]
    );
    let rows_for_shards = rows
        .iter()
        .filter(|r| r.first().is_some_and(|c| c.parse::<u16>().is_ok()))
        .count();
    assert_eq!(rows_for_shards, node.shards() as usize, "{text}");
}

/// The network path each shard reports: kernel TCP, or with `--net dpdk` the driver and
/// packet counters that moved while the uploads went through (and the port's, on shard 0).
fn check_net(node: &TestNode, st: &Value, text: &str) {
    let shards = st["shards"].as_array().unwrap();
    let Some(driver) = &node.options().dpdk else {
        for s in shards {
            assert_eq!(s["net"]["transport"], "kernel", "{s}");
        }
        assert!(text.contains("network: kernel TCP"), "{text}");
        return;
    };
    for s in shards {
        let n = &s["net"];
        assert_eq!(n["transport"], "dpdk", "{n}");
        assert_eq!(n["driver"].as_str(), Some(driver.as_str()), "{n}");
        assert!(
            u(n, "tx_packets") > 0,
            "every shard answered over the port: {n}"
        );
    }
    // Shard 0 polls a queue and reports the port's counters, read in the same moment:
    // every packet it took from its queue the port received.
    let n0 = &shards[0]["net"];
    let port = &n0["port"];
    assert!(port.is_object(), "no port counters on shard 0: {n0}");
    let rx0 = u(n0, "rx_packets");
    assert!(rx0 > 0 && u(port, "rx_packets") >= rx0, "{port} vs {rx0}");
    assert!(text.contains("network: DPDK ("), "{text}");
    assert!(text.contains("port: rx "), "{text}");
}

fn run(opts: NodeOptions) {
    let mut node = TestNode::start(opts);
    let label = node.options().name.clone();
    // Empty node.
    let st = node.status_json();
    check_json(
        &node,
        &st,
        &Expect {
            chunks: 0,
            logical: 0,
            stored: 0,
        },
        0,
    );
    let mut c = node.client();
    let p = Pipeline::new(c.map().dedupe_key, ChunkerConfig::default(), Codec::Lz4, 0).unwrap();
    let chunks = p.prepare(&sample_data(7));
    let e = expected(&chunks);
    assert!(
        e.chunks < chunks.len() as u64,
        "the sample must repeat chunks"
    );
    assert!(e.stored < e.logical, "the sample must compress");
    let up = c.upload(&chunks).unwrap();
    assert_eq!(up.uploaded, e.chunks);

    // After one upload every unique byte was offered once: dedupe 1.0.
    let st = node.status_json();
    check_json(&node, &st, &e, e.logical);
    let text = node.status_text();
    check_text(&node, &text, &st);
    // The node's own per-shard stats agree with the CLI's.
    let direct: Vec<Value> = c
        .stats()
        .unwrap()
        .iter()
        .map(|j| serde_json::from_str(j).unwrap())
        .collect();
    for (s, d) in st["shards"].as_array().unwrap().iter().zip(&direct) {
        assert_eq!(u(s, "chunks"), u(d, "chunks"));
        assert_eq!(u(s, "stored_bytes"), u(d, "stored_bytes"));
    }

    // The same file again: every chunk is a has hit (the in-file repeats too, which the
    // first upload skipped on the client), nothing new is stored.
    let up2 = c.upload(&chunks).unwrap();
    assert_eq!(up2.uploaded, 0);
    let file_bytes: u64 = chunks.iter().map(|c| c.raw_len as u64).sum();
    let st2 = node.status_json();
    check_json(&node, &st2, &e, e.logical + file_bytes);
    assert_eq!(u(&st2["total"], "chunks"), e.chunks);
    assert!(f(&st2["total"], "dedupe_ratio") > 2.0);
    println!(
        "{label}: status --json total after two uploads: {}",
        st2["total"]
    );
    let text = node.status_text();
    println!("{label}: human status:\n{text}");
    check_net(&node, &st2, &text);

    // Against a stopped node, status fails and says why.
    drop(c);
    assert!(node.stop().success());
    let out = node.hive(&if node.is_insecure() {
        vec!["status", "--json", "--insecure"]
    } else {
        vec!["status", "--json"]
    });
    assert!(!out.status.success(), "status of a stopped node must fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is `hive run` up?"), "{err}");
}

#[test]
fn status_json_and_table_match_uploads_tls() {
    run(NodeOptions::default().shards(2).name("status-tls"));
}

#[test]
fn status_json_and_table_match_uploads_insecure() {
    run(NodeOptions::default()
        .shards(1)
        .insecure(true)
        .name("status-plain"));
}

/// Every per-shard entry of `hive status --json` carries its own dedupe and compression
/// ratios, like the total and like the human table's per-shard columns. Ignored until
/// `hive status --json` adds them (engine/src/bin/hive.rs `status()` passes each shard's
/// StatsReply through unchanged and computes ratios only for `total`).
#[test]
fn status_json_per_shard_ratios() {
    let node = TestNode::start(NodeOptions::default().shards(2).name("status-ratios"));
    let mut c = node.client();
    let p = Pipeline::new(c.map().dedupe_key, ChunkerConfig::default(), Codec::Lz4, 0).unwrap();
    c.upload(&p.prepare(&sample_data(8))).unwrap();
    let st = node.status_json();
    for s in st["shards"].as_array().unwrap() {
        let (logical, stored, offered) = (
            u(s, "logical_bytes"),
            u(s, "stored_bytes"),
            u(s, "offered_bytes"),
        );
        assert!(
            s.get("dedupe_ratio").is_some() && s.get("compression_ratio").is_some(),
            "per-shard entry without dedupe_ratio / compression_ratio: {s}"
        );
        assert!(close(f(s, "dedupe_ratio"), ratio(offered, logical)), "{s}");
        assert!(
            close(f(s, "compression_ratio"), ratio(logical, stored)),
            "{s}"
        );
    }
}
