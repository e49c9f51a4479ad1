//! The limits a node is compared with: what the device does under fio, and what a loopback
//! TCP stream between two processes pinned like client and node carries.

use crate::node::pin_command;
use anyhow::{bail, Context, Result};
use hivefs_net::conn::{ConnError, FramedConn};
use hivefs_net::frame::{encode_frame, encode_frame_checked_with, PROTOCOL_VERSION_MIN};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Opcode of the frame that ends a framed stream (the sink answers with the byte count).
const END_OPCODE: u16 = 0xfff0;
/// Opcode of the frame the sink echoes before the stream starts (completes the TLS
/// handshake before the clock starts; a TLS client that never reads would otherwise buffer
/// its whole output as plaintext until the handshake completes).
const PING_OPCODE: u16 = 0xfff1;
/// Bytes per write / frame body.
const STREAM_BUF: usize = 1 << 20;

/// Which fio job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FioJob {
    /// Sequential 1 MiB O_DIRECT writes at depth 16.
    SeqWrite,
    /// Random 64 KiB O_DIRECT reads at depth 16.
    RandRead,
    /// Sequential 1 MiB O_DIRECT reads at depth 16 (of a file an earlier job laid out).
    SeqRead,
}

/// The fio binary, installing the Debian package if it is missing. `Err` says why not.
pub fn fio_bin() -> Result<PathBuf, String> {
    let find = || -> Option<PathBuf> {
        std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("fio"))
                .find(|f| f.is_file())
        })
    };
    if let Some(p) = find() {
        return Ok(p);
    }
    eprintln!("hive-perf: fio not found; trying apt-get install -y fio");
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "fio"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
    };
    let mut why = match install() {
        Ok(o) if o.status.success() => String::new(),
        Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
        Err(e) => format!("apt-get: {e}"),
    };
    if find().is_none() && !why.starts_with("apt-get:") {
        // The package lists may be missing or stale.
        let _ = Command::new("apt-get").args(["update", "-qq"]).output();
        why = match install() {
            Ok(o) if o.status.success() => String::new(),
            Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
            Err(e) => format!("apt-get: {e}"),
        };
    }
    find().ok_or_else(|| {
        format!(
            "fio is not installed and could not be installed: {}",
            if why.is_empty() {
                "apt-get reported success but no fio on PATH".into()
            } else {
                why
            }
        )
    })
}

