//! The userspace stack over a real DPDK port: a veth pair between a namespace (the port,
//! through net_af_packet) and this process's namespace (kernel TCP clients). Two shards
//! on one receive queue: shard 1 owns no queue, so every packet it gets was dispatched by
//! shard 0 and every packet it sends goes out through shard 0 (software dispatch, both
//! directions). Needs root; skips with the reason otherwise.

use hivefs_dpdk::stack::{Fabric, Router, ShardNet, StackConfig, UserStream};
use hivefs_dpdk::{Eal, Mempool, Port, PortConfig};
use hivefs_harness::netns::VethLab;
use std::io::{Read, Write};
use std::net::{SocketAddrV4, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// An echo server per shard: each accepted stream sends back what it reads.
fn serve(mut net: ShardNet, port: u16, stop: Arc<AtomicBool>) {
    net.stack().listen(port).unwrap();
    let mut conns: Vec<(UserStream, Vec<u8>)> = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    while !stop.load(Ordering::Relaxed) {
        let moved = net.turn();
        while let Some((s, _peer)) = net.stack().accept() {
            conns.push((s, Vec::new()));
        }
        conns.retain_mut(|(s, pending)| {
            loop {
                match s.read(&mut buf) {
                    Ok(0) => return false,
                    Ok(n) => pending.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(_) => return false,
                }
            }
            while !pending.is_empty() {
                match s.write(pending) {
                    Ok(n) => {
                        pending.drain(..n);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(_) => return false,
                }
            }
            true
        });
        net.flush();
        if !moved {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

#[test]
fn kernel_clients_talk_to_two_userspace_shards_over_one_af_packet_queue() {
    echo_over("net_af_packet", ",qpairs=1");
}

/// Known defect, not yet understood: over net_af_xdp (DPDK 22.11, generic XDP on a veth,
/// kernel 6.18) the port stops delivering received packets after a few thousand, at
/// random (the same test over net_af_packet moves 384 MiB); the node test bed therefore
/// uses net_af_packet. Run it with `cargo nextest run -p hivefs-dpdk --run-ignored all`.
#[test]
#[ignore = "net_af_xdp on veth stops receiving under load (see the test's docs)"]
fn kernel_clients_talk_to_two_userspace_shards_over_one_af_xdp_queue() {
    echo_over("net_af_xdp", "");
}

fn echo_over(driver: &str, extra: &str) {
    let lab = match VethLab::new() {
        Ok(l) => l,
        Err(why) => {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
    let prefix = format!("hvtest{}", std::process::id());
    let args: Vec<String> = [
        "--no-huge",
        "-m",
        "256",
        "--no-pci",
        "-l",
        "0",
        "--file-prefix",
        &prefix,
        "--vdev",
        &lab.vdev(driver, 0, extra),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
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
        let cfg = StackConfig {
            mac: port.mac(),
            addr: lab.node_addr,
            prefix_len: lab.prefix_len,
            gateway: None,
            rx_buffer: 256 << 10,
            tx_buffer: 256 << 10,
            local_ports: 40_000 + shard * 1000..41_000 + shard * 1000,
            seed: 7 + shard as u64,
        };
        let (rx, tx) = if shard == 0 {
            (rxq.pop(), txq.pop())
        } else {
            (None, None)
        };
        let fabric = fabric.clone();
        let stop = stop.clone();
        threads.push(std::thread::spawn(move || {
            eal.register_thread().unwrap();
            serve(
                ShardNet::new(shard, fabric, rx, tx, cfg),
                7000 + shard,
                stop,
            );
        }));
    }

    // Several clients per shard, each sending 1 MiB of patterned bytes and reading them back.
    let mut clients = Vec::new();
    for i in 0..6u16 {
        let addr = SocketAddrV4::new(lab.node_addr, 7000 + (i % 2));
        clients.push(std::thread::spawn(move || {
            let mut s = TcpStream::connect_timeout(&addr.into(), Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mib: u32 = std::env::var("ECHO_MIB")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(1);
            let data: Vec<u8> = (0..(mib << 20))
                .map(|j| (j.wrapping_mul(31) ^ i as u32) as u8)
                .collect();
            let mut w = s.try_clone().unwrap();
            let send = data.clone();
            let writer = std::thread::spawn(move || w.write_all(&send).unwrap());
            let mut back = vec![0u8; data.len()];
            s.read_exact(&mut back).unwrap();
            writer.join().unwrap();
            assert!(back == data, "client {i}: echoed bytes differ");
        }));
    }
    let t0 = Instant::now();
    for c in clients {
        c.join().unwrap();
    }
    eprintln!("{driver}: 6 x 1 MiB echoed in {:?}", t0.elapsed());
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
