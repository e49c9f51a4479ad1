//! A network lab for partition tests: `n` network namespaces, each with one veth pair
//! into a bridge in the test's own namespace, addresses `10.R.S.1..=n` (the bridge is
//! `10.R.S.254`, so the test process reaches every node). A partition is made with
//! blackhole routes inside the namespaces, so the nodes stop hearing each other while the
//! test still reaches all of them.
//!
//! Everything is named after the test process id and removed on drop (namespaces, veths,
//! the bridge). Needs root and `ip` (iproute2); [`NetLab::new`] says why when it cannot.
//!
//! [`VethLab`] is the DPDK test bed: one namespace whose end of a veth pair a node's
//! DPDK port takes (see its docs).

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::{Arc, Mutex, Weak};

/// See the module docs.
pub struct NetLab {
    tag: String,
    subnet: (u8, u8),
    bridge: String,
    namespaces: Vec<String>,
    veths: Vec<String>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    run("ip", args)
}

fn run(cmd: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("running {cmd} {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl NetLab {
    /// Make `n` namespaces joined by a bridge. `Err` says why a lab cannot be made here
    /// (not root, no `ip`, no netns support): the caller prints it and skips.
    pub fn new(n: usize) -> Result<NetLab, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("network namespaces need root".into());
        }
        let pid = std::process::id();
        let k = crate::next_lab();
        let tag = format!("hv{}{}", pid % 100_000, k);
        // A /24 per lab: spread by pid so parallel test processes do not collide.
        let subnet = (
            (100 + (pid / 250) % 100) as u8,
            ((pid % 250) as u8).wrapping_add(k as u8 * 3),
        );
        let mut lab = NetLab {
            bridge: format!("{tag}br"),
            tag,
            subnet,
            namespaces: Vec::new(),
            veths: Vec::new(),
        };
        ip(&["link", "add", &lab.bridge, "type", "bridge"])?;
        let br_addr = format!("{}/24", lab.bridge_addr());
        ip(&["addr", "add", &br_addr, "dev", &lab.bridge])?;
        ip(&["link", "set", &lab.bridge, "up"])?;
        for i in 0..n {
            let ns = format!("{}n{i}", lab.tag);
            ip(&["netns", "add", &ns])?;
            lab.namespaces.push(ns.clone());
            let host_end = format!("{}v{i}", lab.tag);
            ip(&[
                "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            lab.veths.push(host_end.clone());
            ip(&["link", "set", &host_end, "master", &lab.bridge])?;
            ip(&["link", "set", &host_end, "up"])?;
            let addr = format!("{}/24", lab.addr(i));
            ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(lab)
    }

    /// The address of node `i` (in namespace `i`).
    pub fn addr(&self, i: usize) -> String {
        format!("10.{}.{}.{}", self.subnet.0, self.subnet.1, i + 1)
    }

    fn bridge_addr(&self) -> String {
        format!("10.{}.{}.254", self.subnet.0, self.subnet.1)
    }

    /// The namespace of node `i`.
    pub fn namespace(&self, i: usize) -> &str {
        &self.namespaces[i]
    }

    /// Cut node `i` off from the other nodes (both directions); the test still reaches it.
    pub fn isolate(&self, i: usize) -> Result<(), String> {
        self.routes(i, "add")
    }

    /// Undo [`isolate`](Self::isolate).
    pub fn heal(&self, i: usize) -> Result<(), String> {
        self.routes(i, "del")
    }

    fn routes(&self, i: usize, verb: &str) -> Result<(), String> {
        for j in 0..self.namespaces.len() {
            if j == i {
                continue;
            }
            let to_j = format!("{}/32", self.addr(j));
            let to_i = format!("{}/32", self.addr(i));
            ip(&["-n", &self.namespaces[i], "route", verb, "blackhole", &to_j])?;
            ip(&["-n", &self.namespaces[j], "route", verb, "blackhole", &to_i])?;
        }
        Ok(())
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = ip(&["netns", "del", ns]);
        }
        for v in &self.veths {
            let _ = ip(&["link", "del", v]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

/// The DPDK test bed: a network namespace holding one end of a veth pair (`eth0`), whose
/// other end is attached to a bridge in the caller's namespace (the process's *segment*,
/// shared by all its labs), so kernel TCP clients reach a node's userspace stack across a
/// real veth, and the nodes of one process reach each other on one Ethernet segment.
///
/// Addresses on the segment's /24: the bridge `.254` (the caller), node `k`'s userspace
/// stack `.k+1` (no kernel has it), and the namespace's own kernel `.k+101` on a second
/// pair (`mgmt0`, the node's management interface, on the same bridge): the node's
/// control-plane traffic out (Raft, joins: kernel sockets) leaves through it. The
/// namespace answers ARP only for addresses on the interface asked (`arp_ignore=1`), so
/// `eth0` stays the userspace stack's alone whatever the driver. Offloads the userspace stack
/// cannot take (TCP segmentation, partial checksums, receive coalescing) are turned off on
/// both ends and on the bridge.
///
/// Everything is named after the process id and removed on drop (the bridge with the last
/// lab). Needs root, `ip` (iproute2) and `ethtool`; [`VethLab::new`] says why it cannot be
/// made.
pub struct VethLab {
    /// The namespace holding the node's end (`eth0`).
    pub ns: String,
    /// The caller's end of the pair (attached to the segment's bridge).
    pub host_if: String,
    /// The caller's address on the segment (the bridge's).
    pub host_addr: Ipv4Addr,
    /// The address the userspace stack takes (not configured in any kernel).
    pub node_addr: Ipv4Addr,
    /// The namespace kernel's own address, on a second pair (`mgmt0` in the namespace,
    /// `mgmt_if` here, on the same bridge): the node's management interface, which its
    /// control plane (Raft, pings, joins: kernel sockets) leaves through. `eth0` carries
    /// no kernel address: with net_af_xdp the kernel never sees its packets.
    pub kernel_addr: Ipv4Addr,
    /// The caller's end of the management pair.
    pub mgmt_if: String,
    pub prefix_len: u8,
    segment: Arc<Segment>,
}

/// The bridge all of a process's [`VethLab`]s hang on (removed when the last one goes).
struct Segment {
    bridge: String,
    net: (u8, u8),
    /// Node slots in use (1..=100).
    used: Mutex<Vec<bool>>,
}

static SEGMENT: Mutex<Weak<Segment>> = Mutex::new(Weak::new());

const OFFLOADS_OFF: [&str; 8] = ["tx", "off", "tso", "off", "gso", "off", "gro", "off"];

impl Segment {
    fn get() -> Result<Arc<Segment>, String> {
        let mut g = SEGMENT.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = g.upgrade() {
            return Ok(s);
        }
        let pid = std::process::id();
        let k = crate::next_lab();
        // A /24 per segment, spread by pid: 10.(200..250).x.0/24 (NetLab takes 100..200).
        let net = (
            (200 + (pid / 250) % 50) as u8,
            ((pid % 250) as u8).wrapping_add(k as u8 * 7),
        );
        let seg = Segment {
            bridge: format!("hd{}b{}", pid % 100_000, k % 1000),
            net,
            used: Mutex::new(vec![false; 100]),
        };
        run("ip", &["link", "add", &seg.bridge, "type", "bridge"])?;
        let seg = Arc::new(seg);
        let cidr = format!("{}/24", seg.addr(254));
        run("ip", &["addr", "add", &cidr, "dev", &seg.bridge])?;
        let mut eth = vec!["-K", seg.bridge.as_str()];
        eth.extend(OFFLOADS_OFF);
        run("ethtool", &eth)?;
        run("ip", &["link", "set", &seg.bridge, "up"])?;
        *g = Arc::downgrade(&seg);
        Ok(seg)
    }

    fn addr(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, self.net.0, self.net.1, host)
    }

    fn take_slot(&self) -> Option<u8> {
        let mut u = self.used.lock().unwrap_or_else(|p| p.into_inner());
        let i = u.iter().position(|x| !x)?;
        u[i] = true;
        Some(i as u8)
    }

    fn free_slot(&self, slot: u8) {
        self.used.lock().unwrap_or_else(|p| p.into_inner())[slot as usize] = false;
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        let _ = run("ip", &["link", "del", &self.bridge]);
    }
}

impl VethLab {
    /// Make the namespace and the pair. `Err` says why it cannot be made here.
    pub fn new() -> Result<VethLab, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("the DPDK test bed needs root (network namespaces, veth)".into());
        }
        for tool in ["ip", "ethtool"] {
            if Command::new(tool).arg("-V").output().is_err() {
                return Err(format!("the DPDK test bed needs `{tool}`"));
            }
        }
        let segment = Segment::get()?;
        let slot = segment
            .take_slot()
            .ok_or("more than 100 DPDK labs at once in one process")?;
        let pid = std::process::id();
        let k = crate::next_lab() as u32;
        let tag = format!("hd{}{}", pid % 100_000, k);
        let lab = VethLab {
            ns: format!("{tag}ns"),
            host_if: format!("{tag}h"),
            host_addr: segment.addr(254),
            node_addr: segment.addr(slot + 1),
            kernel_addr: segment.addr(slot + 101),
            mgmt_if: format!("{tag}m"),
            prefix_len: 24,
            segment,
        };
        // From here on, drop removes what exists (and frees the slot).
        let l = &lab;
        run("ip", &["netns", "add", &l.ns])?;
        run(
            "ip",
            &[
                "link", "add", &l.host_if, "type", "veth", "peer", "name", "eth0", "netns", &l.ns,
            ],
        )?;
        let mut eth = vec!["-K", l.host_if.as_str()];
        eth.extend(OFFLOADS_OFF);
        run("ethtool", &eth)?;
        run(
            "ip",
            &["link", "set", &l.host_if, "master", &l.segment.bridge],
        )?;
        run("ip", &["link", "set", &l.host_if, "up"])?;
        let mut eth = vec!["netns", "exec", l.ns.as_str(), "ethtool", "-K", "eth0"];
        eth.extend(OFFLOADS_OFF);
        run("ip", &eth)?;
        run("ip", &["-n", &l.ns, "link", "set", "eth0", "up"])?;
        run(
            "ip",
            &[
                "link", "add", &l.mgmt_if, "type", "veth", "peer", "name", "mgmt0", "netns", &l.ns,
            ],
        )?;
        run(
            "ip",
            &["link", "set", &l.mgmt_if, "master", &l.segment.bridge],
        )?;
        run("ip", &["link", "set", &l.mgmt_if, "up"])?;
        let kernel_cidr = format!("{}/{}", l.kernel_addr, l.prefix_len);
        run(
            "ip",
            &["-n", &l.ns, "addr", "add", &kernel_cidr, "dev", "mgmt0"],
        )?;
        run("ip", &["-n", &l.ns, "link", "set", "mgmt0", "up"])?;
        run(
            "ip",
            &[
                "netns",
                "exec",
                &l.ns,
                "sh",
                "-c",
                "echo 1 > /proc/sys/net/ipv4/conf/all/arp_ignore",
            ],
        )?;
        run("ip", &["-n", &l.ns, "link", "set", "lo", "up"])?;
        Ok(lab)
    }

    /// Path of the namespace, for `setns` or `nsenter --net=`.
    pub fn ns_path(&self) -> String {
        format!("/var/run/netns/{}", self.ns)
    }

    /// Move the calling thread into the node's namespace (sockets and devices it opens
    /// from then on are there; other threads are unaffected).
    pub fn enter(&self) -> std::io::Result<()> {
        let f = std::fs::File::open(self.ns_path())?;
        use std::os::fd::AsRawFd;
        // SAFETY: a valid namespace file descriptor; affects the calling thread only.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// EAL `--vdev` argument for the node's end with `driver` (`net_af_packet` or
    /// `net_af_xdp`) as port `name`.
    pub fn vdev(&self, driver: &str, index: u32, extra: &str) -> String {
        format!("{driver}{index},iface=eth0{extra}")
    }

    fn slot(&self) -> u8 {
        let o = self.node_addr.octets();
        o[3] - 1
    }
}

impl Drop for VethLab {
    fn drop(&mut self) {
        let _ = run("ip", &["link", "del", &self.host_if]);
        let _ = run("ip", &["link", "del", &self.mgmt_if]);
        let _ = run("ip", &["netns", "del", &self.ns]);
        self.segment.free_slot(self.slot());
    }
}
