//! Raw bindings to DPDK 22.11 as installed on the system (see `build.rs`). Everything
//! here is `unsafe` C; the safe API is the `hivefs-dpdk` crate. Only the functions the
//! project uses are bound (a bindgen allowlist); static-inline DPDK functions are reached
//! through the `hv_*` shim functions (`shim/shim.h`).
#![allow(
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    dead_code
)]
#![allow(clippy::all)]

include!(concat!(env!("OUT_DIR"), "/bindings.rs"));
