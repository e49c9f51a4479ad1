//! The metadata service over a real node process: TLS and token on the metadata port,
//! volumes and files through Raft, state surviving `kill -9`, and exactly-once mutations
//! when a client retries across crashes.

use hivefs_client::meta::MetaClient;
use hivefs_harness::{NodeOptions, TestNode};
use hivefs_net::chunk::{ChunkId, CHUNK_ID_BYTES};
use hivefs_net::meta::{
    Answer, Errno, Extent, FileKind, MetaReply, Mutation, Query, RenameMode, ROOT_INO,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn connect(node: &TestNode) -> MetaClient {
    MetaClient::connect(&node.client_options(), node.meta_port()).expect("metadata connect")
}

fn create_volume(m: &MetaClient, name: &str) -> u32 {
    match m.mutate(
        0,
        Mutation::CreateVolume {
            name: name.into(),
            copies: 1,
        },
    ) {
        Ok(Ok(Answer::Volume(v))) => v.id,
        other => panic!("create volume: {other:?}"),
    }
}

fn create(m: &MetaClient, vol: u32, parent: u64, name: &str, kind: FileKind) -> MetaReply {
    m.mutate(
        vol,
        Mutation::Create {
            parent,
            name: name.into(),
            kind,
            perm: 0o644,
            uid: 0,
            gid: 0,
            rdev: 0,
        },
    )
    .expect("metadata call")
}

fn names(m: &MetaClient, vol: u32, dir: u64) -> Vec<String> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        match m.query(
            vol,
            Query::ReadDir {
                ino: dir,
                after,
                max: 1000,
            },
        ) {
            Ok(Ok(Answer::Dir { entries, end })) => {
                for e in entries {
                    after = e.cookie;
                    out.push(String::from_utf8(e.name).unwrap());
                }
                if end {
                    return out;
                }
            }
            other => panic!("readdir: {other:?}"),
        }
    }
}

#[test]
fn namespace_survives_kill9_and_restart() {
    let mut node = TestNode::start(NodeOptions::default().name("meta-basic"));
    let m = connect(&node);
    assert_eq!(m.map().shard_count, node.shards());
    let vol = create_volume(&m, "default");
    assert_eq!(
        m.mutate(
            0,
            Mutation::CreateVolume {
                name: "default".into(),
                copies: 1
            }
        )
        .unwrap(),
        Err(Errno::EXIST)
    );
    let Ok(Answer::Attr(d)) = create(&m, vol, ROOT_INO, "docs", FileKind::Dir) else {
        panic!("mkdir");
    };
    let Ok(Answer::Attr(f)) = create(&m, vol, d.ino, "a.txt", FileKind::File) else {
        panic!("create");
    };
    let chunk = ChunkId([9; CHUNK_ID_BYTES]);
    let w = m
        .mutate(
            vol,
            Mutation::CommitWrite {
                ino: f.ino,
                extents: vec![Extent {
                    offset: 0,
                    len: 4096,
                    chunk,
                    chunk_offset: 0,
                }],
                size_at_least: 0,
                claim_epoch: 1,
                lease: 0,
            },
        )
        .unwrap();
    assert!(
        matches!(w, Ok(Answer::Attr(ref a)) if a.size == 4096),
        "{w:?}"
    );
    m.mutate(
        vol,
        Mutation::Rename {
            parent: d.ino,
            name: b"a.txt".to_vec(),
            new_parent: ROOT_INO,
            new_name: b"b.txt".to_vec(),
            mode: RenameMode::NoReplace,
        },
    )
    .unwrap()
    .unwrap();
    node.kill9();
    node.run();
    // The same client reconnects on its own.
    assert_eq!(names(&m, vol, ROOT_INO), vec!["docs", "b.txt"]);
    assert!(names(&m, vol, d.ino).is_empty());
    match m.query(
        vol,
        Query::Extents {
            ino: f.ino,
            from: 0,
            to: u64::MAX,
            max: 100,
        },
    ) {
        Ok(Ok(Answer::Extents { extents, size, .. })) => {
            assert_eq!(size, 4096);
            assert_eq!(extents.len(), 1);
            assert_eq!(extents[0].chunk, chunk);
        }
        other => panic!("extents: {other:?}"),
    }
    // A fresh client sees the same, and a bad token is refused.
    let m2 = connect(&node);
    assert_eq!(names(&m2, vol, ROOT_INO), vec!["docs", "b.txt"]);
    let mut bad = node.client_options();
    bad.token = "not-the-token".into();
    assert!(MetaClient::connect(&bad, node.meta_port()).is_err());
    // The extent names a chunk nobody stored: fsck must say so.
    let out = std::process::Command::new(hivefs_harness::hive_bin())
        .args(["fsck", "--data"])
        .arg(node.dir())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "fsck missed a dangling extent:\n{text}"
    );
    assert!(
        text.contains("is referenced but no node holds it"),
        "{text}"
    );
    node.stop();
}

