//! Which part of each split dimension a rank owns: pure arithmetic, no I/O.
//!
//! Dimensions are split in whole units (a head is `head_dim` elements, a vocabulary row is one)
//! as evenly as possible: the first `total % ranks` ranks get one unit more. Query heads are
//! split evenly too, and each rank holds the key/value heads its query heads read: under
//! grouped-query attention a key/value head whose group straddles two ranks is held by both.
//! So 9 heads over 3 KV groups on 2 ranks become 5 + 4 heads with KV heads {0, 1} and {1, 2}:
//! both ranks do the same attention work and meet at the all-reduce together. Every rank must
//! own at least one query head; beyond that number of ranks the split is refused.

use std::ops::Range;

use crate::checkpoint::ModelConfig;
use crate::error::{Error, Result};
use crate::policy::Partition;

/// How one dimension is divided among ranks, in whole units: each rank owns a contiguous range
/// of units (ranges may overlap where a unit is replicated on neighbouring ranks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    unit: usize,
    total_units: usize,
    ranges: Vec<Range<usize>>,
}

impl Split {
    /// Splits `total_units` units of `unit` elements over `ranks` as evenly as possible.
    pub fn even(total_units: usize, unit: usize, ranks: usize) -> Self {
        let base = total_units / ranks;
        let extra = total_units % ranks;
        Split::from_counts(
            unit,
            (0..ranks).map(|r| base + usize::from(r < extra)).collect(),
        )
    }

    /// A split with explicit per-rank unit counts, in rank order without overlap.
    pub fn from_counts(unit: usize, counts: Vec<usize>) -> Self {
        let mut start = 0;
        let ranges = counts
            .iter()
            .map(|&count| {
                start += count;
                start - count..start
            })
            .collect();
        Split {
            unit,
            total_units: start,
            ranges,
        }
    }

    /// A split of `total_units` groups (of `unit` elements each) following the split of their
    /// members: member unit `i` belongs to group `i / group`, and each rank owns every group one
    /// of its members belongs to (so a group whose members straddle two ranks is on both).
    pub fn covering(members: &Split, group: usize, total_units: usize, unit: usize) -> Self {
        let ranges = members
            .ranges
            .iter()
            .map(|r| match r.is_empty() {
                true => r.start / group..r.start / group,
                false => r.start / group..(r.end - 1) / group + 1,
            })
            .collect();
        Split {
            unit,
            total_units,
            ranges,
        }
    }

    /// The units rank `rank` owns.
    pub fn units(&self, rank: usize) -> Range<usize> {
        self.ranges[rank].clone()
    }

    /// The elements rank `rank` owns (units times unit width).
    pub fn elements(&self, rank: usize) -> Range<usize> {
        let units = self.units(rank);
        units.start * self.unit..units.end * self.unit
    }

    /// Number of units rank `rank` owns.
    pub fn count(&self, rank: usize) -> usize {
        self.ranges[rank].len()
    }

    /// Units in the whole dimension.
    pub fn total_units(&self) -> usize {
        self.total_units
    }

    /// Elements in the whole dimension.
    pub fn total_elements(&self) -> usize {
        self.total_units * self.unit
    }

    /// Per-rank unit counts.
    pub fn counts(&self) -> Vec<usize> {
        self.ranges.iter().map(|r| r.len()).collect()
    }

    /// The number of elements each rank owns.
    pub fn element_counts(&self) -> Vec<usize> {
        self.ranges.iter().map(|r| r.len() * self.unit).collect()
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
    /// Each expert's hidden width (a mixture of experts; else the MLP's).
    pub expert_intermediate: Split,
    /// Whole experts, where a policy holds them whole ([`Role::Expert`](crate::policy::Role)):
    /// rank `r` owns experts `experts.units(r)` (none for a dense model).
    pub experts: Split,
    /// The shared expert's hidden width (Qwen2-MoE; else the MLP's).
    pub shared_expert_intermediate: Split,
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
        if world_size > config.num_heads {
            return Err(Error::TooManyRanks {
                ranks: world_size,
                reason: format!(
                    "the model has {} attention heads and every rank needs at least one; use at most {} ranks",
                    config.num_heads, config.num_heads
                ),
            });
        }
        let group = config.num_heads / config.num_kv_heads.max(1);
        let heads = Split::even(config.num_heads, config.head_dim, world_size);
        let kv_heads = Split::covering(&heads, group, config.num_kv_heads, config.head_dim);
        Ok(Plan {
            world_size,
            intermediate: even_intermediate(config.intermediate_size, world_size),
            expert_intermediate: even_intermediate(config.expert_width(), world_size),
            experts: Split::even(config.expert_count(), 1, world_size),
            shared_expert_intermediate: even_intermediate(config.shared_expert_width(), world_size),
            heads,
            kv_heads,
            vocab: Split::even(config.vocab_size, 1, world_size),
        })
    }

