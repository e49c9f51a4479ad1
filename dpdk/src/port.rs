//! An Ethernet port: configured with receive and transmit queues, started, and split
//! into [`RxQueue`]s and [`TxQueue`]s, each owned by one thread (DPDK queues are not
//! thread-safe; one owner each makes that hold by construction).
//!
//! Ports are found by device name: a virtual device given to EAL (`--vdev
//! net_af_xdp0,iface=eth0` is port `net_af_xdp0`) or a PCI address.

use crate::mbuf::{Mbuf, Mempool};
use crate::{DpdkError, Result};
use hivefs_dpdk_sys as sys;
use std::ffi::CString;

/// How to set a port up.
#[derive(Clone, Debug)]
pub struct PortConfig {
    /// Receive queues wanted (clamped to what the device has).
    pub rx_queues: u16,
    /// Transmit queues wanted (clamped likewise).
    pub tx_queues: u16,
    pub rx_desc: u16,
    pub tx_desc: u16,
    /// Spread received packets over the queues by an IPv4/TCP hash, where offered.
    pub rss: bool,
}

impl Default for PortConfig {
    fn default() -> Self {
        PortConfig {
            rx_queues: 1,
            tx_queues: 1,
            rx_desc: 1024,
            tx_desc: 1024,
            rss: true,
        }
    }
}

/// Counters of a port.
#[derive(Clone, Copy, Debug, Default)]
pub struct PortStats {
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Dropped by the device for lack of room in a receive ring.
    pub rx_missed: u64,
    pub rx_errors: u64,
    pub tx_errors: u64,
    /// Receive failures for lack of buffers in the pool.
    pub rx_no_mbuf: u64,
}

/// A configured, started port. See the module docs.
pub struct Port {
    id: u16,
    name: String,
    rx_queues: u16,
    tx_queues: u16,
    rss: bool,
    mac: [u8; 6],
    driver: String,
    started: bool,
}