/// A client creates files one after another while the node is killed and restarted under
/// it. Its calls retry through the crashes with the same sequence numbers, so every create
/// must answer success exactly once: a create applied twice would answer EEXIST, and a lost
/// one would be missing from the directory.
#[test]
fn mutations_apply_exactly_once_across_kill9() {
    const FILES: usize = 1000;
    let mut node = TestNode::start(NodeOptions::default().name("meta-once"));
    let m = Arc::new(connect(&node));
    let vol = create_volume(&m, "v");
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let m = m.clone();
        let done = done.clone();
        std::thread::spawn(move || {
            let mut results = Vec::new();
            for i in 0..FILES {
                results.push(create(
                    &m,
                    vol,
                    ROOT_INO,
                    &format!("f{i:04}"),
                    FileKind::File,
                ));
            }
            done.store(true, Ordering::SeqCst);
            results
        })
    };
    let mut kills = 0;
    while !done.load(Ordering::SeqCst) && kills < 6 {
        std::thread::sleep(Duration::from_millis(150));
        node.kill9();
        kills += 1;
        std::thread::sleep(Duration::from_millis(50));
        node.run();
    }
    let results = writer.join().expect("writer thread");
    for (i, r) in results.iter().enumerate() {
        assert!(
            matches!(r, Ok(Answer::Attr(_))),
            "create f{i:04} answered {r:?} after {kills} kills"
        );
    }
    let listed = names(&m, vol, ROOT_INO);
    assert_eq!(listed.len(), FILES, "every create present once");
    eprintln!("{FILES} creates, {kills} kill -9 restarts: all applied exactly once");
    assert!(kills > 0, "the node was never killed during the writes");
    eprintln!("{}", node.fsck(true));
    node.stop();
}

/// `MutateInDir`: a name change is answered with the directory's attributes as read after
/// it applied (what `hi` answers the kernel's next getattr of the directory with), the
/// same as a getattr right after says; other mutations answer as `Mutate` does.
#[test]
fn mutate_in_dir_answers_the_directory_after_the_change() {
    let node = TestNode::start(NodeOptions::default().name("meta-in-dir"));
    let m = connect(&node);
    let vol = create_volume(&m, "default");
    let getattr = |ino: u64| match m.query(vol, Query::GetAttr { ino }) {
        Ok(Ok(Answer::Attr(a))) => a,
        other => panic!("getattr {ino}: {other:?}"),
    };
    let before = getattr(ROOT_INO);
    let in_dir = |op: Mutation| match m.mutate_in_dir(vol, op) {
        Ok(Ok(Answer::InDir { attr, dir })) => (attr, dir),
        other => panic!("mutate_in_dir: {other:?}"),
    };
    let (sub, root) = in_dir(Mutation::Create {
        parent: ROOT_INO,
        name: b"sub".to_vec(),
        kind: FileKind::Dir,
        perm: 0o755,
        uid: 0,
        gid: 0,
        rdev: 0,
    });
    assert_eq!(sub.kind, FileKind::Dir);
    assert_eq!(
        root,
        getattr(ROOT_INO),
        "the answer is the directory as it now is"
    );
    assert_eq!(root.nlink, before.nlink + 1, "mkdir adds the child's `..`");
    assert!(root.mtime >= before.mtime && root.ctime >= before.ctime);
    let (file, sub_after) = in_dir(Mutation::Create {
        parent: sub.ino,
        name: b"f".to_vec(),
        kind: FileKind::File,
        perm: 0o644,
        uid: 0,
        gid: 0,
        rdev: 0,
    });
    assert_eq!(sub_after.ino, sub.ino);
    assert_eq!(sub_after, getattr(sub.ino));
    let (gone, sub_after) = in_dir(Mutation::Unlink {
        parent: sub.ino,
        name: b"f".to_vec(),
    });
    assert_eq!((gone.ino, gone.nlink), (file.ino, 0));
    assert_eq!(sub_after, getattr(sub.ino));
    let (_, root_after) = in_dir(Mutation::Rmdir {
        parent: ROOT_INO,
        name: b"sub".to_vec(),
    });
    assert_eq!(root_after.nlink, before.nlink);
    // Not a name change: answered as a plain mutation.
    match m.mutate_in_dir(
        vol,
        Mutation::SetAttr {
            ino: ROOT_INO,
            set: Default::default(),
        },
    ) {
        Ok(Ok(Answer::Attr(a))) => assert_eq!(a.ino, ROOT_INO),
        other => panic!("setattr: {other:?}"),
    }
    // Errors stay errors.
    match m.mutate_in_dir(
        vol,
        Mutation::Unlink {
            parent: ROOT_INO,
            name: b"absent".to_vec(),
        },
    ) {
        Ok(Err(e)) => assert_eq!(e, Errno::NOENT),
        other => panic!("unlink of nothing: {other:?}"),
    }
}