    /// Bytes of key/value cache (keys and values of every layer, in f32) that one position of
    /// one row costs the rank holding the most key/value heads: a figure every rank shares.
    pub fn kv_bytes_per_position(&self, config: &ModelConfig) -> u64 {
        let kv_heads = self.kv_heads.counts().into_iter().max().unwrap_or(0).max(1);
        let f32_bytes = std::mem::size_of::<f32>() as u64;
        2 * (config.num_layers * kv_heads * config.head_dim) as u64 * f32_bytes
    }

    /// The split of a partitioned dimension.
    pub fn split(&self, partition: Partition) -> &Split {
        match partition {
            Partition::Heads => &self.heads,
            Partition::KvHeads => &self.kv_heads,
            Partition::Intermediate => &self.intermediate,
            Partition::ExpertIntermediate => &self.expert_intermediate,
            Partition::SharedExpertIntermediate => &self.shared_expert_intermediate,
            Partition::Vocab => &self.vocab,
        }
    }
}

/// Splits an MLP of `total` hidden units evenly, in whole blocks of 32 units when the width allows it (so quantized
/// down projections, sliced along this dimension, split at block boundaries).
///
/// An even split is also the fastest: every rank reaches the MLP's all-reduce at the same time.
/// (Giving a rank with fewer attention heads more of the MLP would even out memory but make the
/// other rank wait at each layer's second all-reduce.)
fn even_intermediate(total: usize, ranks: usize) -> Split {
    match total.is_multiple_of(QUANT_BLOCK) && total / QUANT_BLOCK >= ranks {
        true => Split::even(total / QUANT_BLOCK, QUANT_BLOCK, ranks),
        false => Split::even(total, 1, ranks),
    }
}

/// The block width of the common GGUF quantizations (Q4_0, Q4_1, Q5_x, Q8_0).
const QUANT_BLOCK: usize = 32;

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
    fn smollm_heads_split_evenly_and_share_the_straddling_kv_head() {
        let plan = Plan::new(&config(9, 3), 2).unwrap();
        assert_eq!(plan.heads.counts(), [5, 4]);
        assert_eq!(plan.heads.elements(1), 40..72);
        assert_eq!(plan.kv_heads.units(0), 0..2);
        assert_eq!(plan.kv_heads.units(1), 1..3);
        assert_eq!(plan.kv_heads.total_elements(), 24);
        assert_eq!(plan.intermediate.counts(), [4, 3]);
        assert_eq!(plan.vocab.counts(), [5, 5]);
    }

    #[test]
    fn more_ranks_than_kv_heads_replicate_the_kv_heads() {
        let plan = Plan::new(&config(9, 3), 4).unwrap();
        assert_eq!(plan.heads.counts(), [3, 2, 2, 2]);
        let kv: Vec<_> = (0..4).map(|r| plan.kv_heads.units(r)).collect();
        assert_eq!(kv, [0..1, 1..2, 1..3, 2..3]);
        let plan = Plan::new(&config(4, 1), 3).unwrap();
        assert!((0..3).all(|r| plan.kv_heads.units(r) == (0..1)));
    }

    #[test]
    fn smollm2_mlp_splits_evenly_in_whole_quantization_blocks() {
        let json = r#"{"model_type":"llama","vocab_size":49152,"hidden_size":576,"num_hidden_layers":30,
            "num_attention_heads":9,"num_key_value_heads":3,"intermediate_size":1536}"#;
        let cfg = serde_json::from_str::<RawConfig>(json)
            .unwrap()
            .resolve()
            .unwrap();
        for (ranks, counts) in [(2, vec![768, 768]), (3, vec![512, 512, 512])] {
            let plan = Plan::new(&cfg, ranks).unwrap();
            assert_eq!(plan.intermediate.element_counts(), counts);
        }
        let mut blocks = cfg.clone();
        blocks.intermediate_size = 35 * 32;
        let plan = Plan::new(&blocks, 3).unwrap();
        assert_eq!(plan.intermediate.element_counts(), [384, 384, 352]);
        let mut odd = cfg.clone();
        odd.intermediate_size = 1000;
        let plan = Plan::new(&odd, 3).unwrap();
        assert_eq!(plan.intermediate.element_counts(), [334, 333, 333]);
    }

    #[test]
    fn an_even_head_split_keeps_the_even_mlp_split() {
        let plan = Plan::new(&config(8, 4), 2).unwrap();
        assert_eq!(plan.heads.counts(), [4, 4]);
        assert_eq!(plan.kv_heads.counts(), [2, 2]);
        assert_eq!(plan.intermediate.counts(), [4, 3]);
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
    fn more_ranks_than_heads_is_a_clear_error() {
        let err = Plan::new(&config(8, 4), 9).unwrap_err().to_string();
        assert!(
            err.contains("9 ranks") && err.contains("8 attention heads"),
            "{err}"
        );
    }
}
