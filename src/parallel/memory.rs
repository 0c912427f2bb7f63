//! Per-rank memory accounting: weights (sliced vs replicated), KV cache, and the process's
//! resident and peak memory as the kernel reports them.

use serde::{Deserialize, Serialize};

use crate::parallel::engine::WeightBytes;
use crate::parallel::slicing::Split;

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
    /// The whole experts this rank holds, under expert parallelism.
    #[serde(default)]
    pub experts: Option<ExpertsHeld>,
}

/// The whole experts one rank holds of each sparse layer (expert parallelism): experts
/// `first .. first + count` of `of`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpertsHeld {
    /// The first expert's number.
    pub first: usize,
    /// How many consecutive experts.
    pub count: usize,
    /// Experts per sparse layer in the model.
    pub of: usize,
}

impl ExpertsHeld {
    /// What rank `rank` holds of a plan's whole-expert split.
    pub fn of_rank(experts: &Split, rank: usize) -> Self {
        let units = experts.units(rank);
        ExpertsHeld {
            first: units.start,
            count: units.len(),
            of: experts.total_units(),
        }
    }
}

impl std::fmt::Display for ExpertsHeld {
    /// `experts 4-7 of 8`, `expert 3 of 8`, `no expert of 8`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.count {
            0 => write!(f, "no expert of {}", self.of),
            1 => write!(f, "expert {} of {}", self.first, self.of),
            n => write!(
                f,
                "experts {}-{} of {}",
                self.first,
                self.first + n - 1,
                self.of
            ),
        }
    }
}

impl RankMemory {
    /// Measures this process now.
    pub fn measure(
        rank: usize,
        weights: WeightBytes,
        kv_cache_bytes: u64,
        experts: Option<ExpertsHeld>,
    ) -> Self {
        let (resident_bytes, peak_bytes) = process_memory();
        RankMemory {
            rank,
            weights,
            kv_cache_bytes,
            resident_bytes,
            peak_bytes,
            experts,
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
        let experts = match self.experts {
            Some(held) => format!(
                "\n  weights of experts {:>12}  ({held})",
                human(self.weights.experts)
            ),
            None => String::new(),
        };
        format!(
            "rank {}\n  weights sliced     {:>12}\n  weights replicated {:>12}{experts}\n  kv cache           {:>12}\n  resident           {:>12}\n  peak resident      {:>12}",
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
    let experts = match weights.experts {
        0 => String::new(),
        bytes => format!(", whole experts {}", human(bytes)),
    };
    format!(
        "weights {} (sliced {}, replicated {}{experts})",
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
        let m = RankMemory::measure(0, WeightBytes::default(), 0, None);
        assert!(m.resident_bytes > 0 && m.peak_bytes >= m.resident_bytes);
    }

    #[test]
    fn held_experts_read_as_a_range() {
        let split = Split::even(8, 1, 3);
        let held: Vec<String> = (0..3)
            .map(|r| ExpertsHeld::of_rank(&split, r).to_string())
            .collect();
        assert_eq!(
            held,
            ["experts 0-2 of 8", "experts 3-5 of 8", "experts 6-7 of 8"]
        );
        assert_eq!(
            ExpertsHeld::of_rank(&Split::even(3, 1, 4), 3).to_string(),
            "no expert of 3"
        );
    }

    #[test]
    fn human_sizes_use_binary_units() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(3 << 20), "3.0 MiB");
    }
}
