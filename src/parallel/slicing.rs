//! Which part of each split dimension a rank owns: pure arithmetic, no I/O.
//!
//! Dimensions are split in whole units (a head is `head_dim` elements, a vocabulary row is one)
//! as evenly as possible: the first `total % ranks` ranks get one unit more. Grouped-query
//! attention splits the key/value heads and gives each rank the query heads of its groups, so
//! that 9 heads over 3 KV groups on 2 ranks become 6 + 3 heads. Every rank must own at least one
//! KV head; beyond that number of ranks the split is refused.

use std::ops::Range;

use crate::checkpoint::{Family, ModelConfig};
use crate::error::{Error, Result};
use crate::policy::Partition;

/// How one dimension is divided among ranks, in whole units.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    unit: usize,
    counts: Vec<usize>,
}

impl Split {
    /// Splits `total_units` units of `unit` elements over `ranks` as evenly as possible.
    pub fn even(total_units: usize, unit: usize, ranks: usize) -> Self {
        let base = total_units / ranks;
        let extra = total_units % ranks;
        let counts = (0..ranks).map(|r| base + usize::from(r < extra)).collect();
        Split { unit, counts }
    }

    /// A split with explicit per-rank unit counts.
    pub fn from_counts(unit: usize, counts: Vec<usize>) -> Self {
        Split { unit, counts }
    }

    /// The units rank `rank` owns.
    pub fn units(&self, rank: usize) -> Range<usize> {
        let start: usize = self.counts[..rank].iter().sum();
        start..start + self.counts[rank]
    }

    /// The elements rank `rank` owns (units times unit width).
    pub fn elements(&self, rank: usize) -> Range<usize> {
        let units = self.units(rank);
        units.start * self.unit..units.end * self.unit
    }

    /// Number of units rank `rank` owns.
    pub fn count(&self, rank: usize) -> usize {
        self.counts[rank]
    }

    /// Elements in the whole dimension.
    pub fn total_elements(&self) -> usize {
        self.counts.iter().sum::<usize>() * self.unit
    }

    /// Per-rank unit counts.
    pub fn counts(&self) -> &[usize] {
        &self.counts
    }
}

/// Every split dimension of one model at one world size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Number of ranks.
    pub world_size: usize,
    /// Query heads.
    pub heads: Split,
    /// Key/value heads.
    pub kv_heads: Split,
    /// The MLP's hidden width.
    pub intermediate: Split,
    /// Vocabulary rows.
    pub vocab: Split,
}

impl Plan {
    /// Plans the split of `config` over `world_size` ranks, or explains why it is impossible.
    pub fn new(config: &ModelConfig, world_size: usize) -> Result<Self> {
        if world_size == 0 {
            return Err(Error::TooManyRanks {
                ranks: 0,
                reason: "at least one rank is needed".into(),
            });
        }
        if world_size > config.num_kv_heads {
            return Err(Error::TooManyRanks {
                ranks: world_size,
                reason: format!(
                    "the model has {} key/value heads and every rank needs at least one; use at most {} ranks",
                    config.num_kv_heads, config.num_kv_heads
                ),
            });
        }
        let group = config.num_heads / config.num_kv_heads;
        let kv_heads = Split::even(config.num_kv_heads, config.head_dim, world_size);
        let heads = Split::from_counts(
            config.head_dim,
            kv_heads.counts().iter().map(|c| c * group).collect(),
        );
        Ok(Plan {
            world_size,
            intermediate: balanced_intermediate(config, &heads, &kv_heads),
            heads,
            kv_heads,
            vocab: Split::even(config.vocab_size, 1, world_size),
        })
    }

    /// The split of a partitioned dimension.
    pub fn split(&self, partition: Partition) -> &Split {
        match partition {
            Partition::Heads => &self.heads,
            Partition::KvHeads => &self.kv_heads,
            Partition::Intermediate => &self.intermediate,
            Partition::Vocab => &self.vocab,
        }
    }
}

