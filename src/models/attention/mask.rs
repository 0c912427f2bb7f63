//! Which keys each query of an attention sees, and what its scores get added, as a description
//! the attention kernel reads a tile at a time: nothing here is ever `[queries, keys]` large.
//!
//! A [`Mask`] is built once per forward pass (its size is the batch's keys, `O(B·T)`) and read
//! by every layer. It covers padding, causality, sliding windows, BLOOM's ALiBi and T5's
//! relative position bias; a key it hides gets no weight, and a query that sees no key at all
//! (a padding position) averages every key's value, as an additive `finfo.min` mask does in
//! transformers.

use std::ops::Range;

use crate::error::{Error, Result};

/// Which keys each query sees, and the bias added to the scores it keeps.
/// The default is a mask of no sequence (of a generation not started).
#[derive(Debug, Clone, Default)]
pub struct Mask {
    batch: usize,
    key_len: usize,
    query_start: usize,
    /// `[batch, key_len]`: whether each key is a token (not padding); `None`: all are.
    kept: Option<Vec<bool>>,
    causal: bool,
    sliding_window: Option<usize>,
    bias: Option<Bias>,
}

/// What is added to a query's scores before the softmax.
#[derive(Debug, Clone)]
enum Bias {
    /// ALiBi: head `h` adds `slopes[h]` times the key's position, which counts the tokens
    /// (not padding) of its row before it (`positions` is `[batch, key_len]`).
    Alibi {
        slopes: Vec<f32>,
        positions: Vec<f32>,
    },
    /// T5: head `h` adds `by_offset[h][key - query + shift]`.
    Relative {
        by_offset: Vec<Vec<f32>>,
        shift: usize,
    },
}

impl Mask {
    /// Every query sees all `key_len` keys of its sequence. Query `i` sits at key position
    /// `query_start + i` (the positions cached before it), which causality, sliding windows
    /// and relative positions measure from.
    pub fn all_visible(batch: usize, key_len: usize, query_start: usize) -> Self {
        Mask {
            batch,
            key_len,
            query_start,
            kept: None,
            causal: false,
            sliding_window: None,
            bias: None,
        }
    }

    /// Hides the padding keys: `attention_mask` is `[batch, key_len]`, 0 for padding.
    pub fn with_padding(mut self, attention_mask: Option<&[u32]>) -> Result<Self> {
        let Some(mask) = attention_mask else {
            return Ok(self);
        };
        if mask.len() != self.batch * self.key_len {
            return Err(Error::InvalidInput(format!(
                "the attention mask holds {} values, not {} sequences × {} positions",
                mask.len(),
                self.batch,
                self.key_len
            )));
        }
        self.kept = mask
            .contains(&0)
            .then(|| mask.iter().map(|&m| m != 0).collect());
        Ok(self)
    }

    /// Queries see only keys at or before their own position.
    pub fn causal(mut self) -> Self {
        self.causal = true;
        self
    }

    /// Queries see only the last `window` keys up to their own position (themselves
    /// included); `None` changes nothing.
    pub fn with_window(mut self, window: Option<usize>) -> Self {
        self.sliding_window = window;
        self
    }

    /// Adds BLOOM's ALiBi: head `h` adds `slopes[h]` times each key's position among its
    /// row's tokens (padding keeps position 0 and does not count).
    pub fn with_alibi(mut self, slopes: &[f32]) -> Self {
        let mut positions = Vec::with_capacity(self.batch * self.key_len);
        for b in 0..self.batch {
            let mut position = 0f32;
            for k in 0..self.key_len {
                if self.is_kept(b, k) {
                    positions.push(position);
                    position += 1.0;
                } else {
                    positions.push(0.0);
                }
            }
        }
        self.bias = Some(Bias::Alibi {
            slopes: slopes.to_vec(),
            positions,
        });
        self
    }

    /// Adds a bias per head that depends on `key - query` only (T5's relative positions):
    /// `bias(head, offset)` for every offset the queries `0..query_len` and the keys can have.
    pub fn with_relative_bias(
        mut self,
        heads: usize,
        query_len: usize,
        bias: impl Fn(usize, i64) -> f32,
    ) -> Self {
        // Offsets run from `-(query_start + query_len - 1)` (the last query, the first key)
        // to `key_len - 1 - query_start` (the first query, the last key).
        let shift = self.query_start + query_len.max(1) - 1;
        let span = shift + self.key_len.saturating_sub(self.query_start).max(1);
        let by_offset = (0..heads)
            .map(|h| {
                (0..span)
                    .map(|i| bias(h, i as i64 - shift as i64))
                    .collect()
            })
            .collect();
        self.bias = Some(Bias::Relative { by_offset, shift });
        self
    }

    /// The mask of the sequences `rows` (in that order; beams that survive a step).
    pub fn select_rows(&self, rows: &[usize]) -> Result<Self> {
        if let Some(&row) = rows.iter().find(|&&r| r >= self.batch) {
            return Err(Error::InvalidInput(format!(
                "cannot take row {row} of an attention mask of {} rows",
                self.batch
            )));
        }
        let mut selected = self.clone();
        selected.batch = rows.len();
        selected.kept = self.kept.as_ref().map(|k| pick_rows(k, self.key_len, rows));
        if let Some(Bias::Alibi { positions, .. }) = &mut selected.bias {
            *positions = pick_rows(positions, self.key_len, rows);
        }
        Ok(selected)
    }

