//! `hold-write PATH DATA`: writes the bytes of file DATA into PATH from offset 0 (opened
//! for writing, not truncated), prints `written`, and keeps PATH open until its standard
//! input closes; then closes PATH and exits.
//!
//! For tests that need another host's bytes written but not yet flushed: a FUSE `flush`
//! comes with every `close` of a descriptor of the file, including the copies a test
//! process's children inherit and close at `exec`, so the test process itself cannot hold
//! such a file open while it starts other programs.

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        eprintln!("usage: hold-write PATH DATA");
        std::process::exit(2);
    }
    let data = std::fs::read(&args[2]).unwrap_or_else(|e| fail(&args[2], e));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&args[1])
        .unwrap_or_else(|e| fail(&args[1], e));
    file.write_all_at(&data, 0)
        .unwrap_or_else(|e| fail(&args[1], e));
    println!("written");
    let _ = std::io::stdout().flush();
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    drop(file);
}

fn fail(path: &str, e: std::io::Error) -> ! {
    eprintln!("hold-write: {path}: {e}");
    std::process::exit(1);
}