impl Port {
    /// Find device `name`, configure it as `cfg` asks (queue counts clamped to the
    /// device's), set its queues up with buffers from `pool`, and start it.
    pub fn open(name: &str, cfg: &PortConfig, pool: &Mempool) -> Result<Port> {
        let cname =
            CString::new(name).map_err(|_| DpdkError::Other("port name has a NUL".into()))?;
        let mut id = 0u16;
        // SAFETY: valid C string and out pointer.
        let rc = unsafe { sys::rte_eth_dev_get_port_by_name(cname.as_ptr(), &mut id) };
        if rc != 0 {
            // SAFETY: no preconditions.
            let n = unsafe { sys::rte_eth_dev_count_avail() };
            return Err(DpdkError::Other(format!(
                "no DPDK port named {name:?} ({n} ports available; a virtual device is given to EAL as --vdev {name},iface=IFACE)"
            )));
        }
        let mut info = sys::rte_eth_dev_info::default();
        // SAFETY: valid port id; info is a plain struct DPDK fills.
        let rc = unsafe { sys::rte_eth_dev_info_get(id, &mut info) };
        if rc != 0 {
            return Err(DpdkError::rte("rte_eth_dev_info_get", rc));
        }
        let driver = if info.driver_name.is_null() {
            String::from("?")
        } else {
            // SAFETY: DPDK's driver name is a static C string.
            unsafe { std::ffi::CStr::from_ptr(info.driver_name) }
                .to_string_lossy()
                .into_owned()
        };
        // net_af_xdp (22.11) registers the pool's memory with the kernel as its UMEM,
        // sized buffers x object size from the pool's first byte: a buffer beyond that
        // is refused by the kernel (received into: never; sent: dropped and never
        // completed, so the pool leaks until the port goes quiet).
        if driver.contains("af_xdp") && !pool.dense() {
            return Err(DpdkError::Other(format!(
                "port {name}: net_af_xdp shares the buffer pool's memory with the kernel and needs its buffers packed in one memory chunk; pool {} is not: buffers are packed only with IOVA as VA (add --iova-mode=va to the EAL arguments)",
                pool.name()
            )));
        }
        let rxq = cfg.rx_queues.clamp(1, info.max_rx_queues.max(1));
        let txq = cfg.tx_queues.clamp(1, info.max_tx_queues.max(1));
        let mut rss_used = 0i32;
        // SAFETY: valid port, stopped; out pointer valid.
        let rc = unsafe { sys::hv_port_configure(id, rxq, txq, i32::from(cfg.rss), &mut rss_used) };
        if rc != 0 {
            return Err(DpdkError::rte("rte_eth_dev_configure", rc));
        }
        // SAFETY: valid port id.
        let socket = unsafe { sys::rte_eth_dev_socket_id(id) };
        let socket = if socket < 0 { 0 } else { socket as u32 };
        for q in 0..rxq {
            // SAFETY: configured port; NULL conf = the driver's defaults; pool valid.
            let rc = unsafe {
                sys::rte_eth_rx_queue_setup(
                    id,
                    q,
                    cfg.rx_desc,
                    socket,
                    std::ptr::null(),
                    pool.as_ptr(),
                )
            };
            if rc != 0 {
                return Err(DpdkError::rte("rte_eth_rx_queue_setup", rc));
            }
        }
        for q in 0..txq {
            // SAFETY: as above.
            let rc = unsafe {
                sys::rte_eth_tx_queue_setup(id, q, cfg.tx_desc, socket, std::ptr::null())
            };
            if rc != 0 {
                return Err(DpdkError::rte("rte_eth_tx_queue_setup", rc));
            }
        }
        // SAFETY: every queue is set up.
        let rc = unsafe { sys::rte_eth_dev_start(id) };
        if rc != 0 {
            return Err(DpdkError::rte("rte_eth_dev_start", rc));
        }
        let mut mac = sys::rte_ether_addr::default();
        // SAFETY: valid port; out pointer valid.
        unsafe { sys::rte_eth_macaddr_get(id, &mut mac) };
        tracing::info!(
            port = name,
            driver = %driver,
            rx_queues = rxq,
            tx_queues = txq,
            rss = rss_used != 0,
            "DPDK port started"
        );
        Ok(Port {
            id,
            name: name.into(),
            rx_queues: rxq,
            tx_queues: txq,
            rss: rss_used != 0,
            mac: mac.addr_bytes,
            driver,
            started: true,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn driver(&self) -> &str {
        &self.driver
    }
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }
    pub fn rx_queue_count(&self) -> u16 {
        self.rx_queues
    }
    pub fn tx_queue_count(&self) -> u16 {
        self.tx_queues
    }
    /// Received packets are spread over the queues by hash.
    pub fn rss(&self) -> bool {
        self.rss
    }

    /// The port's queues, each to be owned by one thread. Call once.
    pub fn queues(&self) -> (Vec<RxQueue>, Vec<TxQueue>) {
        (
            (0..self.rx_queues)
                .map(|q| RxQueue {
                    port: self.id,
                    queue: q,
                })
                .collect(),
            (0..self.tx_queues)
                .map(|q| TxQueue {
                    port: self.id,
                    queue: q,
                })
                .collect(),
        )
    }

    /// Steer IPv4 TCP packets whose destination port matches `dport` under `mask` to
    /// receive queue `queue`. `Err` carries the device's reason when it cannot (most
    /// virtual devices): the caller dispatches in software instead.
    pub fn steer_tcp_dst(&self, dport: u16, mask: u16, queue: u16) -> Result<Flow> {
        let mut err = [0 as libc::c_char; 256];
        // SAFETY: started port; err is a writable buffer of the given length.
        let f = unsafe {
            sys::hv_flow_tcp_dport_to_queue(
                self.id,
                dport,
                mask,
                queue,
                err.as_mut_ptr(),
                err.len(),
            )
        };
        if f.is_null() {
            // SAFETY: the shim NUL-terminates err.
            let msg = unsafe { std::ffi::CStr::from_ptr(err.as_ptr()) }
                .to_string_lossy()
                .into_owned();
            return Err(DpdkError::Other(format!(
                "flow rule on {}: {msg}",
                self.name
            )));
        }
        Ok(Flow {
            port: self.id,
            flow: f,
        })
    }

    pub fn stats(&self) -> PortStats {
        self.stats_reader().read()
    }

    /// A handle that reads this port's counters from any thread (a shard answering a
    /// status request). Read after the port closed, it yields zeros.
    pub fn stats_reader(&self) -> PortStatsReader {
        PortStatsReader { id: self.id }
    }

    /// Stop and close the port (after every queue's owner has stopped using it).
    pub fn close(mut self) {
        self.shut();
    }

    fn shut(&mut self) {
        if self.started {
            self.started = false;
            // SAFETY: valid port; its queues are no longer polled (caller's contract).
            unsafe {
                sys::rte_eth_dev_stop(self.id);
                sys::rte_eth_dev_close(self.id);
            }
        }
    }
}

impl Drop for Port {
    fn drop(&mut self) {
        self.shut();
    }
}

/// Reads a port's counters (see [`Port::stats_reader`]).
#[derive(Clone, Copy, Debug)]
pub struct PortStatsReader {
    id: u16,
}

impl PortStatsReader {
    pub fn read(&self) -> PortStats {
        let mut s = sys::rte_eth_stats::default();
        // SAFETY: out pointer valid; DPDK checks the port id and leaves the counters
        // untouched (zeros) for a port that no longer exists. Counters are read while
        // the queues run (DPDK's own stats calls do the same): a figure may be a
        // moment old.
        unsafe { sys::rte_eth_stats_get(self.id, &mut s) };
        PortStats {
            rx_packets: s.ipackets,
            tx_packets: s.opackets,
            rx_bytes: s.ibytes,
            tx_bytes: s.obytes,
            rx_missed: s.imissed,
            rx_errors: s.ierrors,
            tx_errors: s.oerrors,
            rx_no_mbuf: s.rx_nombuf,
        }
    }
}

/// A flow rule; removed when dropped.
pub struct Flow {
    port: u16,
    flow: *mut sys::rte_flow,
}

// SAFETY: a flow handle is only passed back to rte_flow_destroy.
unsafe impl Send for Flow {}

impl Drop for Flow {
    fn drop(&mut self) {
        // SAFETY: the handle came from rte_flow_create on this port.
        unsafe { sys::hv_flow_destroy(self.port, self.flow) };
    }
}

/// Burst size of receive and transmit calls.
pub const BURST: usize = 32;

/// One receive queue (owned by one thread).
pub struct RxQueue {
    port: u16,
    queue: u16,
}

impl RxQueue {
    pub fn id(&self) -> u16 {
        self.queue
    }

    /// Receive up to [`BURST`] packets into `out`; returns how many.
    pub fn burst(&mut self, out: &mut Vec<Mbuf>) -> usize {
        let mut raw = [std::ptr::null_mut::<sys::rte_mbuf>(); BURST];
        // SAFETY: this queue is owned by the caller's thread; raw has BURST slots.
        let n = unsafe { sys::hv_rx_burst(self.port, self.queue, raw.as_mut_ptr(), BURST as u16) };
        for p in &raw[..n as usize] {
            // SAFETY: each returned mbuf is now ours.
            if let Some(m) = unsafe { Mbuf::from_raw(*p) } {
                out.push(m);
            }
        }
        n as usize
    }
}

/// One transmit queue (owned by one thread).
pub struct TxQueue {
    port: u16,
    queue: u16,
}

impl TxQueue {
    pub fn id(&self) -> u16 {
        self.queue
    }

    /// Hand the packets at the front of `pkts` to the device (at most [`BURST`] per
    /// call, repeated while the device takes them); those taken are removed from `pkts`,
    /// the rest stay for the next call (the ring is full). Returns how many were sent.
    pub fn burst(&mut self, pkts: &mut std::collections::VecDeque<Mbuf>) -> usize {
        let mut sent = 0;
        while !pkts.is_empty() {
            let n = pkts.len().min(BURST);
            let mut raw = [std::ptr::null_mut::<sys::rte_mbuf>(); BURST];
            for (i, m) in pkts.iter().take(n).enumerate() {
                raw[i] = m.raw();
            }
            // SAFETY: queue owned by this thread; the first `n` entries are valid mbufs
            // we own; those the device accepts (the first `k`) become the device's.
            let k = unsafe { sys::hv_tx_burst(self.port, self.queue, raw.as_mut_ptr(), n as u16) }
                as usize;
            for _ in 0..k {
                // The device owns these now: forget, do not free.
                if let Some(m) = pkts.pop_front() {
                    let _ = m.into_raw();
                }
            }
            sent += k;
            if k < n {
                break;
            }
        }
        sent
    }
}
