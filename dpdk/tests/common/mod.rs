//! What the DPDK tests share: an echo server per shard, and a client that sends a
//! pattern and checks what comes back.

use hivefs_dpdk::port::{RxQueue, TxQueue};
use hivefs_dpdk::stack::{Fabric, ShardNet, StackConfig, UserStream};
use hivefs_dpdk::Eal;
use hivefs_harness::netns::VethLab;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::net::{SocketAddrV4, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// An echo server per shard: each accepted stream sends back what it reads.
pub fn serve(mut net: ShardNet, port: u16, stop: Arc<AtomicBool>) {
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

/// Connect to `addr`, send `bytes` of a pattern particular to client `i` while reading
/// the echo, and check it.
pub fn echo_client(addr: SocketAddrV4, i: u16, bytes: u32) {
    let mut s = TcpStream::connect_timeout(&addr.into(), Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let data: Vec<u8> = (0..bytes)
        .map(|j| (j.wrapping_mul(31) ^ i as u32) as u8)
        .collect();
    let mut w = s.try_clone().unwrap();
    let send = data.clone();
    let writer = std::thread::spawn(move || w.write_all(&send).unwrap());
    let mut back = vec![0u8; data.len()];
    s.read_exact(&mut back).unwrap();
    writer.join().unwrap();
    assert!(back == data, "client {i}: echoed bytes differ");
}

/// A lab, or `None` after printing why there cannot be one here.
pub fn lab_or_skip() -> Option<VethLab> {
    match VethLab::new() {
        Ok(l) => Some(l),
        Err(why) => {
            eprintln!("SKIPPED: {why}");
            None
        }
    }
}

/// EAL arguments of a test: no hugepages, one lcore, runtime files under `prefix`, `vdev`.
pub fn eal_args(prefix: &str, vdev: &str) -> Vec<String> {
    [
        "--no-huge",
        "-m",
        "256",
        "--no-pci",
        "-l",
        "0",
        "--file-prefix",
        prefix,
        "--vdev",
        vdev,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Start shard `shard` on its own thread: a stack at `addr/24` with `mac`, echoing on
/// port 7000 + shard, with the queues it is given (if any), until `stop`.
#[allow(clippy::too_many_arguments)]
pub fn start_shard(
    eal: &'static Eal,
    shard: u16,
    fabric: &Arc<Fabric>,
    rx: Option<RxQueue>,
    tx: Option<TxQueue>,
    mac: [u8; 6],
    addr: Ipv4Addr,
    stop: &Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let cfg = StackConfig {
        mac,
        addr,
        prefix_len: 24,
        gateway: None,
        rx_buffer: 256 << 10,
        tx_buffer: 256 << 10,
        local_ports: 40_000 + shard * 1000..41_000 + shard * 1000,
        seed: 7 + shard as u64,
    };
    let fabric = fabric.clone();
    let stop = stop.clone();
    std::thread::spawn(move || {
        eal.register_thread().unwrap();
        serve(
            ShardNet::new(shard, fabric, rx, tx, cfg),
            7000 + shard,
            stop,
        );
    })
}
