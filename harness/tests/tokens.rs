//! Token lifecycle on a real node: `hive token create|list|revoke`, scopes (host, volume,
//! read-only), expiry, and a revoked token losing its open connections within seconds.

use hivefs_client::hive::{ClientError, HiveClient};
use hivefs_client::meta::MetaClient;
use hivefs_harness::cluster::{create_file, create_volume};
use hivefs_harness::{NodeOptions, TestNode};
use hivefs_net::chunk::{compress, ChunkId, Codec};
use hivefs_net::meta::{Answer, Errno, Mutation, Query, ROOT_INO};
use hivefs_net::proto::PutChunk;
use std::time::{Duration, Instant};

fn token(node: &TestNode, scope: &str, ttl: Option<&str>) -> String {
    let mut args = vec!["token", "create", "--scope", scope];
    if let Some(t) = ttl {
        args.extend(["--ttl", t]);
    }
    let out = node.hive(&args);
    assert!(
        out.status.success(),
        "hive token create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn meta_with(node: &TestNode, tok: &str) -> Result<MetaClient, ClientError> {
    let mut o = node.client_options();
    o.token = tok.into();
    MetaClient::connect(&o, node.meta_port())
}

fn mkfile(m: &MetaClient, vol: u32, name: &str) -> Result<Answer, Errno> {
    create_file(m, vol, ROOT_INO, name)
}

#[test]
fn scopes_expiry_and_revocation() {
    let node = TestNode::start(NodeOptions::default().shards(1).name("tokens"));
    let admin = meta_with(&node, &node.token()).unwrap();
    let v1 = create_volume(&admin, "v1");
    let v2 = create_volume(&admin, "v2");

    // A host token: any volume, no hive operations.
    let host = token(&node, "host", None);
    let hm = meta_with(&node, &host).unwrap();
    assert!(mkfile(&hm, v1, "h1").is_ok());
    assert!(mkfile(&hm, v2, "h2").is_ok());
    assert_eq!(hm.query(0, Query::Tokens).unwrap(), Err(Errno::PERM));
    assert_eq!(
        hm.mutate(
            0,
            Mutation::CreateVolume {
                name: "v3".into(),
                copies: 1
            }
        )
        .unwrap(),
        Err(Errno::PERM)
    );

    // A volume token: its volume only; read-only: no changes.
    let rw = meta_with(&node, &token(&node, "volume:v1", None)).unwrap();
    assert!(mkfile(&rw, v1, "w1").is_ok());
    assert_eq!(mkfile(&rw, v2, "w2"), Err(Errno::PERM));
    assert!(matches!(
        rw.query(0, Query::Volume { name: "v1".into() }).unwrap(),
        Ok(Answer::Volume(_))
    ));
    assert_eq!(
        rw.query(0, Query::Volume { name: "v2".into() }).unwrap(),
        Err(Errno::PERM)
    );
    let ro = meta_with(&node, &token(&node, "volume:v1:ro", None)).unwrap();
    assert_eq!(mkfile(&ro, v1, "r1"), Err(Errno::PERM));
    assert!(matches!(
        ro.query(
            v1,
            Query::Lookup {
                parent: ROOT_INO,
                name: b"w1".to_vec()
            }
        )
        .unwrap(),
        Ok(Answer::Attr(_))
    ));

    // Chunks with the host token, then revoke it: open connections end within seconds.
    let mut o = node.client_options();
    o.token = host.clone();
    let mut chunks = HiveClient::connect(&o).unwrap();
    let key = chunks.map().dedupe_key;
    let data = vec![7u8; 65536];
    let (codec, stored) = compress(Codec::Lz4, &data);
    let id = ChunkId::compute(&key, &data);
    chunks
        .put(&[PutChunk {
            id,
            codec,
            raw_len: data.len() as u32,
            data: stored,
        }])
        .unwrap();
    let list = String::from_utf8(node.hive(&["token", "list"]).stdout).unwrap();
    let host_id = list
        .lines()
        .find(|l| l.contains("Host"))
        .and_then(|l| l.split_whitespace().next())
        .expect("the host token is listed")
        .to_string();
    let out = node.hive(&["token", "revoke", "--id", &host_id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t0 = Instant::now();
    // The open metadata and chunk connections stop working...
    loop {
        let m_dead = hm.query(v1, Query::GetAttr { ino: ROOT_INO }).is_err();
        let c_dead = chunks.get(&[id]).is_err();
        if m_dead && c_dead {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "a revoked token still works after 5 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "revoked token lost its open connections after {:?}",
        t0.elapsed()
    );
    // ... and new ones are refused.
    assert!(meta_with(&node, &host).is_err());
    assert!(HiveClient::connect(&o).is_err());
    let list = String::from_utf8(node.hive(&["token", "list"]).stdout).unwrap();
    assert!(
        list.lines()
            .any(|l| l.starts_with(&host_id) && l.contains("revoked")),
        "{list}"
    );

    // An expiring token works until it expires.
    let brief = token(&node, "host", Some("2s"));
    assert!(meta_with(&node, &brief).is_ok());
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        meta_with(&node, &brief).is_err(),
        "an expired token was accepted"
    );
    // The admin token still works.
    assert!(
        matches!(admin.query(0, Query::Tokens).unwrap(), Ok(Answer::Tokens(t)) if t.len() == 4)
    );
}

/// The SHA-256 of the certificate `node` presents on a new connection to shard 0.
fn presented(node: &TestNode) -> String {
    node.presented_chain(&node.ca_fingerprint()).swap_remove(0)
}

#[test]
fn a_certificate_rotation_fails_no_request() {
    let node = TestNode::start(NodeOptions::default().shards(1).name("rotate"));
    let admin = meta_with(&node, &node.token()).unwrap();
    let vol = create_volume(&admin, "r");
    let before = presented(&node);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // A client working through the rotation, on old connections and new ones.
    let worker = {
        let stop = stop.clone();
        let o = node.client_options();
        let port = node.meta_port();
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0u64, Vec::new());
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                i += 1;
                let r = MetaClient::connect(&o, port)
                    .map_err(|e| e.to_string())
                    .and_then(|m| {
                        create_file(&m, vol, ROOT_INO, &format!("f{i}"))
                            .map_err(|e| format!("{e:?}"))
                    })
                    .and_then(|_| HiveClient::connect(&o).map_err(|e| e.to_string()));
                match r {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(e),
                }
            }
            (ok, failed)
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    let out = node.hive(&["cert", "rotate"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{}", String::from_utf8_lossy(&out.stdout).trim());
    let t0 = Instant::now();
    let after = loop {
        let fp = presented(&node);
        if fp != before {
            break fp;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the node still presents the old certificate"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!(
        "new certificate presented {:?} after the rotation",
        t0.elapsed()
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&after));
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (ok, failed) = worker.join().unwrap();
    eprintln!(
        "{ok} connect+create+connect rounds through the rotation, {} failed",
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "requests failed during the rotation: {failed:?}"
    );
    assert!(ok > 10, "the worker made progress: {ok}");
    // The node restarts on the new pair.
    let mut node = node;
    node.restart();
    assert_eq!(presented(&node), after);
}
