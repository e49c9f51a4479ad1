//! The deterministic simulator across many seeds: at least 1,000,000 operations per run of
//! the suite. `HIVE_SIM_SEED=N` replays one seed; `HIVE_SIM_OPS` changes the budget.

use hivefs_engine::sim::{run, SimConfig};

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn one_million_operations_across_seeds() {
    let ops_per_seed = env_u64("HIVE_SIM_OPS_PER_SEED").unwrap_or(25_000);
    if let Some(seed) = env_u64("HIVE_SIM_SEED") {
        let r = run(&SimConfig::new(seed, ops_per_seed)).unwrap_or_else(|e| panic!("{e}"));
        eprintln!("seed {seed}: {r:?}");
        return;
    }
    let total = env_u64("HIVE_SIM_OPS").unwrap_or(1_000_000);
    let base = env_u64("HIVE_SIM_BASE_SEED").unwrap_or(0x5eed_0000);
    let seeds = total.div_ceil(ops_per_seed);
    let mut sum = hivefs_engine::sim::SimReport::default();
    for i in 0..seeds {
        let seed = base + i;
        let r = run(&SimConfig::new(seed, ops_per_seed)).unwrap_or_else(|e| {
            panic!("{e}\nreplay: HIVE_SIM_SEED={seed} cargo test -p hivefs-engine --test sim_seeds")
        });
        sum.add(&r);
    }
    eprintln!("{seeds} seeds: {sum:?}");
    assert!(sum.ops >= total);
    assert!(sum.crashes > seeds, "crashes must happen: {sum:?}");
    assert!(sum.poison_rejected > 0 && sum.deletes_acked > 0, "{sum:?}");
    assert!(
        sum.summaries_replayed > 0,
        "sealed segments must be replayed from summaries: {sum:?}"
    );
    assert!(
        sum.continuations_replayed > 0,
        "segments resumed after restarts must replay: {sum:?}"
    );
    assert!(
        sum.segments_compacted > seeds && sum.compaction_chunks_moved > 0,
        "segments must be compacted and reused: {sum:?}"
    );
    assert!(
        sum.tombstones_carried > 0 && sum.tombstones_dropped > 0,
        "compaction must both carry and drop tombstones: {sum:?}"
    );
    assert!(sum.puts_no_space > 0, "the device must fill up: {sum:?}");
    assert!(
        sum.puts_raised > seeds,
        "puts at higher levels must raise stored chunks: {sum:?}"
    );
}

/// Seeds that once failed stay here as regression tests.
#[test]
fn regression_seeds() {
    {
        let seed = 7u64;
        run(&SimConfig::new(seed, 20_000)).unwrap_or_else(|e| panic!("{e}"));
    }
}
