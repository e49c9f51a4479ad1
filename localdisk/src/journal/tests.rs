//! The journal against a seeded simulated device: groups torn by write errors, crashes,
//! wrap-around, torn control writes. Oracle: a recovery returns exactly the acknowledged
//! records from the durable head on, in order, then at most a prefix of the one group
//! that failed; nothing else.

use super::*;
use hivefs_nvme::rng::SplitMix64;
use hivefs_nvme::{SharedSim as Shared, SimDevice, SimFaults};
use std::sync::{Arc, Mutex};

fn layout(journal: u64) -> Layout {
    Layout::new(journal, 0).unwrap()
}

#[test]
fn records_come_back_in_order_and_the_head_drops_them() {
    let l = layout(8 << 20);
    let sim = Shared(Arc::new(Mutex::new(SimDevice::new(
        l.capacity,
        1,
        SimFaults::default(),
    ))));
    let mut d: Box<dyn BlockDevice> = Box::new(sim.clone());
    Journal::format(d.as_mut(), &l).unwrap();
    let (mut j, rec) = Journal::open(d, &l).unwrap();
    assert!(rec.records.is_empty());
    assert_eq!(j.generation(), 1);
    let a = j
        .append(&[(RecordKind::Data, b"first"), (RecordKind::Op, b"second")])
        .unwrap();
    let b = j.append(&[(RecordKind::Data, &[7u8; 10_000])]).unwrap();
    assert_eq!(a[0], 0);
    assert_eq!(b[0], 4096, "a group starts at a block");
    drop(j);
    sim.0.lock().unwrap().crash();
    let (mut j, rec) = Journal::open(Box::new(sim.clone()), &l).unwrap();
    let got: Vec<_> = rec.records.iter().map(|r| (r.kind, r.lsn)).collect();
    assert_eq!(
        got,
        vec![
            (RecordKind::Data, 0),
            (RecordKind::Op, a[1]),
            (RecordKind::Data, 4096)
        ]
    );
    assert_eq!(rec.records[1].payload, b"second");
    assert_eq!(j.generation(), 2);
    j.set_head(b[0]).unwrap();
    drop(j);
    let (_, rec) = Journal::open(Box::new(sim), &l).unwrap();
    assert_eq!(rec.records.len(), 1);
    assert_eq!(rec.records[0].payload, vec![7u8; 10_000]);
}

