//! The replication simulator across many seeds: at least 1,000,000 client puts per run of
//! the suite, with crashes, partitions, lost messages and failed writes.
//! `HIVE_REPL_SIM_SEED=N` replays one seed; `HIVE_REPL_SIM_PUTS` changes the budget.

use hivefs_engine::repl_sim::{run, ReplSimConfig, ReplSimReport};

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn one_million_replicated_puts_across_seeds() {
    let per_seed = env_u64("HIVE_REPL_SIM_PUTS_PER_SEED").unwrap_or(20_000);
    if let Some(seed) = env_u64("HIVE_REPL_SIM_SEED") {
        let r = run(&ReplSimConfig::new(seed, per_seed)).unwrap_or_else(|e| panic!("{e}"));
        eprintln!("seed {seed}: {r:?}");
        return;
    }
    let total = env_u64("HIVE_REPL_SIM_PUTS").unwrap_or(1_000_000);
    let base = env_u64("HIVE_REPL_SIM_BASE_SEED").unwrap_or(0x7e91_0000);
    let seeds = total.div_ceil(per_seed);
    let mut sum = ReplSimReport::default();
    for i in 0..seeds {
        let seed = base + i;
        let mut cfg = ReplSimConfig::new(seed, per_seed);
        // One seed in eight runs without faults: then every put must succeed.
        cfg.faults = i % 8 != 0;
        let r = run(&cfg).unwrap_or_else(|e| {
            panic!("{e}\nreplay: HIVE_REPL_SIM_SEED={seed} cargo test -p hivefs-engine --test repl_sim_seeds")
        });
        sum.add(&r);
    }
    eprintln!("{seeds} seeds: {sum:?}");
    assert!(sum.puts >= total);
    assert!(sum.crashes > seeds && sum.partitions > seeds, "{sum:?}");
    assert!(
        sum.hinted > 0 && sum.owed > 0 && sum.writes_failed > 0,
        "{sum:?}"
    );
    assert!(sum.acked > sum.puts / 2, "most puts must succeed: {sum:?}");
}
