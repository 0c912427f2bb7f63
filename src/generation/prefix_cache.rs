//! The prefix cache: keys and values of token blocks computed for earlier sequences, kept on
//! each rank for its own heads, so that a later sequence starting with the same tokens (a shared
//! system prompt, the earlier turns of a chat) computes only the rest of its prompt.
//!
//! A sequence's tokens are cut into blocks of [`BLOCK_TOKENS`]; each block is keyed by a hash
//! of every token up to its end (the hash of its parent block chained with its own tokens), and
//! keeps its tokens and its parent's key, so that a lookup, which walks the blocks from the
//! first, compares every token: a hash collision costs a miss, never a wrong answer.
//!
//! The memory budget is counted with the same figure on every rank (the bytes a block costs the
//! busiest rank), and every rank sees the same lookups and stores in the same order, so every
//! rank keeps, evicts and finds exactly the same blocks. Eviction drops the least recently used
//! block, the deepest first among blocks used together, so that a block never outlives its
//! parent (a lookup that uses a block uses all its ancestors too).

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::models::attention::{KvSpan, LayerCaches};

/// Tokens per block.
pub const BLOCK_TOKENS: usize = 16;

/// The key of the empty prefix, every first block's parent.
const ROOT: u64 = 0x243f_6a88_85a3_08d3;

/// What the prefix cache did since the last report, and what it holds now (rank 0's figures,
/// which every rank shares).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefixCacheReport {
    /// Prompt tokens whose keys and values were found in the cache.
    pub hit_tokens: u64,
    /// Prompt tokens that had to be computed.
    pub miss_tokens: u64,
    /// Bytes the cache holds now on the busiest rank.
    pub bytes: u64,
    /// Blocks it holds now.
    pub blocks: u64,
}

/// One block: its tokens, its parent's key, and one span of keys and values per layer.
struct Block {
    tokens: Vec<u32>,
    parent: u64,
    depth: usize,
    used: u64,
    spans: Vec<KvSpan>,
}

/// A rank's prefix cache (see the module's documentation).
pub struct PrefixCache {
    budget: u64,
    block_bytes: u64,
    blocks: HashMap<u64, Block>,
    /// `(last use, deepest first, key)` of every block: the eviction order.
    order: BTreeSet<(u64, Reverse<usize>, u64)>,
    clock: u64,
    pending: PrefixCacheReport,
    changed: bool,
}

impl PrefixCache {
    /// A cache that holds at most `budget` bytes on the busiest rank, a position of one row
    /// costing that rank `bytes_per_position` (a budget of 0 disables it).
    pub fn new(budget: u64, bytes_per_position: u64) -> Self {
        PrefixCache {
            budget,
            block_bytes: bytes_per_position * BLOCK_TOKENS as u64,
            blocks: HashMap::new(),
            order: BTreeSet::new(),
            clock: 0,
            pending: PrefixCacheReport::default(),
            changed: false,
        }
    }

    /// Whether the cache may hold anything.
    pub fn enabled(&self) -> bool {
        self.budget >= self.block_bytes && self.block_bytes > 0
    }

    /// Caches of one row seeded with the longest cached prefix of `prompt` (always leaving at
    /// least its last token to compute, so that its logits exist), with the number of
    /// positions they hold; `None` when nothing of it is cached. Counts the hit and the miss.
    pub fn seed(&mut self, prompt: &[u32]) -> Result<Option<(LayerCaches, usize)>> {
        if !self.enabled() {
            return Ok(None);
        }
        self.clock += 1;
        let mut keys = Vec::new();
        let mut parent = ROOT;
        for tokens in prompt.chunks_exact(BLOCK_TOKENS) {
            let key = chain(parent, tokens);
            match self.blocks.get(&key) {
                Some(block) if block.parent == parent && block.tokens == tokens => {
                    keys.push(key);
                    parent = key;
                }
                _ => break,
            }
        }
        keys.iter().for_each(|&key| self.touch(key));
        let reused = (keys.len() * BLOCK_TOKENS).min(prompt.len().saturating_sub(1));
        self.pending.hit_tokens += reused as u64;
        self.pending.miss_tokens += (prompt.len() - reused) as u64;
        self.changed = true;
        if reused == 0 {
            return Ok(None);
        }
        let blocks: Vec<&[KvSpan]> = keys
            .iter()
            .filter_map(|key| self.blocks.get(key))
            .map(|b| b.spans.as_slice())
            .collect();
        Ok(Some((LayerCaches::from_blocks(&blocks, reused)?, reused)))
    }

