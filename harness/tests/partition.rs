//! A real network partition: three hive nodes in network namespaces of their own
//! (`hivefs_harness::netns`), the metadata leader cut off from the two others while two
//! clients create, rename and delete in the same directories.
//!
//! What must hold:
//! - the cut-off leader accepts no namespace change (its answer is an error, and after the
//!   partition heals the change is nowhere);
//! - the majority elects a new leader and the clients go on;
//! - after healing, the history check: every change a client saw acknowledged is there,
//!   nothing is duplicated, nothing appears that no client made (a change whose answer
//!   was lost may or may not have happened: those names are left out of the check).
//!
//! And one mount cut off on its own (`hi` in a namespace of its own, the hive and another
//! mount on the other side): a truncation it journals while cut off is sent under the
//! file's write lease once it is back, after the other host's uncommitted bytes.

use hivefs_harness::cluster::{create_volume, list_names, meta_client, new_file, settled_leader};
use hivefs_harness::mount::TestMount;
use hivefs_harness::netns::NetLab;
use hivefs_harness::{NodeOptions, TestNode};
use hivefs_net::conn::FramedConn;
use hivefs_net::frame::{PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN};
use hivefs_net::meta::{
    self, Answer, FileKind, MetaCommand, MetaRequest, Mutation, RenameMode, Timespec, ROOT_INO,
};
use hivefs_net::proto::{Request, Response};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One client's view of its own names: where each lives (directory inode), and the names
/// whose last change has an unknown outcome.
#[derive(Default)]
struct Model {
    at: BTreeMap<String, u64>,
    unsure: BTreeSet<String>,
    acked: u64,
    failed: u64,
}