/// Splits the MLP so that every rank holds about the same number of layer weights: a rank with
/// fewer attention heads (an uneven head split) gets more of the MLP. With an even head split
/// this is the even split. Every rank keeps at least one unit.
fn balanced_intermediate(config: &ModelConfig, heads: &Split, kv_heads: &Split) -> Split {
    let ranks = heads.counts().len();
    let (hidden, head_dim) = (config.hidden_size as f64, config.head_dim as f64);
    // Weights per MLP unit: gate, up and down for SwiGLU; in and out otherwise.
    let per_unit = hidden
        * if config.family == Family::Llama {
            3.0
        } else {
            2.0
        };
    // q and o per query head, k and v per key/value head.
    let attention: Vec<f64> = (0..ranks)
        .map(|r| 2.0 * hidden * head_dim * (heads.count(r) + kv_heads.count(r)) as f64)
        .collect();
    let total = config.intermediate_size;
    let target = (attention.iter().sum::<f64>() + total as f64 * per_unit) / ranks as f64;
    let mut counts: Vec<usize> = attention
        .iter()
        .map(|a| ((target - a) / per_unit).round().max(1.0) as usize)
        .collect();
    let floor = usize::from(total >= ranks);
    while counts.iter().sum::<usize>() < total {
        let smallest = (0..ranks).min_by_key(|&r| counts[r]).unwrap_or(0);
        counts[smallest] += 1;
    }
    while counts.iter().sum::<usize>() > total {
        let largest = (0..ranks)
            .filter(|&r| counts[r] > floor)
            .max_by_key(|&r| counts[r])
            .unwrap_or(0);
        counts[largest] -= 1;
    }
    Split::from_counts(1, counts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::config::RawConfig;

    fn config(heads: usize, kv: usize) -> ModelConfig {
        let json = format!(
            r#"{{"model_type":"llama","vocab_size":10,"hidden_size":{},"num_hidden_layers":1,
            "num_attention_heads":{heads},"num_key_value_heads":{kv},"intermediate_size":7}}"#,
            heads * 8
        );
        serde_json::from_str::<RawConfig>(&json)
            .unwrap()
            .resolve()
            .unwrap()
    }

    #[test]
    fn uneven_units_go_to_the_first_ranks() {
        let s = Split::even(10, 1, 3);
        assert_eq!(s.counts(), &[4, 3, 3]);
        assert_eq!(s.units(0), 0..4);
        assert_eq!(s.units(2), 7..10);
        assert_eq!(s.total_elements(), 10);
    }

    #[test]
    fn smollm_heads_split_by_kv_group_over_two_ranks() {
        let plan = Plan::new(&config(9, 3), 2).unwrap();
        assert_eq!(plan.kv_heads.counts(), &[2, 1]);
        assert_eq!(plan.heads.counts(), &[6, 3]);
        assert_eq!(plan.heads.elements(1), 48..72);
        // Rank 0 holds twice the attention heads, so it gets less of the MLP.
        assert_eq!(plan.intermediate.counts(), &[1, 6]);
        assert_eq!(plan.vocab.counts(), &[5, 5]);
    }

    #[test]
    fn smollm2_mlp_split_balances_its_uneven_attention_heads() {
        let json = r#"{"model_type":"llama","vocab_size":49152,"hidden_size":576,"num_hidden_layers":30,
            "num_attention_heads":9,"num_key_value_heads":3,"intermediate_size":1536}"#;
        let cfg = serde_json::from_str::<RawConfig>(json)
            .unwrap()
            .resolve()
            .unwrap();
        let plan = Plan::new(&cfg, 2).unwrap();
        assert_eq!(plan.intermediate.counts(), &[683, 853]);
        let weights = |r: usize| {
            2 * 576 * 64 * (plan.heads.count(r) + plan.kv_heads.count(r))
                + 3 * 576 * plan.intermediate.count(r)
        };
        assert!(
            weights(0).abs_diff(weights(1)) <= 3 * 576,
            "{} vs {}",
            weights(0),
            weights(1)
        );
    }

    #[test]
    fn an_even_head_split_keeps_the_even_mlp_split() {
        let plan = Plan::new(&config(8, 4), 2).unwrap();
        assert_eq!(plan.heads.counts(), &[4, 4]);
        assert_eq!(plan.intermediate.counts(), &[4, 3]);
    }

    #[test]
    fn every_rank_count_up_to_the_kv_heads_works_and_covers_everything() {
        let cfg = config(8, 4);
        for ranks in 1..=4 {
            let plan = Plan::new(&cfg, ranks).unwrap();
            let covered: usize = (0..ranks).map(|r| plan.heads.elements(r).len()).sum();
            assert_eq!(covered, 64);
            assert_eq!(plan.heads.elements(ranks - 1).end, 64);
        }
    }

    #[test]
    fn more_ranks_than_kv_heads_is_a_clear_error() {
        let err = Plan::new(&config(8, 4), 5).unwrap_err().to_string();
        assert!(
            err.contains("5 ranks") && err.contains("4 key/value heads"),
            "{err}"
        );
    }
}
