//! Rotating the hive CA without downtime (`hive ca rotate`): two real node processes
//! replicating to each other over mutual TLS, clients connecting and writing throughout.
//!
//! Oracle: no request fails during the rotation (fresh connections and old ones, chunk
//! puts that replicate node to node, metadata changes); both nodes present certificates
//! of the new CA within seconds; clients pinning the old CA and clients pinning the new
//! one both connect; a node restarted on the new CA and a node still running on the old
//! trust replicate to each other; fsck is clean.

use hivefs_client::hive::HiveClient;
use hivefs_client::meta::MetaClient;
use hivefs_harness::cluster::{create_file, create_volume};
use hivefs_harness::{raw_chunk, NodeOptions, TestNode};
use hivefs_net::chunk::{ChunkId, DedupeKey};
use hivefs_net::meta::ROOT_INO;
use hivefs_net::proto::PutChunk;
use hivefs_nvme::rng::SplitMix64;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn chunks(key: &DedupeKey, rng: &mut SplitMix64, n: usize) -> Vec<PutChunk> {
    (0..n).map(|_| raw_chunk(key, rng.bytes(8192))).collect()
}

#[test]
fn a_ca_rotation_fails_no_request() {
    let o = |name: &str| NodeOptions::default().shards(1).name(name).size("256M");
    let mut a = TestNode::start(o("ca1"));
    let b = TestNode::join(o("ca2"), &mut a);
    let old_opts = a.client_options();
    let old_fp = a.ca_fingerprint();
    let admin = MetaClient::connect(&old_opts, a.meta_port()).unwrap();
    let vol = create_volume(&admin, "ca");
    let key = a.client().map().dedupe_key;
    // Wait for both nodes in the placement map (puts need both copies).
    let t0 = Instant::now();
    loop {
        let c = a.client();
        if c.hive_map().nodes.len() == 2 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "map not published");
        std::thread::sleep(Duration::from_millis(200));
    }
    let stop = Arc::new(AtomicBool::new(false));
    // Clients pinning the old CA work through the rotation: a fresh chunk connection,
    // puts (each replicated node to node), gets, and a metadata change, every round;
    // and one long-lived connection made before.
    let worker = {
        let (stop, o, port) = (stop.clone(), old_opts.clone(), a.meta_port());
        std::thread::spawn(move || {
            let mut rng = SplitMix64::new(77);
            let mut long = HiveClient::connect(&o).unwrap();
            let (mut ok, mut failed, mut written) = (0u64, Vec::new(), Vec::new());
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                let batch = chunks(&key, &mut rng, 4);
                let ids: Vec<ChunkId> = batch.iter().map(|c| c.id).collect();
                let r = HiveClient::connect(&o)
                    .map_err(|e| format!("connect: {e}"))
                    .and_then(|mut c| c.put(&batch).map_err(|e| format!("put: {e}")))
                    .and_then(|_| long.get(&ids).map_err(|e| format!("get: {e}")))
                    .and_then(|got| {
                        let good = got
                            .iter()
                            .zip(&batch)
                            .all(|(g, w)| g.as_deref() == Some(&w.data[..]));
                        good.then_some(())
                            .ok_or_else(|| "read back wrong".to_string())
                    })
                    .and_then(|_| {
                        MetaClient::connect(&o, port)
                            .map_err(|e| format!("meta connect: {e}"))
                            .and_then(|m| {
                                create_file(&m, vol, ROOT_INO, &format!("f{i}"))
                                    .map_err(|e| format!("create: {e:?}"))
                            })
                    });
                match r {
                    Ok(_) => {
                        ok += 1;
                        written.extend(batch);
                    }
                    Err(e) => failed.push(e),
                }
            }
            (ok, failed, written)
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    let out = a.hive(&["ca", "rotate"]);
    assert!(
        out.status.success(),
        "hive ca rotate: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        a.log_tail(30)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{}", stdout.trim());
    let new_fp = a.ca_fingerprint();
    assert_ne!(new_fp, old_fp);
    assert!(stdout.contains(&new_fp), "{stdout}");
    let status = a.status_json();
    assert_eq!(status["ca"], new_fp.as_str(), "hive status: {status}");
    assert_eq!(
        status["ca_previous"],
        old_fp.as_str(),
        "hive status: {status}"
    );
    // Both nodes present the new CA's certificates within seconds, with the cross
    // certificate and the old CA in the chain.
    let t0 = Instant::now();
    for n in [&a, &b] {
        loop {
            let chain = n.presented_chain(&old_fp);
            if chain.contains(&new_fp) && chain.contains(&old_fp) && chain.len() == 4 {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "{} still presents {chain:?}\n{}",
                n.dir().display(),
                n.log_tail(20)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    eprintln!(
        "both nodes present the new CA {:?} after the rotation",
        t0.elapsed()
    );
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::SeqCst);
    let (ok, failed, written) = worker.join().unwrap();
    eprintln!(
        "{ok} connect+put+get+create rounds through the rotation, {} failed",
        failed.len()
    );
    assert!(failed.is_empty(), "requests failed: {failed:?}");
    assert!(ok > 10, "the worker made progress: {ok}");
    // A client pinning the new CA reads everything from either node.
    let ids: Vec<ChunkId> = written.iter().map(|c| c.id).collect();
    let mut fresh = HiveClient::connect(&b.client_options()).expect("new pin");
    let got = fresh.get(&ids).unwrap();
    assert!(got
        .iter()
        .zip(&written)
        .all(|(g, w)| g.as_deref() == Some(&w.data[..])));
    // Node b restarts on the new CA (trusting the old one for peers); node a still runs
    // with the trust it started with. They replicate to each other both ways.
    let mut b = b;
    b.restart();
    let mut rng = SplitMix64::new(78);
    for (who, opts) in [("old pin", &old_opts), ("new pin", &b.client_options())] {
        let batch = chunks(&key, &mut rng, 16);
        let mut c = HiveClient::connect(opts).unwrap_or_else(|e| panic!("{who}: {e}"));
        c.put(&batch)
            .unwrap_or_else(|e| panic!("{who}: put: {e}\n{}", b.log_tail(30)));
        let ids: Vec<ChunkId> = batch.iter().map(|c| c.id).collect();
        let got = c.get(&ids).unwrap();
        assert!(got
            .iter()
            .zip(&batch)
            .all(|(g, w)| g.as_deref() == Some(&w.data[..])));
    }
    let fsck = a.fsck(true);
    assert!(fsck.contains("clean"), "fsck: {fsck}");
    assert!(fsck.contains("under-replicated 0"), "fsck: {fsck}");
}