/// Run one fio job on `file` (created/laid out by fio, `size` bytes) for `secs`, fio pinned
/// to `cpu`. Returns GB/s (decimal).
pub fn fio_run(
    fio: &Path,
    job: FioJob,
    file: &Path,
    size: u64,
    secs: u64,
    cpu: usize,
) -> Result<f64> {
    let mut last_err = String::new();
    for engine in ["io_uring", "libaio"] {
        let (rw, bs) = match job {
            FioJob::SeqWrite => ("write", "1M"),
            FioJob::RandRead => ("randread", "64k"),
            FioJob::SeqRead => ("read", "1M"),
        };
        let out = Command::new(fio)
            .arg(format!("--name=hive-perf-{rw}"))
            .arg(format!("--filename={}", file.display()))
            .arg(format!("--size={size}"))
            .arg(format!("--rw={rw}"))
            .arg(format!("--bs={bs}"))
            .arg("--iodepth=16")
            .arg("--direct=1")
            .arg(format!("--ioengine={engine}"))
            .arg("--time_based")
            .arg(format!("--runtime={secs}"))
            .arg(format!("--cpus_allowed={cpu}"))
            .arg("--randrepeat=0")
            .arg("--output-format=json")
            .output()
            .with_context(|| format!("running {}", fio.display()))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let parsed = text
            .find('{')
            .and_then(|i| serde_json::from_str::<serde_json::Value>(&text[i..]).ok());
        match parsed {
            Some(v) if out.status.success() => {
                let j = &v["jobs"][0];
                if j["error"].as_i64().unwrap_or(0) != 0 {
                    last_err = format!("fio job error {} with {engine}", j["error"]);
                    continue;
                }
                let dir = if job == FioJob::SeqWrite {
                    "write"
                } else {
                    "read"
                };
                let bw = j[dir]["bw_bytes"]
                    .as_f64()
                    .context("fio output has no bw_bytes")?;
                return Ok(bw / 1e9);
            }
            _ => {
                last_err = format!(
                    "fio with {engine} failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
    }
    bail!("{last_err}")
}

/// How a stream sink speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StreamKind {
    /// Plain TCP bytes.
    Raw,
    /// HiveFS frames (CRC32C-checked) over plain TCP.
    Framed,
    /// HiveFS frames over TLS 1.3 (rustls, as the node uses).
    Tls,
}

/// `hive-perf tcp-sink`: accept one connection, count what arrives, answer with the count.
pub fn sink_main(kind: StreamKind, tls_dir: Option<&Path>) -> Result<()> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    println!("PORT {}", l.local_addr()?.port());
    std::io::stdout().flush()?;
    let (mut s, _) = l.accept()?;
    match kind {
        StreamKind::Raw => {
            let mut buf = vec![0u8; STREAM_BUF];
            let mut n = 0u64;
            loop {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(k) => n += k as u64,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e.into()),
                }
            }
            let mut ack = n.to_le_bytes().to_vec();
            ack.extend_from_slice(&crate::util::self_cpu_secs().to_le_bytes());
            s.write_all(&ack)?;
        }
        StreamKind::Framed | StreamKind::Tls => {
            let cfg = if kind == StreamKind::Tls {
                let dir = tls_dir.context("--tls-dir is needed for a TLS sink")?;
                let read = |f: &str| {
                    std::fs::read_to_string(dir.join(f)).with_context(|| format!("reading {f}"))
                };
                Some(
                    hivefs_net::tls::server_config(
                        &read("node.pem")?,
                        &read("node.key")?,
                        &read("ca.pem")?,
                    )
                    .map_err(|e| anyhow::anyhow!("{e}"))?,
                )
            } else {
                None
            };
            let mut conn = FramedConn::new_server(s, cfg)?;
            let mut n = 0u64;
            loop {
                let f = match conn.recv_frame() {
                    Ok(f) => f,
                    Err(ConnError::Closed) => bail!("stream closed before its end frame"),
                    Err(e) => return Err(e.into()),
                };
                if f.opcode == PING_OPCODE {
                    conn.queue_frame(&encode_frame(
                        PROTOCOL_VERSION_MIN,
                        PING_OPCODE,
                        f.request_id,
                        &[],
                    ));
                    conn.flush()?;
                    continue;
                }
                if f.opcode == END_OPCODE {
                    let mut ack = n.to_le_bytes().to_vec();
                    ack.extend_from_slice(&crate::util::self_cpu_secs().to_le_bytes());
                    conn.queue_frame(&encode_frame(
                        PROTOCOL_VERSION_MIN,
                        END_OPCODE,
                        f.request_id,
                        &ack,
                    ));
                    conn.flush()?;
                    // Wait for the sender to close so the reply is surely read.
                    let _ = conn.recv_frame();
                    break;
                }
                n += f.body.len() as u64;
            }
        }
    }
    Ok(())
}