    /// Whether key `k` of sequence `b` is a token (not padding).
    pub(super) fn is_kept(&self, b: usize, k: usize) -> bool {
        self.kept
            .as_ref()
            .is_none_or(|kept| kept[b * self.key_len + k])
    }

    /// The padding flags of sequence `b`'s keys, `None` when it has none.
    pub(super) fn kept_row(&self, b: usize) -> Option<&[bool]> {
        self.kept
            .as_ref()
            .map(|kept| &kept[b * self.key_len..(b + 1) * self.key_len])
    }

    /// The keys query `query` (its index among the new positions) may see before padding:
    /// causality ends the range at its own position, a sliding window starts it.
    pub(super) fn visible_keys(&self, query: usize) -> Range<usize> {
        let position = self.query_start + query;
        let end = match self.causal {
            true => (position + 1).min(self.key_len),
            false => self.key_len,
        };
        let start = self
            .sliding_window
            .map_or(0, |w| (position + 1).saturating_sub(w));
        start.min(end)..end
    }

    /// Adds the bias of head `head`, sequence `b`, query `query` to `scores`, the scores of
    /// keys `keys`.
    pub(super) fn add_bias(
        &self,
        scores: &mut [f32],
        head: usize,
        b: usize,
        query: usize,
        keys: Range<usize>,
    ) {
        match &self.bias {
            None => {}
            Some(Bias::Alibi { slopes, positions }) => {
                let slope = slopes[head];
                let row = &positions[b * self.key_len..][keys];
                for (s, p) in scores.iter_mut().zip(row) {
                    *s += slope * p;
                }
            }
            Some(Bias::Relative { by_offset, shift }) => {
                // key - query + shift, for the first key of the range.
                let first = keys.start + shift - (self.query_start + query);
                let row = &by_offset[head][first..first + keys.len()];
                for (s, b) in scores.iter_mut().zip(row) {
                    *s += b;
                }
            }
        }
    }

    /// Checks that the mask fits attention of `batch` sequences, `heads` query heads and
    /// `query_len` new positions over `key_len` keys.
    pub(super) fn check(
        &self,
        batch: usize,
        heads: usize,
        query_len: usize,
        key_len: usize,
    ) -> Result<()> {
        let heads_ok = match &self.bias {
            Some(Bias::Alibi { slopes, .. }) => slopes.len() == heads,
            Some(Bias::Relative { by_offset, shift }) => {
                by_offset.len() == heads
                    && *shift + 1 >= self.query_start + query_len
                    && by_offset
                        .iter()
                        .all(|b| b.len() + self.query_start >= shift + key_len)
            }
            None => true,
        };
        if (batch, key_len) != (self.batch, self.key_len) || !heads_ok {
            return Err(Error::InvalidInput(format!(
                "an attention mask of {} sequences × {} keys does not fit attention of {batch} sequences, {heads} heads and {query_len} queries over {key_len} keys",
                self.batch, self.key_len
            )));
        }
        Ok(())
    }
}

/// Rows `rows` (in that order) of `per_row`, whose rows are `width` long.
fn pick_rows<T: Copy>(per_row: &[T], width: usize, rows: &[usize]) -> Vec<T> {
    rows.iter()
        .flat_map(|&r| per_row[r * width..(r + 1) * width].iter().copied())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_windows_end_at_the_query_and_start_window_keys_before() {
        let mask = Mask::all_visible(1, 5, 2).causal().with_window(Some(2));
        assert_eq!(mask.visible_keys(0), 1..3);
        assert_eq!(mask.visible_keys(2), 3..5);
        let open = Mask::all_visible(1, 5, 0);
        assert_eq!(open.visible_keys(3), 0..5);
    }

    #[test]
    fn alibi_positions_count_tokens_only_and_rows_can_be_selected() {
        let mask = Mask::all_visible(2, 3, 0)
            .with_padding(Some(&[0, 1, 1, 1, 1, 1]))
            .unwrap()
            .with_alibi(&[0.5]);
        let mut scores = [0f32; 3];
        mask.add_bias(&mut scores, 0, 0, 0, 0..3);
        assert_eq!(scores, [0.0, 0.0, 0.5]);
        let swapped = mask.select_rows(&[1, 0]).unwrap();
        let mut scores = [0f32; 3];
        swapped.add_bias(&mut scores, 0, 0, 0, 0..3);
        assert_eq!(scores, [0.0, 0.5, 1.0]);
        assert!(!swapped.is_kept(1, 0) && swapped.is_kept(0, 0));
        assert!(mask.select_rows(&[2]).is_err());
    }

    #[test]
    fn relative_bias_is_read_by_offset_for_every_query_and_key() {
        let (query_len, key_len, past) = (3, 7, 4);
        let mask = Mask::all_visible(1, key_len, past)
            .with_relative_bias(2, query_len, |h, o| (h * 100) as f32 + o as f32);
        mask.check(1, 2, query_len, key_len).unwrap();
        for q in 0..query_len {
            for start in 0..key_len {
                let mut scores = vec![0f32; key_len - start];
                mask.add_bias(&mut scores, 1, 0, q, start..key_len);
                let want: Vec<f32> = (start..key_len)
                    .map(|k| 100.0 + k as f32 - (past + q) as f32)
                    .collect();
                assert_eq!(scores, want);
            }
        }
    }

    #[test]
    fn a_padding_mask_of_the_wrong_size_is_refused() {
        let err = Mask::all_visible(2, 3, 0)
            .with_padding(Some(&[1, 1, 1]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("2 sequences × 3 positions"), "{err}");
    }
}