    /// Keeps the blocks of `tokens` (whole blocks only) that are not cached yet, evicting the
    /// least recently used blocks to make room, and marks those already cached as used. Their
    /// keys and values are cut from row `row` of `caches`, where the first token's position is
    /// `offset` (the row's left padding). Stops at a block that does not fit even in an emptied
    /// cache.
    pub fn store(
        &mut self,
        tokens: &[u32],
        caches: &LayerCaches,
        row: usize,
        offset: usize,
    ) -> Result<()> {
        if !self.enabled() {
            return Ok(());
        }
        self.clock += 1;
        let mut parent = ROOT;
        for (index, block_tokens) in tokens.chunks_exact(BLOCK_TOKENS).enumerate() {
            let key = chain(parent, block_tokens);
            match self.blocks.get(&key) {
                Some(block) if block.parent == parent && block.tokens == block_tokens => {
                    self.touch(key);
                }
                // Another prefix with the same hash holds the key.
                Some(_) => break,
                None => {
                    if !self.make_room() {
                        break;
                    }
                    let block = Block {
                        tokens: block_tokens.to_vec(),
                        parent,
                        depth: index,
                        used: self.clock,
                        spans: caches.row_span(row, offset + index * BLOCK_TOKENS, BLOCK_TOKENS)?,
                    };
                    self.order.insert((self.clock, Reverse(index), key));
                    self.blocks.insert(key, block);
                    self.changed = true;
                }
            }
            parent = key;
        }
        Ok(())
    }

    /// What changed since the last report, if anything (hits and misses since then, what the
    /// cache holds now).
    pub fn take_report(&mut self) -> Option<PrefixCacheReport> {
        if !std::mem::take(&mut self.changed) {
            return None;
        }
        let report = PrefixCacheReport {
            bytes: self.held(),
            blocks: self.blocks.len() as u64,
            ..std::mem::take(&mut self.pending)
        };
        Some(report)
    }

    /// Bytes held on the busiest rank.
    fn held(&self) -> u64 {
        self.blocks.len() as u64 * self.block_bytes
    }

    /// Marks block `key` as used now.
    fn touch(&mut self, key: u64) {
        if let Some(block) = self.blocks.get_mut(&key) {
            self.order.remove(&(block.used, Reverse(block.depth), key));
            block.used = self.clock;
            self.order.insert((block.used, Reverse(block.depth), key));
        }
    }

    /// Evicts blocks used before now until one more block fits; false when it cannot.
    fn make_room(&mut self) -> bool {
        while self.held() + self.block_bytes > self.budget {
            match self.order.first().copied() {
                Some((used, _, key)) if used < self.clock => {
                    self.order
                        .remove(&(used, Reverse(self.blocks[&key].depth), key));
                    self.blocks.remove(&key);
                    self.changed = true;
                }
                _ => return false,
            }
        }
        true
    }
}

/// The key of a block of `tokens` after the prefix keyed `parent`.
fn chain(parent: u64, tokens: &[u32]) -> u64 {
    tokens
        .iter()
        .fold(mix(parent), |hash, &token| mix(hash ^ u64::from(token)))
}

