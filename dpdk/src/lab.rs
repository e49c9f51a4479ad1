//! A test bed for the DPDK path: a network namespace holding one end of a veth pair
//! (`eth0`, no kernel address: the userspace stack owns the node address) and the other
//! end in the caller's namespace with a kernel address, so kernel TCP clients reach the
//! userspace stack across a real veth. Offloads the userspace stack cannot take (TCP
//! segmentation, partial checksums, receive coalescing) are turned off on both ends.
//!
//! Everything is named after the process id and removed on drop. Needs root, `ip`
//! (iproute2) and `ethtool`; [`VethLab::new`] says why it cannot be made.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// See the module docs.
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

static NEXT: AtomicU32 = AtomicU32::new(0);

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
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
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
