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

/// The DPDK test bed: a network namespace holding one end of a veth pair
/// (`eth0`, no kernel address: the userspace stack owns the node address) and the other
/// end in the caller's namespace with a kernel address, so kernel TCP clients reach the
/// userspace stack across a real veth. Offloads the userspace stack cannot take (TCP
/// segmentation, partial checksums, receive coalescing) are turned off on both ends.
///
/// Everything is named after the process id and removed on drop. Needs root, `ip`
/// (iproute2) and `ethtool`; [`VethLab::new`] says why it cannot be made.
pub struct VethLab {
    /// The namespace holding the node's end (`eth0`).
    pub ns: String,
    /// The caller's end of the pair.
    pub host_if: String,
    pub host_addr: Ipv4Addr,
    /// The address the userspace stack takes (not configured in any kernel).
    pub node_addr: Ipv4Addr,
    pub prefix_len: u8,
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
        let pid = std::process::id();
        let k = crate::next_lab() as u32;
        let tag = format!("hd{}{}", pid % 100_000, k);
        // A /24 per lab, spread by pid: 10.(150..200).x.0/24.
        let a = (150 + (pid / 250) % 50) as u8;
        let b = ((pid % 250) as u8).wrapping_add(k as u8 * 7);
        let lab = VethLab {
            ns: format!("{tag}ns"),
            host_if: format!("{tag}h"),
            host_addr: Ipv4Addr::new(10, a, b, 1),
            node_addr: Ipv4Addr::new(10, a, b, 2),
            prefix_len: 24,
        };
        run("ip", &["netns", "add", &lab.ns])?;
        // From here on, drop removes what exists.
        run(
            "ip",
            &[
                "link",
                "add",
                &lab.host_if,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &lab.ns,
            ],
        )?;
        let host_cidr = format!("{}/{}", lab.host_addr, lab.prefix_len);
        run("ip", &["addr", "add", &host_cidr, "dev", &lab.host_if])?;
        run(
            "ethtool",
            &[
                "-K",
                &lab.host_if,
                "tx",
                "off",
                "tso",
                "off",
                "gso",
                "off",
                "gro",
                "off",
            ],
        )?;
        run("ip", &["link", "set", &lab.host_if, "up"])?;
        run(
            "ip",
            &[
                "netns", "exec", &lab.ns, "ethtool", "-K", "eth0", "tx", "off", "tso", "off",
                "gso", "off", "gro", "off",
            ],
        )?;
        run("ip", &["-n", &lab.ns, "link", "set", "eth0", "up"])?;
        run("ip", &["-n", &lab.ns, "link", "set", "lo", "up"])?;
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
}

impl Drop for VethLab {
    fn drop(&mut self) {
        let _ = run("ip", &["link", "del", &self.host_if]);
        let _ = run("ip", &["netns", "del", &self.ns]);
    }
}
