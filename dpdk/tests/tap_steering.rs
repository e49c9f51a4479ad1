//! The steering path: a port with a receive queue per shard, each shard polling its own,
//! and a device that puts each connection's packets on the queue of the shard that owns
//! it, so (almost) nothing is handed between shards. The device is net_tap with two
//! queue pairs: the kernel's tun driver steers a flow to the queue its replies were sent
//! from (automatic flow steering), and the owner always sends from its own queue. The
//! test also asks for rte_flow rules (`Port::steer_tcp_dst`, what `hive run` installs);
//! net_tap implements them with tc flower, which this machine's kernel lacks
//! (CONFIG_NET_CLS_FLOWER unset): the refusal is printed and the test goes on. Kernel TCP
//! clients in the same namespace reach the userspace stack through the tap interface.
//! Needs root; skips with the reason otherwise.

mod common;

use hivefs_dpdk::stack::{Fabric, Router};
use hivefs_dpdk::{Eal, Mempool, Port, PortConfig};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[test]
fn each_shard_receives_on_its_own_queue_where_the_device_steers() {
    let Some(lab) = common::lab_or_skip() else {
        return;
    };
    let prefix = format!("hvtap{}", std::process::id());
    let args = common::eal_args(&prefix, "net_tap0,iface=hvtap0");
    // The tap interface lives in the lab's namespace only: any addresses do.
    let node = Ipv4Addr::new(10, 99, 77, 2);
    let started = std::thread::scope(|sc| {
        sc.spawn(|| {
            lab.enter().unwrap();
            let eal = Eal::init(&args)?;
            let pool = Arc::new(Mempool::new("tap_pool", 8191, 256).unwrap());
            let pc = PortConfig {
                rx_queues: 2,
                tx_queues: 2,
                ..PortConfig::default()
            };
            let port = Port::open("net_tap0", &pc, &pool)?;
            Ok::<_, hivefs_dpdk::DpdkError>((port, pool, eal))
        })
        .join()
        .unwrap()
    });
    let (port, pool, eal) = started.expect("EAL + tap port");
    let ip = |a: &[&str]| {
        let o = Command::new("ip").args(a).output().unwrap();
        assert!(
            o.status.success(),
            "ip {a:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    ip(&[
        "-n",
        &lab.ns,
        "addr",
        "add",
        "10.99.77.1/24",
        "dev",
        "hvtap0",
    ]);
    ip(&["-n", &lab.ns, "link", "set", "hvtap0", "up"]);
    eprintln!(
        "port: {} rx queues, rss {}",
        port.rx_queue_count(),
        port.rss()
    );
    let f0 = port.steer_tcp_dst(7000, 0xffff, 0);
    let f1 = port.steer_tcp_dst(7001, 0xffff, 1);
    if let (Err(e), _) | (_, Err(e)) = (&f0, &f1) {
        eprintln!("flow rules refused ({e}); relying on the device's own flow steering");
    }
    let (mut rxq, mut txq) = port.queues();
    let router = Router::new(2).port(7000, 0).port(7001, 1);
    let fabric = Fabric::new(router, pool.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for shard in (0..2u16).rev() {
        let (rx, tx) = (rxq.pop(), txq.pop());
        threads.push(common::start_shard(
            eal,
            shard,
            &fabric,
            rx,
            tx,
            port.mac(),
            node,
            &stop,
        ));
    }
    let mut clients = Vec::new();
    for i in 0..4u16 {
        let addr = SocketAddrV4::new(node, 7000 + (i % 2));
        let ns = lab.ns_path();
        clients.push(std::thread::spawn(move || {
            // The client's socket is made in the lab's namespace (this thread only).
            let f = std::fs::File::open(&ns).unwrap();
            use std::os::fd::AsRawFd;
            // SAFETY: a valid namespace descriptor; affects the calling thread only.
            assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
            common::echo_client(addr, i, 4 << 20);
        }));
    }
    for c in clients {
        c.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let c = |s: usize| {
        (
            fabric.counters[s].rx_packets.load(Ordering::Relaxed),
            fabric.counters[s].forwarded.load(Ordering::Relaxed),
        )
    };
    eprintln!(
        "shard 0 (received, handed over) {:?}, shard 1 {:?}",
        c(0),
        c(1)
    );
    // Both shards received on their own queues, and little had to be handed over (the
    // first packet of a connection may land on the other queue; ARP goes to both).
    let ((r0, h0), (r1, h1)) = (c(0), c(1));
    assert!(
        r0 > 1000 && r1 > 1000,
        "each shard polled its own queue: {r0} / {r1}"
    );
    assert!(
        (h0 + h1) * 20 < r0 + r1,
        "more than 5% handed over: {} of {}",
        h0 + h1,
        r0 + r1
    );
    drop((f0, f1));
    port.close();
    let _ = std::fs::remove_dir_all(format!("/var/run/dpdk/{prefix}"));
}
