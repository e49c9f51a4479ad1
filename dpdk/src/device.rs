//! A smoltcp [`Device`] over mbufs: received packets are handed to the stack as the
//! mbuf's own bytes, and the stack writes outgoing packets straight into freshly
//! allocated mbufs. No packet byte is copied between the queue and the TCP socket
//! buffers (smoltcp copies payload into and out of those, as a kernel does).
//!
//! The device does not touch queues itself: the shard feeds it the packets dispatched to
//! it ([`MbufDevice::rx`]) and takes what the stack produced ([`MbufDevice::tx`]) to
//! transmit in bursts.

use crate::mbuf::{Mbuf, Mempool};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use std::collections::VecDeque;
use std::sync::Arc;

/// Ethernet frame size the stack uses: 1500-byte MTU plus the 14-byte header.
pub const FRAME_MTU: usize = 1514;

/// See the module docs.
pub struct MbufDevice {
    pool: Arc<Mempool>,
    /// Packets waiting for the stack.
    pub rx: VecDeque<Mbuf>,
    /// Packets the stack made, waiting for a transmit burst.
    pub tx: VecDeque<Mbuf>,
    /// Packets the stack wanted to send while the pool was empty (lost; TCP resends).
    pub tx_dropped: u64,
}

impl MbufDevice {
    pub fn new(pool: Arc<Mempool>) -> MbufDevice {
        MbufDevice {
            pool,
            rx: VecDeque::new(),
            tx: VecDeque::new(),
            tx_dropped: 0,
        }
    }
}

pub struct MbufRx(Mbuf);

impl phy::RxToken for MbufRx {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        f(self.0.data())
    }
}

pub struct MbufTx<'a> {
    pool: &'a Mempool,
    tx: &'a mut VecDeque<Mbuf>,
    dropped: &'a mut u64,
}

impl phy::TxToken for MbufTx<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        if let Some(mut m) = self.pool.alloc() {
            if let Some(buf) = m.append(len) {
                let r = f(buf);
                self.tx.push_back(m);
                return r;
            }
        }
        // No buffer: the stack still builds its packet (it must), and it is lost.
        *self.dropped += 1;
        let mut scratch = vec![0u8; len];
        f(&mut scratch)
    }
}

impl Device for MbufDevice {
    type RxToken<'a> = MbufRx;
    type TxToken<'a> = MbufTx<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(MbufRx, MbufTx<'_>)> {
        let m = self.rx.pop_front()?;
        Some((
            MbufRx(m),
            MbufTx {
                pool: &self.pool,
                tx: &mut self.tx,
                dropped: &mut self.tx_dropped,
            },
        ))
    }

    fn transmit(&mut self, _now: Instant) -> Option<MbufTx<'_>> {
        Some(MbufTx {
            pool: &self.pool,
            tx: &mut self.tx,
            dropped: &mut self.tx_dropped,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = FRAME_MTU;
        caps
    }
}