/// Client `tag`'s loop: create, rename (across the two directories) and unlink its own
/// names until `stop`.
fn client_loop(
    node: &TestNode,
    vol: u32,
    dirs: [u64; 2],
    tag: char,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Model> {
    let m = meta_client(node);
    std::thread::spawn(move || {
        let mut model = Model::default();
        let mut n = 0u64;
        let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ tag as u64;
        while !stop.load(Ordering::SeqCst) {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let sure: Vec<String> = model.at.keys().cloned().collect();
            let (op, touched): (Mutation, Vec<String>) = if sure.is_empty() || rng.is_multiple_of(3)
            {
                n += 1;
                let name = format!("{tag}{n}");
                let dir = dirs[(rng >> 8) as usize % 2];
                (new_file(dir, &name), vec![name])
            } else {
                let name = sure[(rng >> 16) as usize % sure.len()].clone();
                let from = model.at[&name];
                if rng % 3 == 1 {
                    n += 1;
                    let to_name = format!("{tag}{n}");
                    let to_dir = dirs[(rng >> 24) as usize % 2];
                    (
                        Mutation::Rename {
                            parent: from,
                            name: name.as_bytes().to_vec(),
                            new_parent: to_dir,
                            new_name: to_name.as_bytes().to_vec(),
                            mode: RenameMode::NoReplace,
                        },
                        vec![name, to_name],
                    )
                } else {
                    (
                        Mutation::Unlink {
                            parent: from,
                            name: name.as_bytes().to_vec(),
                        },
                        vec![name],
                    )
                }
            };
            match (m.mutate(vol, op.clone()), op) {
                (Ok(Ok(_)), Mutation::Create { parent, .. }) => {
                    model.at.insert(touched[0].clone(), parent);
                    model.acked += 1;
                }
                (Ok(Ok(_)), Mutation::Rename { new_parent, .. }) => {
                    model.at.remove(&touched[0]);
                    model.at.insert(touched[1].clone(), new_parent);
                    model.acked += 1;
                }
                (Ok(Ok(_)), _) => {
                    model.at.remove(&touched[0]);
                    model.acked += 1;
                }
                (Ok(Err(e)), op) => panic!("client {tag}: {op:?} refused with {e:?}"),
                (Err(e), _) => {
                    // No answer (no quorum, no leader in time): the outcome is unknown.
                    model.failed += 1;
                    for t in touched {
                        model.at.remove(&t);
                        model.unsure.insert(t);
                    }
                    eprintln!("client {tag}: {e}");
                }
            }
        }
        model
    })
}

/// A create sent straight to `node` on a connection of its own (no leader following):
/// its error answer, or what else came back.
fn create_at(node: &TestNode, vol: u32, name: &str) -> Result<Response, String> {
    let cfg = hivefs_net::tls::client_config_pinned(&node.ca_fingerprint()).unwrap();
    let s = TcpStream::connect((node.ip(), node.meta_port())).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let sn = hivefs_net::tls::server_name(&node.options().host).unwrap();
    let mut conn = FramedConn::new_client(s, Some((cfg, sn))).map_err(|e| e.to_string())?;
    let mut call = |id: u64, r: &Request| {
        conn.send_request(PROTOCOL_VERSION_MIN, id, r)
            .map_err(|e| e.to_string())?;
        conn.recv_response()
            .map(|(_, r)| r)
            .map_err(|e| e.to_string())
    };
    let hello = Request::Hello {
        min_version: PROTOCOL_VERSION_MIN,
        max_version: PROTOCOL_VERSION_MAX,
        token: node.token(),
        client_name: "partition-test".into(),
    };
    call(1, &hello)?;
    let cmd = MetaRequest::Mutate(MetaCommand {
        volume: vol,
        client: 0x51de,
        seq: 1,
        acked_below: 1,
        now: Timespec::default(),
        op: new_file(ROOT_INO, name),
    });
    call(
        2,
        &Request::Meta {
            body: meta::encode(&cmd),
        },
    )
}

#[test]
fn a_partitioned_leader_accepts_nothing_and_the_history_is_whole() {
    let lab = match NetLab::new(3) {
        Ok(l) => l,
        Err(why) => {
            eprintln!("SKIP: cannot make network namespaces here: {why}");
            return;
        }
    };
    let o = |i: usize| {
        NodeOptions::default()
            .shards(1)
            .size("512M")
            .name(&format!("part{i}"))
            .in_netns(lab.namespace(i), &lab.addr(i))
    };
    let mut a = TestNode::start(o(0));
    let mut b = TestNode::join(o(1), &mut a);
    let c = TestNode::join(o(2), &mut b);
    let nodes = [a, b, c];
    let all: Vec<&TestNode> = nodes.iter().collect();
    let leader = settled_leader(&all);
    let li = (leader - 1) as usize;
    let m = meta_client(&nodes[(li + 1) % 3]);
    let vol = create_volume(&m, "split");
    let dir = |name: &str| match m.mutate(
        vol,
        Mutation::Create {
            parent: ROOT_INO,
            name: name.as_bytes().to_vec(),
            kind: FileKind::Dir,
            perm: 0o755,
            uid: 0,
            gid: 0,
            rdev: 0,
        },
    ) {
        Ok(Ok(Answer::Attr(a))) => a.ino,
        other => panic!("mkdir {name}: {other:?}"),
    };
    let dirs = [dir("d0"), dir("d1")];

    // Two clients: one entering through the leader, one through a follower.
    let stop = Arc::new(AtomicBool::new(false));
    let ca = client_loop(&nodes[li], vol, dirs, 'a', stop.clone());
    let cb = client_loop(&nodes[(li + 2) % 3], vol, dirs, 'b', stop.clone());
    std::thread::sleep(Duration::from_secs(2));

    lab.isolate(li).expect("isolating the leader");
    let t0 = Instant::now();
    eprintln!("leader {leader} cut off");
    // The cut-off leader decides nothing: its answer is an error.
    let r = create_at(&nodes[li], vol, "minority-write");
    eprintln!(
        "a create at the cut-off leader answered after {:?}: {r:?}",
        t0.elapsed()
    );
    assert!(
        matches!(&r, Ok(Response::Error { .. })),
        "the minority answered {r:?}"
    );
    // The majority elects a new leader.
    let majority: Vec<&TestNode> = (0..3).filter(|i| *i != li).map(|i| &nodes[i]).collect();
    let new_leader = settled_leader(&majority);
    assert_ne!(new_leader, leader);
    eprintln!("new leader {new_leader} after {:?}", t0.elapsed());
    std::thread::sleep(Duration::from_secs(4));
    lab.heal(li).expect("healing");
    eprintln!("healed after {:?}", t0.elapsed());
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::SeqCst);
    let models = [ca.join().unwrap(), cb.join().unwrap()];
    let _ = settled_leader(&all);

    // The history check.
    let listing: Vec<(u64, String)> = dirs
        .iter()
        .flat_map(|d| list_names(&m, vol, *d).into_iter().map(move |n| (*d, n)))
        .collect();
    let mut seen = BTreeSet::new();
    for (d, n) in &listing {
        assert!(
            seen.insert(n.clone()),
            "{n} listed twice (in {d} and elsewhere)"
        );
    }
    for (tag, model) in ['a', 'b'].iter().zip(&models) {
        eprintln!(
            "client {tag}: {} changes acknowledged, {} without an answer, {} names held",
            model.acked,
            model.failed,
            model.at.len()
        );
        for (name, d) in &model.at {
            assert!(
                listing.contains(&(*d, name.clone())),
                "client {tag}'s acknowledged {name} in {d} is missing"
            );
        }
    }
    for (d, n) in &listing {
        let owner = if n.starts_with('a') {
            &models[0]
        } else {
            &models[1]
        };
        assert!(
            owner.at.get(n) == Some(d) || owner.unsure.contains(n),
            "{n} in {d}: no client's acknowledged history has it there"
        );
    }
    assert!(
        models.iter().all(|m| m.acked > 20),
        "the clients made progress"
    );
    // The cut-off leader's write is nowhere.
    let root = list_names(&m, vol, ROOT_INO);
    assert!(
        !root.iter().any(|n| n == "minority-write"),
        "the minority's change was applied: {root:?}"
    );
}

