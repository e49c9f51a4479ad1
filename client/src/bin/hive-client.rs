//! `hive-client`: push files through a hive node and fetch them back.
//!
//! `put` cuts a file into chunks, uploads only those the hive lacks and writes a manifest
//! (the chunk ids in order); `get` fetches the chunks of a manifest, verifies each against
//! its id and rebuilds the file. Until volumes exist (the mount issue), a manifest is how
//! a file is named.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use hivefs_client::hive::{ClientOptions, HiveClient};
use hivefs_client::pipeline::{ChunkerConfig, Pipeline};
use hivefs_net::chunk::{ChunkId, Codec};
use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "hive-client",
    version,
    about = "Push files through a hive node and fetch them back"
)]
struct Cli {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args)]
struct Conn {
    /// A local node's data directory: host, port, token and CA fingerprint are read from it.
    #[arg(long, global = true)]
    node_dir: Option<PathBuf>,
    #[arg(long, global = true)]
    host: Option<String>,
    #[arg(long, global = true)]
    port: Option<u16>,
    #[arg(long, global = true)]
    token: Option<String>,
    /// SHA-256 fingerprint of the hive CA certificate.
    #[arg(long, global = true)]
    ca: Option<String>,
    /// Plain TCP (the node must run with --insecure).
    #[arg(long, global = true)]
    insecure: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Upload a file; write its manifest.
    Put {
        file: PathBuf,
        /// Where to write the manifest (default FILE.manifest).
        #[arg(long)]
        manifest: Option<PathBuf>,
        /// lz4, zstd or raw.
        #[arg(long, default_value = "lz4")]
        codec: String,
    },
    /// Rebuild a file from its manifest, verifying every chunk.
    Get { manifest: PathBuf, out: PathBuf },
    /// Per-shard statistics as JSON.
    Stats,
}

const MANIFEST_MAGIC: &str = "hivefs-manifest 1";

fn options(c: &Conn) -> Result<ClientOptions> {
    let (mut host, mut port, mut token, mut ca) =
        (c.host.clone(), c.port, c.token.clone(), c.ca.clone());
    if let Some(dir) = &c.node_dir {
        let cfg: toml::Value = toml::from_str(
            &std::fs::read_to_string(dir.join("hive.toml")).context("reading hive.toml")?,
        )?;
        host = host.or_else(|| cfg.get("listen").and_then(|v| v.as_str()).map(String::from));
        port = port.or_else(|| {
            cfg.get("base_port")
                .and_then(|v| v.as_integer())
                .map(|p| p as u16)
        });
        token = token.or(std::fs::read_to_string(dir.join("admin.token")).ok());
        if ca.is_none() && !c.insecure {
            let pem = std::fs::read_to_string(dir.join("ca.pem")).context("reading ca.pem")?;
            ca = Some(hivefs_net::tls::fingerprint_pem(&pem).map_err(|e| anyhow::anyhow!("{e}"))?);
        }
    }
    let host = host.unwrap_or_else(|| "127.0.0.1".into());
    let port = port.context("--port or --node-dir is required")?;
    let token = token.context("--token or --node-dir is required")?;
    if ca.is_none() && !c.insecure {
        bail!("--ca FINGERPRINT (or --node-dir) is required unless --insecure");
    }
    Ok(ClientOptions::new(
        &host,
        port,
        &token,
        if c.insecure { None } else { ca.as_deref() },
    ))
}