/// TLS material for a TLS sink, written to `dir`. Returns the CA fingerprint.
pub fn write_sink_tls(dir: &Path) -> Result<String> {
    std::fs::create_dir_all(dir)?;
    let ca = hivefs_net::tls::generate_ca("hive-perf").map_err(|e| anyhow::anyhow!("{e}"))?;
    let (pem, key) = hivefs_net::tls::issue_node_cert(
        &ca.cert_pem,
        &ca.key_pem,
        "localhost",
        &["127.0.0.1".into(), "localhost".into()],
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    std::fs::write(dir.join("ca.pem"), &ca.cert_pem)?;
    std::fs::write(dir.join("node.pem"), pem)?;
    std::fs::write(dir.join("node.key"), key)?;
    hivefs_net::tls::fingerprint_pem(&ca.cert_pem).map_err(|e| anyhow::anyhow!("{e}"))
}

/// A stream measurement.
pub struct StreamResult {
    pub gbps: f64,
    /// CPU seconds per GiB of the sender (this process) and of the sink.
    pub sender_cpu_per_gib: f64,
    pub sink_cpu_per_gib: f64,
    pub secs: f64,
}

fn parse_ack(b: &[u8]) -> Result<(u64, f64)> {
    if b.len() != 16 {
        bail!("bad ack of {} bytes", b.len());
    }
    Ok((
        u64::from_le_bytes(b[..8].try_into()?),
        f64::from_le_bytes(b[8..].try_into()?),
    ))
}

/// Stream for `secs` from this process (pinned where the caller is) to a `tcp-sink` child
/// pinned to `sink_cpu`. GB/s as acknowledged by the sink.
pub fn stream(
    kind: StreamKind,
    secs: f64,
    sink_cpu: usize,
    tls: Option<(&Path, &str)>,
) -> Result<StreamResult> {
    let me = std::env::current_exe()?;
    let mut cmd = Command::new(me);
    cmd.arg("tcp-sink").arg("--kind").arg(match kind {
        StreamKind::Raw => "raw",
        StreamKind::Framed => "framed",
        StreamKind::Tls => "tls",
    });
    if let Some((dir, _)) = tls {
        cmd.arg("--tls-dir").arg(dir);
    }
    cmd.stdout(Stdio::piped()).stdin(Stdio::null());
    pin_command(&mut cmd, sink_cpu);
    let mut child = cmd.spawn().context("starting tcp-sink")?;
    let result = (|| -> Result<StreamResult> {
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("sink stdout")?).read_line(&mut line)?;
        let port: u16 = line
            .trim()
            .strip_prefix("PORT ")
            .context("sink did not report its port")?
            .parse()?;
        let s = TcpStream::connect(("127.0.0.1", port))?;
        let mut payload = vec![0u8; STREAM_BUF];
        crate::util::Rng::new(crate::util::os_seed()).fill(&mut payload);
        let deadline = Duration::from_secs_f64(secs);
        match kind {
            StreamKind::Raw => {
                let mut s = s;
                let c0 = crate::util::self_cpu_secs();
                let t0 = Instant::now();
                let mut sent = 0u64;
                while t0.elapsed() < deadline {
                    s.write_all(&payload)?;
                    sent += payload.len() as u64;
                }
                s.shutdown(Shutdown::Write)?;
                let mut ack = [0u8; 16];
                s.read_exact(&mut ack)?;
                let secs = t0.elapsed().as_secs_f64();
                let (got, sink_cpu) = parse_ack(&ack)?;
                if got != sent {
                    bail!("sink counted {got} bytes, {sent} were sent");
                }
                let gib = got as f64 / crate::util::GIB;
                Ok(StreamResult {
                    gbps: got as f64 / secs / 1e9,
                    sender_cpu_per_gib: (crate::util::self_cpu_secs() - c0) / gib,
                    sink_cpu_per_gib: sink_cpu / gib,
                    secs,
                })
            }
            StreamKind::Framed | StreamKind::Tls => {
                let tls_cfg = match (kind, tls) {
                    (StreamKind::Tls, Some((_, fp))) => Some((
                        hivefs_net::tls::client_config_pinned(fp)
                            .map_err(|e| anyhow::anyhow!("{e}"))?,
                        hivefs_net::tls::server_name("127.0.0.1")
                            .map_err(|e| anyhow::anyhow!("{e}"))?,
                    )),
                    (StreamKind::Tls, None) => bail!("TLS stream without TLS material"),
                    _ => None,
                };
                s.set_nodelay(true)?;
                let mut conn = FramedConn::new_client(s, tls_cfg)?;
                conn.queue_frame(&encode_frame(PROTOCOL_VERSION_MIN, PING_OPCODE, 0, &[]));
                conn.flush()?;
                let pong = conn.recv_frame()?;
                if pong.opcode != PING_OPCODE {
                    bail!("sink answered the ping with opcode {:#x}", pong.opcode);
                }
                let check = conn.body_check();
                let mut frame: Vec<u8> = Vec::new();
                let c0 = crate::util::self_cpu_secs();
                let t0 = Instant::now();
                let mut sent = 0u64;
                let mut id = 1u64;
                while t0.elapsed() < deadline {
                    // Encode each frame as a real sender would (body CRC on plain TCP only).
                    frame.clear();
                    encode_frame_checked_with(
                        &mut frame,
                        check,
                        PROTOCOL_VERSION_MIN,
                        3,
                        id,
                        |b| b.extend_from_slice(&payload),
                    );
                    conn.queue_frame(&frame);
                    conn.flush()?;
                    sent += payload.len() as u64;
                    id += 1;
                }
                let send_secs = t0.elapsed().as_secs_f64();
                conn.queue_frame(&encode_frame(PROTOCOL_VERSION_MIN, END_OPCODE, id, &[]));
                conn.flush()?;
                let f = conn.recv_frame()?;
                if std::env::var_os("HIVE_PERF_DEBUG").is_some() {
                    eprintln!(
                        "stream {kind:?}: send loop {send_secs:.3}s, ack after {:.3}s",
                        t0.elapsed().as_secs_f64()
                    );
                }
                let secs = t0.elapsed().as_secs_f64();
                let (got, sink_cpu) = parse_ack(&f.body)?;
                if got != sent {
                    bail!("sink counted {got} bytes, {sent} were sent");
                }
                let sender_cpu = crate::util::self_cpu_secs() - c0;
                conn.send_close();
                let _ = conn.flush();
                let gib = got as f64 / crate::util::GIB;
                Ok(StreamResult {
                    gbps: got as f64 / secs / 1e9,
                    sender_cpu_per_gib: sender_cpu / gib,
                    sink_cpu_per_gib: sink_cpu / gib,
                    secs,
                })
            }
        }
    })();
    if result.is_err() {
        let _ = child.kill();
    }
    let st = child.wait()?;
    let v = result?;
    if !st.success() {
        bail!("tcp-sink exited with {st}");
    }
    Ok(v)
}
