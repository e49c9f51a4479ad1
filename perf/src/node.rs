//! Which node to measure: one attached to (`--node-dir`) or one spawned here (`--spawn`),
//! and the CPU time its process uses.

use crate::util;
use anyhow::{bail, Context, Result};
use hivefs_client::hive::ClientOptions;
use std::io::Read;
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How to reach a node and whose CPU time to charge.
#[derive(Clone, Debug)]
pub struct NodeInfo {
    pub label: String,
    pub host: String,
    pub base_port: u16,
    pub shards: u16,
    pub token: String,
    /// CA fingerprint for TLS; `None` = plain TCP (the node runs with `--insecure`).
    pub fingerprint: Option<String>,
    /// The node process, for CPU accounting.
    pub pid: Option<i32>,
    /// Why there is no CPU accounting, when `pid` is `None`.
    pub no_pid_reason: String,
}

impl NodeInfo {
    pub fn tls(&self) -> bool {
        self.fingerprint.is_some()
    }

    pub fn mode(&self) -> &'static str {
        if self.tls() {
            "tls"
        } else {
            "insecure"
        }
    }

    pub fn client_options(&self) -> ClientOptions {
        let mut o = ClientOptions::new(
            &self.host,
            self.base_port,
            &self.token,
            self.fingerprint.as_deref(),
        );
        o.client_name = format!("hive-perf/{}", std::process::id());
        o
    }

    /// Node CPU seconds so far (`None` without a pid, or if the process is gone).
    pub fn cpu_secs(&self) -> Option<f64> {
        self.pid.and_then(|p| util::proc_cpu_secs(p).ok())
    }

    pub fn task_cpu(&self) -> Vec<(i32, String, f64)> {
        self.pid.map(util::task_cpu_secs).unwrap_or_default()
    }

    /// Read token, CA and ports from a data directory.
    pub fn from_dir(dir: &Path, insecure: bool, pid: Option<i32>) -> Result<NodeInfo> {
        let toml = std::fs::read_to_string(dir.join("hive.toml"))
            .with_context(|| format!("reading {}/hive.toml", dir.display()))?;
        let get = |k: &str| -> Option<String> {
            toml.lines().find_map(|l| {
                let (key, v) = l.split_once('=')?;
                (key.trim() == k).then(|| v.trim().trim_matches('"').to_string())
            })
        };
        // Where clients reach the node: its advertised address (a DPDK node's address is
        // its userspace stack's), else where it listens (a wildcard: this host).
        let host = get("advertise")
            .or_else(|| get("listen"))
            .filter(|h| h != "0.0.0.0" && h != "::")
            .unwrap_or_else(|| "127.0.0.1".into());
        let base_port: u16 = get("base_port")
            .context("hive.toml has no base_port")?
            .parse()
            .context("base_port")?;
        let shards: u16 = get("shards")
            .context("hive.toml has no shards")?
            .parse()
            .context("shards")?;
        let token = std::fs::read_to_string(dir.join("admin.token"))
            .context("reading admin.token")?
            .trim()
            .to_string();
        let fingerprint = if insecure {
            None
        } else {
            let pem = std::fs::read_to_string(dir.join("ca.pem")).context("reading ca.pem")?;
            Some(
                hivefs_net::tls::fingerprint_pem(&pem)
                    .map_err(|e| anyhow::anyhow!("ca.pem: {e}"))?,
            )
        };
        let no_pid_reason = if pid.is_some() {
            String::new()
        } else {
            "attached without --node-pid: node CPU time is not measured".into()
        };
        Ok(NodeInfo {
            label: format!(
                "{} ({})",
                dir.display(),
                if insecure { "insecure" } else { "tls" }
            ),
            host,
            base_port,
            shards,
            token,
            fingerprint,
            pid,
            no_pid_reason,
        })
    }
}

/// A node this process created and runs: stopped (SIGTERM) and deleted on drop unless kept.
pub struct SpawnedNode {
    child: Option<Child>,
    pub info: NodeInfo,
    pub dir: PathBuf,
    keep: bool,
}

/// A base port with `n` consecutive free ports on 127.0.0.1.
pub fn free_base_port(n: u16) -> Result<u16> {
    for _ in 0..50 {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        let p = l.local_addr()?.port();
        drop(l);
        if p as u32 + n as u32 > 65535 {
            continue;
        }
        let ok = (0..n).all(|i| std::net::TcpListener::bind(("127.0.0.1", p + i)).is_ok());
        if ok {
            return Ok(p);
        }
    }
    bail!("no {n} consecutive free ports found")
}

/// Make `cmd` a child this process owns: in its own process group (a terminal's Ctrl-C
/// reaches only `hive-perf`, which then stops its children in order: unmount before the
/// node) and sent `death_signal` if this process dies first (`PR_SET_PDEATHSIG`: fires
/// when the spawning *thread* ends, so spawn from the main thread).
pub fn own_child(cmd: &mut Command, death_signal: libc::c_int) {
    cmd.process_group(0);
    // SAFETY: prctl and getppid are async-signal-safe; nothing else runs before exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                death_signal as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() == 1 {
                // The parent died before prctl took effect.
                return Err(std::io::Error::other("parent exited"));
            }
            Ok(())
        });
    }
}