fn main() {
    hivefs_net::tune_allocator();
    if let Err(e) = real_main() {
        eprintln!("hive-client: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    let mut client = HiveClient::connect(&options(&cli.conn)?)?;
    match cli.cmd {
        Cmd::Put {
            file,
            manifest,
            codec,
        } => put(&mut client, &file, manifest, &codec),
        Cmd::Get { manifest, out } => get(&mut client, &manifest, &out),
        Cmd::Stats => {
            for s in client.stats()? {
                println!("{s}");
            }
            Ok(())
        }
    }
}

fn put(client: &mut HiveClient, file: &Path, manifest: Option<PathBuf>, codec: &str) -> Result<()> {
    let codec = match codec {
        "lz4" => Codec::Lz4,
        "zstd" => Codec::Zstd,
        "raw" => Codec::Raw,
        other => bail!("unknown codec {other:?} (lz4, zstd, raw)"),
    };
    let key = client.map().dedupe_key;
    let pipeline = Pipeline::new(key, ChunkerConfig::default(), codec, 0)?;
    let f = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let manifest =
        manifest.unwrap_or_else(|| PathBuf::from(format!("{}.manifest", file.display())));
    let t0 = Instant::now();
    let mut ids: Vec<(ChunkId, u32)> = Vec::new();
    // Chunking (on this thread and the pipeline's workers) overlaps with uploading (on
    // the uploader thread): a bounded queue of batches between them.
    let (tx, rx) = crossbeam_channel::bounded::<Vec<hivefs_client::pipeline::PreparedChunk>>(4);
    let (size, total) =
        std::thread::scope(|scope| -> Result<(u64, hivefs_client::hive::UploadStats)> {
            let uploader = scope.spawn(move || -> Result<hivefs_client::hive::UploadStats> {
                let mut total = hivefs_client::hive::UploadStats::default();
                for mut batch in rx {
                    let st = client.upload_in_place(&mut batch)?;
                    total.chunks += st.chunks;
                    total.deduped += st.deduped;
                    total.uploaded += st.uploaded;
                    total.raw_bytes += st.raw_bytes;
                    total.sent_bytes += st.sent_bytes;
                }
                Ok(total)
            });
            let mut batch = Vec::new();
            let read = pipeline.prepare_reader(f, |c| -> Result<()> {
                ids.push((c.id, c.raw_len));
                batch.push(c);
                if batch.len() >= 256 {
                    tx.send(std::mem::take(&mut batch))
                        .context("uploader stopped")?;
                }
                Ok(())
            });
            if !batch.is_empty() {
                let _ = tx.send(batch);
            }
            drop(tx);
            let total = uploader
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))?;
            let size = read.map_err(|e| anyhow::anyhow!("{e}"))?;
            Ok((size, total))
        })?;
    let secs = t0.elapsed().as_secs_f64();
    let mut w = BufWriter::new(std::fs::File::create(&manifest)?);
    writeln!(w, "{MANIFEST_MAGIC} {size}")?;
    for (id, len) in &ids {
        writeln!(w, "{id} {len}")?;
    }
    w.flush()?;
    println!(
        "{}: {} bytes, {} chunks, {} already in the hive, {} uploaded ({} bytes sent), {:.1} MB/s; manifest {}",
        file.display(),
        size,
        total.chunks,
        total.deduped,
        total.uploaded,
        total.sent_bytes,
        size as f64 / secs / 1e6,
        manifest.display()
    );
    Ok(())
}

fn get(client: &mut HiveClient, manifest: &Path, out: &Path) -> Result<()> {
    let r = std::io::BufReader::new(
        std::fs::File::open(manifest).with_context(|| format!("opening {}", manifest.display()))?,
    );
    let mut lines = r.lines();
    let head = lines.next().context("empty manifest")??;
    let size: u64 = head
        .strip_prefix(MANIFEST_MAGIC)
        .and_then(|s| s.trim().parse().ok())
        .context("not a hivefs manifest")?;
    let mut ids = Vec::new();
    for l in lines {
        let l = l?;
        let mut parts = l.split_whitespace();
        let id = parts
            .next()
            .and_then(ChunkId::from_hex)
            .with_context(|| format!("bad manifest line {l:?}"))?;
        ids.push(id);
    }
    let mut w = BufWriter::new(std::fs::File::create(out)?);
    let mut written = 0u64;
    for group in ids.chunks(256) {
        for (id, data) in group.iter().zip(client.get(group)?) {
            let data = data.with_context(|| format!("chunk {id} is not in the hive"))?;
            w.write_all(&data)?;
            written += data.len() as u64;
        }
    }
    w.flush()?;
    if written != size {
        bail!("rebuilt {written} bytes, manifest says {size}");
    }
    println!(
        "{}: {} bytes from {} verified chunks",
        out.display(),
        written,
        ids.len()
    );
    Ok(())
}
