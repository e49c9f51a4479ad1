//! The DPDK environment abstraction layer: initialised once per process, never again
//! (DPDK cannot re-initialise it, even after `rte_eal_cleanup`).
//!
//! EAL arguments come from the caller (`hive run --eal-args`), e.g. `--no-huge -m 512
//! --file-prefix hive-X --vdev net_af_xdp0,iface=eth0` for a test bed without hugepages,
//! or `--in-memory` with reserved hugepages. `--no-huge` and `--in-memory` together are
//! refused here: that pairing leaves DPDK without shared memory for its own bookkeeping.
//! [`Eal::init`] always adds `--no-telemetry` (no socket in /var/run) and, unless given,
//! `--no-pci` is *not* added: real NICs are found on the PCI bus.

use crate::{DpdkError, Result};
use std::ffi::CString;
use std::sync::OnceLock;

/// The initialised environment. Exists at most once per process.
#[derive(Debug)]
pub struct Eal {
    args: Vec<String>,
    file_prefix: Option<String>,
}

static EAL: OnceLock<std::result::Result<Eal, String>> = OnceLock::new();

impl Eal {
    /// Initialise DPDK with `args` (without the program name). The first call decides;
    /// later calls return the same environment if their arguments are equal, else an
    /// error.
    pub fn init(args: &[String]) -> Result<&'static Eal> {
        if args.iter().any(|a| a == "--no-huge") && args.iter().any(|a| a == "--in-memory") {
            return Err(DpdkError::Other(
                "EAL arguments: --no-huge and --in-memory together are not supported \
                 (use --no-huge with --file-prefix, or --in-memory with reserved hugepages)"
                    .into(),
            ));
        }
        let r = EAL.get_or_init(|| init_once(args).map_err(|e| e.to_string()));
        match r {
            Ok(eal) if eal.args == args => Ok(eal),
            Ok(eal) => Err(DpdkError::Other(format!(
                "EAL already initialised in this process with {:?}",
                eal.args
            ))),
            Err(e) => Err(DpdkError::Other(e.clone())),
        }
    }

    /// The arguments EAL was started with.
    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// Register the calling thread with EAL (an lcore id: per-thread mempool caches).
    /// Threads not registered still work, without caches. Registration is per thread and
    /// lasts until [`Eal::unregister_thread`].
    pub fn register_thread(&self) -> Result<()> {
        // SAFETY: EAL is initialised; the call concerns the calling thread only.
        let rc = unsafe { hivefs_dpdk_sys::rte_thread_register() };
        if rc != 0 {
            return Err(DpdkError::last("rte_thread_register"));
        }
        Ok(())
    }

    /// Undo [`Eal::register_thread`] for the calling thread.
    pub fn unregister_thread(&self) {
        // SAFETY: as above; unregistering an unregistered thread is a no-op.
        unsafe { hivefs_dpdk_sys::rte_thread_unregister() }
    }

    /// Remove the runtime directory EAL made for its file prefix (`/var/run/dpdk/PREFIX`),
    /// once the process is done with DPDK. Best effort.
    pub fn remove_runtime_dir(&self) {
        if let Some(p) = &self.file_prefix {
            let _ = std::fs::remove_dir_all(format!("/var/run/dpdk/{p}"));
        }
    }
}

fn init_once(args: &[String]) -> Result<Eal> {
    let mut all = vec!["hivefs".to_string()];
    all.extend(args.iter().cloned());
    if !args
        .iter()
        .any(|a| a == "--no-telemetry" || a == "--telemetry")
    {
        all.push("--no-telemetry".into());
    }
    let file_prefix = args
        .iter()
        .position(|a| a == "--file-prefix")
        .and_then(|i| args.get(i + 1).cloned())
        .or_else(|| {
            args.iter()
                .find_map(|a| a.strip_prefix("--file-prefix=").map(str::to_string))
        });
    let cargs: Vec<CString> = all
        .iter()
        .map(|a| {
            CString::new(a.as_str())
                .map_err(|_| DpdkError::Other(format!("EAL argument {a:?} has a NUL")))
        })
        .collect::<Result<_>>()?;
    // rte_eal_init may permute argv; it gets its own array of pointers, kept alive (EAL
    // keeps pointers into it).
    let ptrs: Vec<*mut libc::c_char> = cargs.iter().map(|c| c.as_ptr() as *mut _).collect();
    let ptrs = Box::leak(ptrs.into_boxed_slice());
    std::mem::forget(cargs);
    // SAFETY: argc/argv describe valid NUL-terminated strings that live forever.
    let rc = unsafe { hivefs_dpdk_sys::rte_eal_init(ptrs.len() as i32, ptrs.as_mut_ptr()) };
    if rc < 0 {
        return Err(DpdkError::last("rte_eal_init"));
    }
    tracing::info!(args = ?args, "DPDK EAL initialised");
    Ok(Eal {
        args: args.to_vec(),
        file_prefix,
    })
}
