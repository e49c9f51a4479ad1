//! Builds the binding against the system's DPDK (Debian's libdpdk-dev 22.11, found with
//! pkg-config): compiles `shim/shim.c` (the static-inline functions, which have no
//! symbol to link), generates bindings for the exported functions and types that
//! `hivefs-dpdk` uses (an allowlist: nothing else), and links the four libraries they
//! live in. Poll-mode drivers are not linked: EAL loads them as plugins at init.

use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=shim/shim.c");
    println!("cargo:rerun-if-changed=shim/shim.h");
    println!("cargo:rerun-if-changed=build.rs");
    let lib = match pkg_config::Config::new()
        .atleast_version("22.11")
        .cargo_metadata(false)
        .probe("libdpdk")
    {
        Ok(l) => l,
        Err(e) => panic!(
            "DPDK not found ({e}).\nThe `dpdk` feature needs DPDK 22.11 or later with its \
             headers and pkg-config file: on Debian/Ubuntu `apt-get install libdpdk-dev \
             libclang-dev pkg-config` (scripts/deps does it)."
        ),
    };
    // The cflags DPDK asks for (`-include rte_config.h`, `-march=corei7`, ...), minus
    // include paths, which come separately.
    let out = std::process::Command::new("pkg-config")
        .args(["--cflags-only-other", "libdpdk"])
        .output()
        .expect("running pkg-config");
    let other: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect();
    // `-include X` is two words; keep them together.
    let mut flags = Vec::new();
    let mut it = other.iter();
    while let Some(f) = it.next() {
        if f == "-include" {
            if let Some(h) = it.next() {
                flags.push(format!("-include{h}"));
            }
        } else {
            flags.push(f.clone());
        }
    }

    let mut cc = cc::Build::new();
    cc.file("shim/shim.c").opt_level(2).warnings(true);
    for p in &lib.include_paths {
        cc.include(p);
    }
    for f in &flags {
        cc.flag(f);
    }
    cc.compile("hivefs_dpdk_shim");

    let mut b = bindgen::Builder::default()
        .header("shim/shim.h")
        .use_core()
        .derive_default(true)
        .layout_tests(false)
        .generate_comments(false)
        .prepend_enum_name(false)
        .opaque_type("rte_mbuf")
        .opaque_type("rte_mempool")
        .opaque_type("rte_flow")
        .allowlist_function("hv_.*")
        .allowlist_function("rte_eal_init")
        .allowlist_function("rte_eal_cleanup")
        .allowlist_function("rte_strerror")
        .allowlist_function("rte_thread_register")
        .allowlist_function("rte_thread_unregister")
        .allowlist_function("rte_mempool_free")
        .allowlist_function("rte_mempool_avail_count")
        .allowlist_function("rte_pktmbuf_free_bulk")
        .allowlist_function("rte_eth_dev_count_avail")
        .allowlist_function("rte_eth_dev_get_port_by_name")
        .allowlist_function("rte_eth_dev_info_get")
        .allowlist_function("rte_eth_dev_socket_id")
        .allowlist_function("rte_eth_rx_queue_setup")
        .allowlist_function("rte_eth_tx_queue_setup")
        .allowlist_function("rte_eth_dev_start")
        .allowlist_function("rte_eth_dev_stop")
        .allowlist_function("rte_eth_dev_close")
        .allowlist_function("rte_eth_macaddr_get")
        .allowlist_function("rte_eth_promiscuous_enable")
        .allowlist_function("rte_eth_stats_get")
        .allowlist_function("rte_eth_link_get_nowait")
        .allowlist_function("rte_flow_flush")
        .allowlist_type("rte_eth_dev_info")
        .allowlist_type("rte_eth_stats")
        .allowlist_type("rte_ether_addr")
        .allowlist_type("rte_eth_link")
        .allowlist_type("rte_flow_error")
        .allowlist_var("RTE_MAX_ETHPORTS")
        .allowlist_var("RTE_MBUF_DEFAULT_BUF_SIZE")
        .allowlist_var("RTE_PKTMBUF_HEADROOM")
        .allowlist_var("SOCKET_ID_ANY");
    for p in &lib.include_paths {
        b = b.clang_arg(format!("-I{}", p.display()));
    }
    for f in &flags {
        if f.starts_with("-include") || f.starts_with("-march") {
            b = b.clang_arg(f);
        }
    }
    let bindings = b.generate().expect("generating DPDK bindings");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("bindings.rs");
    bindings.write_to_file(out).expect("writing bindings");

    for p in &lib.link_paths {
        println!("cargo:rustc-link-search=native={}", p.display());
    }
    for l in ["rte_ethdev", "rte_mbuf", "rte_mempool", "rte_eal"] {
        println!("cargo:rustc-link-lib=dylib={l}");
    }
    println!("cargo:version={}", lib.version);
}
