//! The userspace stack over a real DPDK port: a veth pair between a namespace (the port,
//! through net_af_packet or net_af_xdp) and this process's namespace (kernel TCP clients). Two shards
//! on one receive queue: shard 1 owns no queue, so every packet it gets was dispatched by
//! shard 0 and every packet it sends goes out through shard 0 (software dispatch, both
//! directions). Needs root; skips with the reason otherwise.

mod common;

use hivefs_dpdk::stack::{Fabric, Router};
use hivefs_dpdk::{Eal, Mempool, Port, PortConfig};
use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[test]
fn kernel_clients_talk_to_two_userspace_shards_over_one_af_packet_queue() {
    echo_over("net_af_packet", ",qpairs=1");
}

/// Over net_af_xdp the kernel receives into and sends from the buffer pool's own memory
/// (its UMEM). With DPDK's default pool layout (one buffer per 4 KiB page without
/// hugepages) 40% of the buffers lay beyond the UMEM the PMD registers: the kernel
/// refused them as invalid descriptors, sends were lost without completion and the pool
/// drained until the port went quiet after a few thousand packets. `Mempool` packs its
/// buffers now; this test failed before that.
#[test]
fn kernel_clients_talk_to_two_userspace_shards_over_one_af_xdp_queue() {
    echo_over("net_af_xdp", "");
}

fn echo_over(driver: &str, extra: &str) {
    let Some(lab) = common::lab_or_skip() else {
        return;
    };
    let prefix = format!("hvtest{}", std::process::id());
    let args = common::eal_args(&prefix, &lab.vdev(driver, 0, extra));
    // EAL opens the port's packet socket in the namespace of the thread that starts it.
    let started = std::thread::scope(|sc| {
        sc.spawn(|| {
            lab.enter().unwrap();
            let eal = match Eal::init(&args) {
                Ok(e) => e,
                Err(e) => return Err(e),
            };
            let pool = Arc::new(Mempool::new("test_pool", 8191, 256).unwrap());
            let port = Port::open(&format!("{driver}0"), &PortConfig::default(), &pool).unwrap();
            Ok((port, pool, eal))
        })
        .join()
        .unwrap()
    });
    // EAL's runtime files go with the test, passed or not.
    struct RuntimeDir(String);
    impl Drop for RuntimeDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(format!("/var/run/dpdk/{}", self.0));
        }
    }
    let _runtime = RuntimeDir(prefix.clone());
    let (port, pool, eal) = match started {
        Ok(s) => s,
        // EAL starts once per process: under `cargo test` (threads) only the first test
        // of this file can run; cargo-nextest (CI) runs each test in its own process.
        Err(e) if e.to_string().contains("already initialised") => {
            eprintln!("SKIPPED: {e} (run under cargo-nextest: one process per test)");
            return;
        }
        Err(e) => panic!("EAL init: {e}"),
    };
    assert_eq!(port.rx_queue_count(), 1);
    assert!(pool.dense(), "buffers packed in one chunk");
    let (mut rxq, mut txq) = port.queues();
    let router = Router::new(2)
        .port(7000, 0)
        .port(7001, 1)
        .range(40_000..41_000, 0)
        .range(41_000..42_000, 1);
    let fabric = Fabric::new(router, pool.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for shard in 0..2u16 {
        let (rx, tx) = if shard == 0 {
            (rxq.pop(), txq.pop())
        } else {
            (None, None)
        };
        threads.push(common::start_shard(
            eal,
            shard,
            &fabric,
            rx,
            tx,
            port.mac(),
            lab.node_addr,
            &stop,
        ));
    }

    // Several clients per shard, each sending 1 MiB of patterned bytes and reading them back.
    // ECHO_MIB=N sends N MiB per client instead (a longer run, for measuring).
    let mib: u32 = std::env::var("ECHO_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let mut clients = Vec::new();
    for i in 0..6u16 {
        let addr = SocketAddrV4::new(lab.node_addr, 7000 + (i % 2));
        clients.push(std::thread::spawn(move || {
            common::echo_client(addr, i, mib << 20);
        }));
    }
    let t0 = Instant::now();
    for c in clients {
        c.join().unwrap();
    }
    eprintln!("{driver}: 6 x {mib} MiB echoed in {:?}", t0.elapsed());
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let forwarded: u64 = fabric
        .counters
        .iter()
        .map(|c| c.forwarded.load(Ordering::Relaxed))
        .sum();
    assert!(
        fabric.counters[1].tx_packets.load(Ordering::Relaxed) > 0 && forwarded > 0,
        "shard 1 took part only through dispatch"
    );
    eprintln!("forwarded {forwarded} packets; port {:?}", port.stats());
    port.close();
    eal.remove_runtime_dir();
}
