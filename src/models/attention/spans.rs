//! Positions of one cache row cut out as spans, and caches rebuilt from spans: what the prefix
//! cache keeps of a sequence (one span per layer for each block of tokens), and how it seeds the
//! caches of a later sequence that starts with the same tokens. An extension of [`KvCache`] and
//! [`LayerCaches`] kept apart from attention itself, which it does not touch.

use super::{capacity_with_room, KvCache, LayerCaches};
use crate::error::{Error, Result};

/// Keys and values of consecutive positions of one row of one layer's cache, each
/// `[kv_heads, len, D]` row-major in f32.
#[derive(Debug, Clone, PartialEq)]
pub struct KvSpan {
    heads: usize,
    dim: usize,
    len: usize,
    keys: Vec<f32>,
    values: Vec<f32>,
}

impl KvCache {
    /// Positions `start..start + len` of row `row` (counted as stored: left padding included).
    fn span(&self, row: usize, start: usize, len: usize) -> Result<KvSpan> {
        if row >= self.batch || start + len > self.len {
            return Err(Error::InvalidInput(format!(
                "cannot cut positions {start}..{} of row {row} from a key/value cache of {} rows and {} positions",
                start + len,
                self.batch,
                self.len
            )));
        }
        let dim = self.dim;
        let mut span = KvSpan {
            heads: self.heads,
            dim,
            len,
            keys: Vec::with_capacity(self.heads * len * dim),
            values: Vec::with_capacity(self.heads * len * dim),
        };
        for head in 0..self.heads {
            let from = ((row * self.heads + head) * self.capacity + start) * dim;
            span.keys
                .extend_from_slice(&self.keys[from..from + len * dim]);
            span.values
                .extend_from_slice(&self.values[from..from + len * dim]);
        }
        Ok(span)
    }

    /// A cache of one row holding the first `len` positions of `spans`, one after another.
    fn from_spans(spans: &[&KvSpan], len: usize) -> Result<KvCache> {
        let Some(first) = spans.first() else {
            return Ok(KvCache::default());
        };
        let (heads, dim) = (first.heads, first.dim);
        let held: usize = spans.iter().map(|s| s.len).sum();
        if len > held || spans.iter().any(|s| (s.heads, s.dim) != (heads, dim)) {
            return Err(Error::InvalidInput(format!(
                "cannot seed {len} positions from spans of {held} positions of differing shapes"
            )));
        }
        // Room for the rest of the prompt and the first decode steps.
        let capacity = capacity_with_room(len);
        let mut cache = KvCache {
            keys: vec![0f32; heads * capacity * dim],
            values: vec![0f32; heads * capacity * dim],
            batch: 1,
            heads,
            dim,
            len,
            capacity,
        };
        let mut at = 0;
        for span in spans {
            let n = span.len.min(len - at);
            for head in 0..heads {
                let from = head * span.len * dim;
                let to = (head * capacity + at) * dim;
                cache.keys[to..to + n * dim].copy_from_slice(&span.keys[from..from + n * dim]);
                cache.values[to..to + n * dim].copy_from_slice(&span.values[from..from + n * dim]);
            }
            at += n;
        }
        Ok(cache)
    }
}

impl LayerCaches {
    /// Positions `start..start + len` of row `row` of every layer (counted as stored: left
    /// padding included), one span per layer.
    pub fn row_span(&self, row: usize, start: usize, len: usize) -> Result<Vec<KvSpan>> {
        self.layers
            .iter()
            .map(|cache| cache.span(row, start, len))
            .collect()
    }

    /// Caches of one row holding the first `len` positions of `blocks` one after another, each
    /// block being one span per layer (as [`LayerCaches::row_span`] cuts them).
    pub fn from_blocks(blocks: &[&[KvSpan]], len: usize) -> Result<LayerCaches> {
        let layers = blocks.first().map_or(0, |b| b.len());
        if blocks.iter().any(|b| b.len() != layers) {
            return Err(Error::InvalidInput(
                "blocks of key/value spans have differing numbers of layers".into(),
            ));
        }
        (0..layers)
            .map(|layer| {
                let spans: Vec<&KvSpan> = blocks.iter().map(|b| &b[layer]).collect();
                KvCache::from_spans(&spans, len)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// A cache of `batch` rows, 2 heads of width 3 and `len` positions whose every value tells
    /// where it is: `row * 1000 + head * 100 + position * 10 + component`.
    fn numbered(batch: usize, len: usize) -> KvCache {
        let values: Vec<f32> = (0..batch)
            .flat_map(|b| {
                (0..2).flat_map(move |h| {
                    (0..len).flat_map(move |p| {
                        (0..3).map(move |d| (b * 1000 + h * 100 + p * 10 + d) as f32)
                    })
                })
            })
            .collect();
        let t = Tensor::from_vec(values, (batch, 2, len, 3), &Device::Cpu).unwrap();
        let mut cache = KvCache::default();
        cache.append(&t, &(&t * 2.0).unwrap()).unwrap();
        cache
    }

    #[test]
    fn a_span_holds_the_positions_of_its_row_head_by_head() {
        let cache = numbered(2, 5);
        let span = cache.span(1, 2, 2).unwrap();
        assert_eq!(span.len, 2);
        assert_eq!(
            span.keys,
            [1020., 1021., 1022., 1030., 1031., 1032., 1120., 1121., 1122., 1130., 1131., 1132.]
        );
        assert_eq!(span.values[0], 2040.);
        assert!(cache.span(2, 0, 1).is_err(), "no row 2");
        assert!(cache.span(0, 4, 2).is_err(), "past the end");
    }

    #[test]
    fn caches_seeded_from_spans_equal_the_cache_they_were_cut_from() {
        let cache = numbered(1, 7);
        let layers: LayerCaches = [cache.clone(), cache.clone()].into_iter().collect();
        let first = layers.row_span(0, 0, 4).unwrap();
        let second = layers.row_span(0, 4, 3).unwrap();
        let seeded = LayerCaches::from_blocks(&[&first, &second], 6).unwrap();
        assert_eq!(seeded.len(), 6);
        let mut trimmed = cache.clone();
        trimmed.len = 6;
        let (want_k, want_v) = trimmed.tensors().unwrap();
        let (got_k, got_v) = seeded.get(1).unwrap().tensors().unwrap();
        let flat = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(flat(got_k), flat(want_k));
        assert_eq!(flat(got_v), flat(want_v));
        assert!(
            LayerCaches::from_blocks(&[&first], 5).is_err(),
            "too few positions"
        );
    }
}