/// A 64-bit mixing function (the finaliser of SplitMix64).
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::attention::KvCache;
    use candle_core::{Device, Tensor};

    /// Caches of one layer and one row whose keys at position `p` are all `tokens[p]`.
    fn caches_of(tokens: &[u32]) -> LayerCaches {
        let values: Vec<f32> = tokens.iter().flat_map(|&t| [t as f32; 2]).collect();
        let t = Tensor::from_vec(values, (1, tokens.len(), 2), &Device::Cpu).unwrap();
        let layout = crate::models::attention::HeadLayout {
            heads: 1,
            kv_heads: 1,
            head_dim: 2,
            first_head: 0,
            first_kv_head: 0,
            group: 1,
        };
        let cache: KvCache = crate::models::attention::cache_of(&t, &t, &layout).unwrap();
        [cache].into_iter().collect()
    }

    /// Stores `tokens` with their caches.
    fn store(cache: &mut PrefixCache, tokens: &[u32]) {
        cache.store(tokens, &caches_of(tokens), 0, 0).unwrap();
    }

    fn tokens(n: usize, salt: u32) -> Vec<u32> {
        (0..n as u32).map(|i| i * 7 + salt).collect()
    }

    #[test]
    fn a_prompt_sharing_whole_blocks_is_seeded_with_them_and_counted() {
        let mut cache = PrefixCache::new(1 << 20, 16);
        let first = tokens(40, 1);
        assert!(cache.seed(&first).unwrap().is_none());
        store(&mut cache, &first);
        let report = cache.take_report().unwrap();
        assert_eq!((report.hit_tokens, report.miss_tokens), (0, 40));
        assert_eq!(report.blocks, 2, "two whole blocks of 40 tokens");
        assert_eq!(report.bytes, 2 * 16 * 16);
        // Shares the first 20 tokens: one whole block.
        let second = [&first[..20], &tokens(10, 9)].concat();
        let (caches, reused) = cache.seed(&second).unwrap().unwrap();
        assert_eq!(reused, 16);
        assert_eq!(caches.len(), 16);
        let want = caches_of(&first[..16]);
        assert_eq!(
            caches.row_span(0, 0, 16).unwrap(),
            want.row_span(0, 0, 16).unwrap()
        );
        let report = cache.take_report().unwrap();
        assert_eq!((report.hit_tokens, report.miss_tokens), (16, 14));
        assert!(cache.take_report().is_none(), "nothing new");
    }

    #[test]
    fn the_last_token_of_a_fully_cached_prompt_is_left_to_compute() {
        let mut cache = PrefixCache::new(1 << 20, 16);
        let prompt = tokens(32, 3);
        store(&mut cache, &prompt);
        let (caches, reused) = cache.seed(&prompt).unwrap().unwrap();
        assert_eq!((reused, caches.len()), (31, 31));
    }

    #[test]
    fn a_block_is_found_only_after_the_same_tokens() {
        let mut cache = PrefixCache::new(1 << 20, 16);
        store(&mut cache, &tokens(32, 1));
        // The same second block after another first block is another prefix.
        let other = [tokens(16, 5), tokens(32, 1)[16..].to_vec(), vec![1]].concat();
        assert!(cache.seed(&other).unwrap().is_none());
    }

    #[test]
    fn the_least_recently_used_blocks_are_evicted_deepest_first() {
        // Room for three blocks.
        let mut cache = PrefixCache::new(3 * 16 * 16, 16);
        let (a, b) = (tokens(32, 1), tokens(32, 2));
        store(&mut cache, &a);
        store(&mut cache, &b[..16]);
        // A third chain of two blocks evicts a's second block, then its first.
        cache.seed(&[&b[..16], &[7]].concat()).unwrap();
        let c = tokens(32, 3);
        store(&mut cache, &c);
        let report = cache.take_report().unwrap();
        assert_eq!(report.blocks, 3);
        assert!(cache.seed(&[&a[..], &[7]].concat()).unwrap().is_none());
        assert_eq!(
            cache.seed(&[&b[..16], &[7]].concat()).unwrap().unwrap().1,
            16
        );
        assert_eq!(cache.seed(&[&c[..], &[7]].concat()).unwrap().unwrap().1, 32);
        // A chain longer than the budget keeps what fits.
        let long = tokens(80, 4);
        store(&mut cache, &long);
        assert_eq!(
            cache.seed(&[&long[..], &[7]].concat()).unwrap().unwrap().1,
            48
        );
    }

    #[test]
    fn a_budget_of_zero_keeps_and_counts_nothing() {
        let mut cache = PrefixCache::new(0, 16);
        assert!(!cache.enabled());
        store(&mut cache, &tokens(32, 1));
        assert!(cache.seed(&tokens(32, 1)).unwrap().is_none());
        assert!(cache.take_report().is_none());
    }
}