#[test]
fn a_full_journal_refuses_until_the_head_moves() {
    let l = layout(8 << 20);
    let mut d: Box<dyn BlockDevice> = Box::new(SimDevice::new(l.capacity, 2, SimFaults::default()));
    Journal::format(d.as_mut(), &l).unwrap();
    let (mut j, _) = Journal::open(d, &l).unwrap();
    let big = vec![1u8; 2000 << 10];
    let mut lsns = Vec::new();
    loop {
        match j.append(&[(RecordKind::Data, &big)]) {
            Ok(v) => lsns.push(v[0]),
            Err(JournalError::Full { .. }) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(
        lsns.len(),
        4,
        "8 MiB holds four 2000 KiB records with their headers"
    );
    j.set_head(lsns[1]).unwrap();
    let next = j.append(&[(RecordKind::Data, &big)]).unwrap()[0];
    assert!(next > lsns[2], "appends go on past the region's end");
    assert!(matches!(
        j.append(&[(RecordKind::Data, &vec![0u8; 5 << 20])]),
        Err(JournalError::TooLarge(..))
    ));
}

/// Run one seed: random groups, head moves, write errors (torn groups and control
/// writes), crashes and recoveries; check the oracle at every recovery.
fn run_seed(seed: u64, steps: usize) -> u64 {
    let mut rng = SplitMix64::new(seed);
    let l = layout(8 << 20);
    let faults = SimFaults {
        write_error_per_million: 20_000,
        torn_writes: true,
        ..SimFaults::default()
    };
    let sim = Shared(Arc::new(Mutex::new(SimDevice::new(
        l.capacity, seed, faults,
    ))));
    {
        let mut s = sim.0.lock().unwrap();
        s.set_faults(SimFaults::default());
        let mut d: Box<dyn BlockDevice> = Box::new(sim.clone());
        drop(s);
        Journal::format(d.as_mut(), &l).unwrap();
        sim.0.lock().unwrap().set_faults(faults);
    }
    // The model: acknowledged records (lsn, payload) not yet behind the durable head.
    let mut acked: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut failed_group: Vec<Vec<u8>> = Vec::new();
    // Head moves that failed: the control slot may or may not have taken them.
    let mut maybe_heads: Vec<u64> = Vec::new();
    let mut ops = 0u64;
    let mut journal: Option<Journal> = None;
    let mut n = 0u64;
    let mut head = 0u64;
    for step in 0..steps {
        let j = match journal.as_mut() {
            Some(j) => j,
            None => {
                sim.0.lock().unwrap().crash();
                let opened = Journal::open(Box::new(sim.clone()), &l);
                let (j, rec) = match opened {
                    Ok(x) => x,
                    // An injected error during recovery: crash again and retry.
                    Err(JournalError::Io(_)) | Err(JournalError::Failed) => continue,
                    Err(e) => panic!("seed {seed} step {step}: {e}"),
                };
                let got: Vec<(u64, Vec<u8>)> = rec
                    .records
                    .into_iter()
                    .map(|r| (r.lsn, r.payload))
                    .collect();
                // The durable head is the model's, or one of the failed moves.
                assert!(
                    rec.head == head || maybe_heads.contains(&rec.head),
                    "seed {seed} step {step}: head {} (model {head}, maybe {maybe_heads:?})",
                    rec.head
                );
                head = rec.head;
                let from = head;
                let want: Vec<&(u64, Vec<u8>)> = acked.iter().filter(|a| a.0 >= from).collect();
                if got.len() < want.len() {
                    eprintln!(
                        "head {head} tail? want {:?}\ngot {:?}",
                        want.iter().map(|w| (w.0, w.1.len())).collect::<Vec<_>>(),
                        got.iter().map(|w| (w.0, w.1.len())).collect::<Vec<_>>()
                    );
                }
                assert!(
                    got.len() >= want.len(),
                    "seed {seed} step {step}: {} acknowledged records, {} recovered",
                    want.len(),
                    got.len()
                );
                for (g, w) in got.iter().zip(&want) {
                    assert_eq!(&g, w, "seed {seed} step {step}: record differs");
                }
                let extra: Vec<&Vec<u8>> = got[want.len()..].iter().map(|g| &g.1).collect();
                assert!(
                    extra.len() <= failed_group.len()
                        && extra.iter().zip(&failed_group).all(|(a, b)| *a == b),
                    "seed {seed} step {step}: {} records recovered that were never written \
                     or not in order",
                    extra.len()
                );
                acked = got;
                failed_group.clear();
                maybe_heads.clear();
                journal = Some(j);
                continue;
            }
        };
        ops += 1;
        match rng.next_u64() % 100 {
            // A group of 1-4 records, mostly small, some large (wrap-around).
            0..=59 => {
                let k = 1 + rng.next_u64() % 4;
                let mut group = Vec::new();
                for _ in 0..k {
                    n += 1;
                    let size = match rng.next_u64() % 10 {
                        0 => (rng.next_u64() % (600 << 10)) as usize,
                        _ => (rng.next_u64() % 6000) as usize,
                    };
                    let mut p = n.to_le_bytes().to_vec();
                    p.resize(size.max(8), (n % 251) as u8);
                    group.push(p);
                }
                let recs: Vec<(RecordKind, &[u8])> =
                    group.iter().map(|p| (RecordKind::Data, &p[..])).collect();
                match j.append(&recs) {
                    Ok(lsns) => acked.extend(lsns.into_iter().zip(group)),
                    Err(JournalError::Full { .. }) => {}
                    Err(_) => {
                        failed_group = group;
                        journal = None;
                    }
                }
            }
            // Trim: the head moves to a later record (or the tail).
            60..=84 => {
                if acked.is_empty() {
                    continue;
                }
                let k = (rng.next_u64() % (acked.len() as u64 + 1)) as usize;
                let to = acked.get(k).map_or(j.tail(), |a| a.0);
                match j.set_head(to) {
                    Ok(()) => {
                        head = to;
                        acked.drain(..k);
                    }
                    Err(_) => {
                        maybe_heads.push(to);
                        journal = None;
                    }
                }
            }
            // A crash.
            _ => journal = None,
        }
    }
    ops
}

#[test]
fn recovery_returns_exactly_the_acknowledged_records_across_crashes() {
    let seeds: u64 = std::env::var("JOURNAL_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let mut ops = 0;
    for seed in 1..=seeds {
        ops += run_seed(seed, 3000);
    }
    eprintln!("journal simulator: {seeds} seeds, {ops} operations, no invariant broken");
}
