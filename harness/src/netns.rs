//! A network lab for partition tests: `n` network namespaces, each with one veth pair
//! into a bridge in the test's own namespace, addresses `10.R.S.1..=n` (the bridge is
//! `10.R.S.254`, so the test process reaches every node). A partition is made with
//! blackhole routes inside the namespaces, so the nodes stop hearing each other while the
//! test still reaches all of them.
//!
//! Everything is named after the test process id and removed on drop (namespaces, veths,
//! the bridge). Needs root and `ip` (iproute2); [`NetLab::new`] says why when it cannot.

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
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("running ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
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