/// Run `cmd` pinned to `cpu` (the child sets its own affinity before exec).
pub fn pin_command(cmd: &mut Command, cpu: usize) {
    // SAFETY: the closure calls only async-signal-safe libc functions.
    unsafe {
        cmd.pre_exec(move || {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Set `KEY = VALUE` lines of `dir/hive.toml` (later pairs win); every key must already
/// be there (a typo is an error, not a silently ignored line).
pub fn set_toml_keys(dir: &Path, sets: &[(String, String)]) -> Result<()> {
    let cfg_path = dir.join("hive.toml");
    let cfg = std::fs::read_to_string(&cfg_path)
        .with_context(|| format!("reading {}", cfg_path.display()))?;
    let mut used = vec![false; sets.len()];
    let cfg: String = cfg
        .lines()
        .map(|l| {
            let key = l.split_once('=').map(|(k, _)| k.trim()).unwrap_or("");
            match sets.iter().rposition(|(k, _)| k == key) {
                Some(i) => {
                    for (u, (k, _)) in used.iter_mut().zip(sets) {
                        *u |= k == key;
                    }
                    format!("{key} = {}", sets[i].1)
                }
                None => l.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n";
    if let Some(i) = used.iter().position(|u| !u) {
        bail!("{}: no such key in {}", sets[i].0, cfg_path.display());
    }
    std::fs::write(&cfg_path, cfg)?;
    Ok(())
}

/// The value of `key` in `dir/hive.toml` (top-level `key = value` lines; quotes trimmed).
pub fn toml_key(dir: &Path, key: &str) -> Result<String> {
    let text = std::fs::read_to_string(dir.join("hive.toml"))
        .with_context(|| format!("reading {}/hive.toml", dir.display()))?;
    text.lines()
        .find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == key).then(|| v.trim().trim_matches('"').to_string())
        })
        .with_context(|| format!("{}/hive.toml has no {key}", dir.display()))
}

impl SpawnedNode {
    /// `hive init` a one-off node in `dir` (device `dir/chunks.dev`, sparse `size`), turn
    /// off its own core pinning, and `hive run` it pinned to `core` (`None`: unpinned).
    /// Its metadata port (`base_port - 1`) is free too.
    #[allow(clippy::too_many_arguments)]
    pub fn spawn(
        hive_bin: &Path,
        dir: &Path,
        size: &str,
        shards: u16,
        insecure: bool,
        core: Option<usize>,
        keep: bool,
        overrides: &[(String, String)],
    ) -> Result<SpawnedNode> {
        if dir.exists() {
            bail!("{} already exists", dir.display());
        }
        // One more port below the shards' for the metadata service.
        let base_port = free_base_port(shards + 1)? + 1;
        let out = Command::new(hive_bin)
            .args(["init", "--data"])
            .arg(dir)
            .args([
                "--size",
                size,
                "--shards",
                &shards.to_string(),
                "--base-port",
                &base_port.to_string(),
                "--segment-size",
                "64M",
            ])
            .env("HIVE_LOG", "warn")
            .output()
            .with_context(|| format!("running {} init", hive_bin.display()))?;
        if !out.status.success() {
            bail!(
                "hive init failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // The node would pin shard i to core i % cores (shard 0 to core 0, where the client
        // runs): turn that off and pin the whole process to `core` instead.
        let mut sets: Vec<(String, String)> = vec![("pin_cores".into(), "false".into())];
        sets.extend(overrides.iter().cloned());
        set_toml_keys(dir, &sets).context("--node-set")?;

        let log = std::fs::File::create(dir.join("hive.log"))?;
        let mut cmd = Command::new(hive_bin);
        cmd.args(["run", "--data"]).arg(dir);
        if insecure {
            cmd.arg("--insecure");
        }
        cmd.env(
            "HIVE_LOG",
            std::env::var("HIVE_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
        if let Some(core) = core {
            pin_command(&mut cmd, core);
        }
        own_child(&mut cmd, libc::SIGTERM);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {} run", hive_bin.display()))?;
        let pid = child.id() as i32;
        let mut info = NodeInfo::from_dir(dir, insecure, Some(pid))?;
        info.label = format!(
            "spawned {} node (pid {pid}, {}, port {base_port})",
            if insecure { "insecure" } else { "tls" },
            core.map_or("unpinned".to_string(), |c| format!("core {c}"))
        );
        let mut node = SpawnedNode {
            child: Some(child),
            info,
            dir: dir.to_path_buf(),
            keep,
        };
        node.wait_ready(Duration::from_secs(60))?;
        Ok(node)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let t0 = Instant::now();
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Some(st) = c.try_wait()? {
                    self.child = None;
                    bail!("hive run exited early ({st}); log:\n{}", self.log_tail());
                }
            }
            let up = (0..self.info.shards).all(|s| {
                TcpStream::connect((self.info.host.as_str(), self.info.base_port + s)).is_ok()
            });
            if up {
                return Ok(());
            }
            if t0.elapsed() > timeout {
                bail!(
                    "hive run did not listen within {timeout:?}; log:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_tail(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(self.dir.join("hive.log")) {
            let _ = f.read_to_string(&mut s);
        }
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// SIGTERM, wait (up to 30 s), SIGKILL if still running.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // SAFETY: kill with a pid we own.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let t0 = Instant::now();
        loop {
            if let Some(st) = child.try_wait()? {
                if !st.success() {
                    bail!("hive run exited with {st}; log:\n{}", self.log_tail());
                }
                return Ok(());
            }
            if t0.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                let _ = child.wait();
                bail!("hive run did not stop within 30 s of SIGTERM; killed");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for SpawnedNode {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("hive-perf: stopping {}: {e:#}", self.info.label);
        }
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The `hive` binary: `--hive-bin`, else next to this executable.
pub fn find_hive_bin(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let me = std::env::current_exe()?;
    let p = me
        .parent()
        .context("own executable has no directory")?
        .join("hive");
    if !p.exists() {
        bail!("no hive binary at {} (build it: cargo build --release -p hivefs-engine, or pass --hive-bin)", p.display());
    }
    Ok(p)
}