/// A truncation journaled by a host cut off from the hive is sent under the file's write
/// lease, so another host's bytes written before it (and still uncommitted there) are
/// recalled and committed first, and the truncation cuts them as it would have online.
///
/// Mount A (a client disk, `hi` in a network namespace of its own) knows file `f`'s
/// attributes; A is cut off; mount B rewrites `f` with 3 MiB that stay uncommitted (B
/// holds the write lease); A, which missed B's invalidations, truncates `f` to 1 MiB: its
/// kernel goes straight to setattr and A journals it. After healing, A's drain asks for
/// the lease (B commits) before it sends the truncation: `f` ends as 1 MiB of B's bytes.
/// A truncation sent without the lease lands before B's commit, and `f` ends 3 MiB long.
#[test]
fn a_truncation_journaled_in_a_partition_is_ordered_after_another_hosts_bytes() {
    let lab = match NetLab::new(2) {
        Ok(l) => l,
        Err(why) => {
            eprintln!("SKIP: cannot make network namespaces here: {why}");
            return;
        }
    };
    let node = TestNode::start(
        NodeOptions::default()
            .shards(1)
            .size("1G")
            .name("part-trunc")
            .in_netns(lab.namespace(0), &lab.addr(0)),
    );
    let Some(a) = TestMount::start_on_disk_in_netns(&node, "ptrunc", true, lab.namespace(1)) else {
        return;
    };
    let b = TestMount::start(&node, "ptrunc");
    let bytes = |seed: u8, len: usize| -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
            .collect()
    };
    std::fs::write(b.join("f"), bytes(1, 2 << 20)).unwrap();
    let t = Instant::now();
    while std::fs::metadata(a.join("f")).map(|m| m.len()).ok() != Some(2 << 20) {
        assert!(t.elapsed() < Duration::from_secs(10), "A never saw f");
        std::thread::sleep(Duration::from_millis(100));
    }

    lab.isolate(1).expect("cutting A off");
    // A finds the hive away (a lookup it must ask for) and goes offline.
    let t = Instant::now();
    let looked = std::fs::metadata(a.join("not-there"));
    eprintln!(
        "A, cut off, looked up a new name: {:?} after {:.1?}",
        looked.map(|m| m.len()),
        t.elapsed()
    );
    // B's writer is a process of its own (see `hold-write`): it writes 3 MiB and keeps
    // the file open, so B holds them uncommitted.
    let new = bytes(2, 3 << 20);
    let data = node.dir().join("new.bin");
    std::fs::write(&data, &new).unwrap();
    let mut writer = Command::new(env!("CARGO_BIN_EXE_hold-write"))
        .arg(b.join("f"))
        .arg(&data)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting hold-write");
    let mut line = String::new();
    BufReader::new(writer.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "written");
    let t = Instant::now();
    let path = std::ffi::CString::new(a.join("f").as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid C string.
    let rc = unsafe { libc::truncate(path.as_ptr(), 1 << 20) };
    let (took, err) = (t.elapsed(), std::io::Error::last_os_error());
    eprintln!("A's truncation, cut off: rc {rc} after {took:.1?}");
    assert_eq!(rc, 0, "{err} after {took:.1?}\n{}", a.log_tail(20));
    assert_eq!(std::fs::metadata(a.join("f")).unwrap().len(), 1 << 20);

    lab.heal(1).expect("healing");
    let t = Instant::now();
    let c = TestMount::start(&node, "ptrunc");
    while std::fs::metadata(c.join("f")).unwrap().len() != 1 << 20 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "A's truncation never applied: C sees {} bytes\n--- A ---\n{}\n--- B ---\n{}",
            std::fs::metadata(c.join("f")).unwrap().len(),
            a.log_tail(40),
            b.log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "A's truncation applied {:.1?} after healing; B, with f open, shows {} bytes",
        t.elapsed(),
        std::fs::metadata(b.join("f")).unwrap().len()
    );
    drop(c);
    // Whatever B still held goes to the hive now.
    drop(writer.stdin.take());
    assert!(writer.wait().unwrap().success());
    drop(b);
    let c = TestMount::start(&node, "ptrunc");
    let got = std::fs::read(c.join("f")).unwrap();
    assert_eq!(
        got.len(),
        1 << 20,
        "B's bytes landed after A's truncation\n--- A ---\n{}",
        a.log_tail(20)
    );
    assert!(got == new[..1 << 20], "another mount reads other bytes");
    drop((a, c));
    let report = node.fsck(true);
    assert!(report.contains("clean"), "fsck: {report}");
}
