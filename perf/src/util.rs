//! Small helpers: CPU affinity, CPU-time accounting, latency histograms, medians, sizes,
//! a fast PRNG.

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use std::time::Duration;

pub const GIB: f64 = (1u64 << 30) as f64;

/// CPUs this machine has online (not `available_parallelism`, which shrinks to the
/// calling thread's affinity mask once it is pinned).
pub fn cpu_count() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if n > 0 {
        n as usize
    } else {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    }
}

/// Restrict the calling thread (and the threads it spawns later) to `cpus`.
pub fn pin_current_thread(cpus: &[usize]) -> Result<()> {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!(
                "sched_setaffinity({cpus:?}): {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// The calling thread's current affinity.
pub fn current_affinity() -> Vec<usize> {
    // SAFETY: as above; sched_getaffinity fills the set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return (0..cpu_count()).collect();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// Run `f` with the calling thread allowed on every CPU, then restore its affinity.
pub fn with_all_cpus<T>(f: impl FnOnce() -> T) -> T {
    let saved = current_affinity();
    let all: Vec<usize> = (0..cpu_count()).collect();
    let _ = pin_current_thread(&all);
    let r = f();
    let _ = pin_current_thread(&saved);
    r
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime (seconds) from the text of a `/proc/.../stat` file, and its `comm`.
fn parse_stat(text: &str) -> Option<(String, f64)> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text[open + 1..close].to_string();
    // Fields after ")" start at field 3 (state); utime is field 14, stime 15.
    let rest: Vec<&str> = text[close + 1..].split_whitespace().collect();
    let utime: f64 = rest.get(11)?.parse().ok()?;
    let stime: f64 = rest.get(12)?.parse().ok()?;
    Some((comm, (utime + stime) / clk_tck()))
}

/// CPU seconds (user + system) a process has used so far, all its threads included.
pub fn proc_cpu_secs(pid: i32) -> Result<f64> {
    let p = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {p}"))?;
    parse_stat(&text)
        .map(|(_, s)| s)
        .with_context(|| format!("parsing {p}"))
}

/// Per-thread CPU seconds of a live process: `(tid, comm, seconds)`.
pub fn task_cpu_secs(pid: i32) -> Vec<(i32, String, f64)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for e in rd.flatten() {
        let Ok(tid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(text) = std::fs::read_to_string(e.path().join("stat")) {
            if let Some((comm, s)) = parse_stat(&text) {
                out.push((tid, comm, s));
            }
        }
    }
    out
}

/// CPU seconds this process has used (all threads).
pub fn self_cpu_secs() -> f64 {
    // SAFETY: getrusage fills the struct.
    unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        tv(ru.ru_utime) + tv(ru.ru_stime)
    }
}

/// A latency histogram in microseconds.
#[derive(Clone)]
pub struct Lat {
    pub h: Histogram<u64>,
}

impl Default for Lat {
    fn default() -> Self {
        Lat::new()
    }
}

impl Lat {
    pub fn new() -> Lat {
        Lat {
            h: Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds"),
        }
    }

    pub fn record(&mut self, d: Duration) {
        let us = (d.as_nanos() / 1000).clamp(1, 600_000_000) as u64;
        self.h.saturating_record(us);
    }

    pub fn add(&mut self, other: &Lat) {
        let _ = self.h.add(&other.h);
    }

    pub fn count(&self) -> u64 {
        self.h.len()
    }

    /// (p50, p99, p99.9, max) in microseconds.
    pub fn percentiles(&self) -> (u64, u64, u64, u64) {
        if self.h.is_empty() {
            return (0, 0, 0, 0);
        }
        (
            self.h.value_at_quantile(0.50),
            self.h.value_at_quantile(0.99),
            self.h.value_at_quantile(0.999),
            self.h.max(),
        )
    }

    pub fn describe(&self) -> String {
        if self.h.is_empty() {
            return "no samples".into();
        }
        let (p50, p99, p999, max) = self.percentiles();
        format!(
            "p50 {} p99 {} p99.9 {} max {} (n={})",
            fmt_us(p50),
            fmt_us(p99),
            fmt_us(p999),
            fmt_us(max),
            self.count()
        )
    }
}

pub fn fmt_us(us: u64) -> String {
    if us >= 10_000 {
        format!("{:.1}ms", us as f64 / 1000.0)
    } else {
        format!("{us}us")
    }
}

/// Median (the mean of the middle two for an even count); NaN for none.
pub fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Sizes like `8G`, `512M`, `64K`, `4096` (powers of two).
pub fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let unit = s[i..].to_ascii_uppercase();
            let m: u64 = match unit.trim_end_matches("IB").trim_end_matches('B') {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                _ => bail!("unknown size unit in {s:?}"),
            };
            (&s[..i], m)
        }
        None => (s, 1),
    };
    let n: f64 = num
        .trim()
        .parse()
        .with_context(|| format!("bad size {s:?}"))?;
    if n.is_nan() || n < 0.0 {
        bail!("bad size {s:?}");
    }
    Ok((n * mult as f64) as u64)
}

/// Counts like `4M`, `100k`, `2048` (powers of ten).
pub fn parse_count(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1e3),
        Some('m' | 'M') => (&s[..s.len() - 1], 1e6),
        Some('g' | 'G') => (&s[..s.len() - 1], 1e9),
        _ => (s, 1.0),
    };
    let n: f64 = num
        .trim()
        .parse()
        .with_context(|| format!("bad count {s:?}"))?;
    Ok((n * mult) as u64)
}

pub fn fmt_size(b: u64) -> String {
    if b >= 1 << 30 && b.is_multiple_of(1 << 30) {
        format!("{}GiB", b >> 30)
    } else if b >= 1 << 20 {
        format!("{:.0}MiB", b as f64 / (1 << 20) as f64)
    } else if b >= 1 << 10 {
        format!("{:.0}KiB", b as f64 / 1024.0)
    } else {
        format!("{b}B")
    }
}

/// The workspace's seeded PRNG (benchmark payloads, random get order).
pub use hivefs_nvme::rng::SplitMix64 as Rng;

/// A seed from the kernel, so that payloads differ between processes and runs.
pub fn os_seed() -> u64 {
    let mut b = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_err()
    {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        return t.as_nanos() as u64 ^ std::process::id() as u64;
    }
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing() {
        let t = "1234 (hive run) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 3 0";
        let (comm, s) = parse_stat(t).unwrap();
        assert_eq!(comm, "hive run");
        assert!((s - 300.0 / clk_tck()).abs() < 1e-9);
    }

    #[test]
    fn medians_and_sizes() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_count("4M").unwrap(), 4_000_000);
    }
}
