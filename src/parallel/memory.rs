//! Per-rank memory accounting: weights (sliced vs replicated), KV cache, and the process's
//! resident and peak memory as the kernel reports them.

use serde::{Deserialize, Serialize};

use crate::parallel::engine::WeightBytes;

/// One rank's memory use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankMemory {
    /// The rank.
    pub rank: usize,
    /// Bytes of weights held.
    pub weights: WeightBytes,
    /// Bytes of the key/value cache.
    pub kv_cache_bytes: u64,
    /// Resident set size now (`VmRSS`).
    pub resident_bytes: u64,
    /// Peak resident set size (`VmHWM`).
    pub peak_bytes: u64,
}

impl RankMemory {
    /// Measures this process now.
    pub fn measure(rank: usize, weights: WeightBytes, kv_cache_bytes: u64) -> Self {
        let (resident_bytes, peak_bytes) = process_memory();
        RankMemory {
            rank,
            weights,
            kv_cache_bytes,
            resident_bytes,
            peak_bytes,
        }
    }

    /// A one-line summary (`verbose=simple`).
    pub fn simple_line(&self) -> String {
        format!(
            "rank {}: {}, peak {}",
            self.rank,
            weights_summary(&self.weights),
            human(self.peak_bytes)
        )
    }

    /// A multi-line breakdown (`verbose=detail`).
    pub fn detail_lines(&self) -> String {
        format!(
            "rank {}\n  weights sliced     {:>12}\n  weights replicated {:>12}\n  kv cache           {:>12}\n  resident           {:>12}\n  peak resident      {:>12}",
            self.rank,
            human(self.weights.sliced),
            human(self.weights.replicated),
            human(self.kv_cache_bytes),
            human(self.resident_bytes),
            human(self.peak_bytes)
        )
    }
}

/// `weights X (sliced Y, replicated Z)`: a rank's weights as `--verbose simple` prints them
/// after loading and `inspect` forecasts them.
pub fn weights_summary(weights: &WeightBytes) -> String {
    format!(
        "weights {} (sliced {}, replicated {})",
        human(weights.total()),
        human(weights.sliced),
        human(weights.replicated)
    )
}

/// Formats a byte count with a binary unit.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `(VmRSS, VmHWM)` in bytes from `/proc/self/status`; zeros where unavailable.
fn process_memory() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_resident_memory() {
        let m = RankMemory::measure(0, WeightBytes::default(), 0);
        assert!(m.resident_bytes > 0 && m.peak_bytes >= m.resident_bytes);
    }

    #[test]
    fn human_sizes_use_binary_units() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(3 << 20), "3.0 MiB");
    }
}
