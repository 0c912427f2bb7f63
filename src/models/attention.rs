//! Attention over this rank's heads: masks described, never materialised ([`Mask`]: causal,
//! padding, sliding window, ALiBi, relative position bias), rotary positions (re-exported from
//! [`rope`](crate::models::rope)), the per-rank key/value cache, and grouped-query attention
//! computed a tile at a time ([`tiled`]).
//!
//! Scores, masks and softmax are computed in f32 whatever the weights' dtype.

use candle_core::{DType, Tensor};

use crate::error::Result;
use crate::models::layers::with_values;
pub use crate::models::rope::{Rotary, RotaryAngles};

mod mask;
mod spans;
mod tiled;

pub use mask::Mask;
pub use spans::KvSpan;

/// BLOOM's ALiBi slopes of all `heads` heads (transformers' `build_alibi_tensor`): powers of
/// a base for the largest power of two of heads, then every other power of the next base.
pub fn alibi_slopes(heads: usize) -> Vec<f32> {
    let closest = 1usize << (usize::BITS - 1 - heads.leading_zeros());
    let base = |n: usize| 2f64.powf(-(2f64.powf(-((n as f64).log2() - 3.0))));
    let mut slopes: Vec<f32> = (1..=closest)
        .map(|i| base(closest).powi(i as i32) as f32)
        .collect();
    slopes.extend((0..heads - closest).map(|i| base(2 * closest).powi((2 * i + 1) as i32) as f32));
    slopes
}

/// Keys and values of earlier positions for this rank's heads, in f32. Each head's positions
/// lie one after another in a buffer with room to grow (`[B, kv_heads, capacity, D]`), so a
/// decode step writes only its own position; the buffers double when full.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    keys: Vec<f32>,
    values: Vec<f32>,
    batch: usize,
    heads: usize,
    dim: usize,
    len: usize,
    capacity: usize,
}

/// Positions reserved by a new cache, so that short generations never regrow it.
const FIRST_CAPACITY: usize = 256;

/// The most positions a cache row holding up to `positions` may have reserved: a cache grows
/// to at least twice its capacity (from [`FIRST_CAPACITY`]), so never past twice what it holds.
/// What the server's admission counts for a row.
pub fn reserved_positions(positions: usize) -> usize {
    positions.saturating_mul(2).max(FIRST_CAPACITY)
}

/// The capacity of a cache row built afresh for `positions` (a row that joins wider than the
/// batch, a row seeded from the prefix cache): room for [`FIRST_CAPACITY`] more positions, within
/// what [`reserved_positions`] counts.
fn capacity_with_room(positions: usize) -> usize {
    (positions + FIRST_CAPACITY).min(reserved_positions(positions))
}

impl KvCache {
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held by the cache (its whole capacity).
    pub fn bytes(&self) -> usize {
        (self.keys.len() + self.values.len()) * std::mem::size_of::<f32>()
    }

    /// Appends keys and values `[B, kv_heads, L, D]` after the cached positions.
    fn append(&mut self, keys: &Tensor, values: &Tensor) -> Result<()> {
        let (batch, heads, len, dim) = keys.dims4()?;
        if self.capacity == 0 {
            (self.batch, self.heads, self.dim) = (batch, heads, dim);
        } else if (batch, heads, dim) != (self.batch, self.heads, self.dim) {
            return Err(crate::error::Error::InvalidInput(format!(
                "the key/value cache holds batch {}, {} heads of width {}; the new positions have batch {batch}, {heads} heads of width {dim}",
                self.batch, self.heads, self.dim
            )));
        }
        if self.len + len > self.capacity {
            self.grow((self.len + len).max(2 * self.capacity).max(FIRST_CAPACITY));
        }
        let (at, capacity) = (self.len, self.capacity);
        for (buffer, new) in [(&mut self.keys, keys), (&mut self.values, values)] {
            with_values(&new.to_dtype(DType::F32)?, |new| {
                for (head, rows) in new.chunks_exact(len * dim).enumerate() {
                    let start = (head * capacity + at) * dim;
                    buffer[start..start + rows.len()].copy_from_slice(rows);
                }
            })?;
        }
        self.len += len;
        Ok(())
    }

    /// A cache of `len` positions whose row `i` is row `rows[i].1` of cache `rows[i].0`. Each
    /// row's positions are aligned to the end: a shorter row gets zeros in front (padding, which
    /// the attention mask must hide), a longer one loses its first positions (which must be
    /// padding). This one copy reorders beams, drops finished rows, trims padding every row has,
    /// and joins the rows of two batches.
    fn gather(rows: &[(&KvCache, usize)], len: usize) -> Result<KvCache> {
        let capacity = rows.iter().map(|(c, _)| c.capacity).max().unwrap_or(0);
        KvCache::gather_with_room(rows, len, capacity.max(len))
    }

    /// [`KvCache::gather`] into buffers with room for `capacity` positions (at least `len`).
    fn gather_with_room(
        rows: &[(&KvCache, usize)],
        len: usize,
        capacity: usize,
    ) -> Result<KvCache> {
        let Some(&(first, _)) = rows.first() else {
            return Ok(KvCache::default());
        };
        let (heads, dim) = (first.heads, first.dim);
        if let Some((cache, row)) = rows
            .iter()
            .find(|(c, r)| (c.heads, c.dim) != (heads, dim) || *r >= c.batch)
        {
            return Err(crate::error::Error::InvalidInput(format!(
                "cannot take row {row} of a key/value cache of {} rows, {} heads of width {} (the batch has {heads} heads of width {dim})",
                cache.batch, cache.heads, cache.dim
            )));
        }
        let size = rows.len() * heads * capacity * dim;
        let mut gathered = KvCache {
            keys: vec![0f32; size],
            values: vec![0f32; size],
            batch: rows.len(),
            heads,
            dim,
            len,
            capacity,
        };
        for (to_row, &(cache, from_row)) in rows.iter().enumerate() {
            let kept = cache.len.min(len);
            let (skipped, padding) = (cache.len - kept, len - kept);
            for head in 0..heads {
                let from = ((from_row * heads + head) * cache.capacity + skipped) * dim;
                let to = ((to_row * heads + head) * capacity + padding) * dim;
                let n = kept * dim;
                gathered.keys[to..to + n].copy_from_slice(&cache.keys[from..from + n]);
                gathered.values[to..to + n].copy_from_slice(&cache.values[from..from + n]);
            }
        }
        Ok(gathered)
    }

    /// Keeps rows `kept` (increasing), each with its last `len` positions (dropping leading
    /// padding that every kept row has), moving them in place.
    fn retain(&mut self, kept: &[usize], len: usize) -> Result<()> {
        if kept.is_empty() {
            *self = KvCache::default();
            return Ok(());
        }
        if len > self.len
            || kept.windows(2).any(|w| w[0] >= w[1])
            || kept.iter().any(|&r| r >= self.batch)
        {
            return Err(crate::error::Error::InvalidInput(format!(
                "cannot keep rows {kept:?} with {len} positions of a key/value cache of {} rows and {} positions",
                self.batch, self.len
            )));
        }
        let (dim, skipped) = (self.dim, self.len - len);
        let block = self.heads * self.capacity * dim;
        // Every row moves to an earlier place (or stays), so a row is never overwritten
        // before it has moved.
        for (to, &from) in kept.iter().enumerate() {
            for head in 0..self.heads {
                let source = from * block + (head * self.capacity + skipped) * dim;
                let target = to * block + head * self.capacity * dim;
                for buffer in [&mut self.keys, &mut self.values] {
                    buffer.copy_within(source..source + len * dim, target);
                }
            }
        }
        self.keys.truncate(kept.len() * block);
        self.values.truncate(kept.len() * block);
        (self.batch, self.len) = (kept.len(), len);
        Ok(())
    }

    /// Appends the rows of `other`, aligning every row to the end of the longer of the two
    /// (the shorter rows get zeros in front: padding the attention mask must hide).
    fn append_rows(&mut self, other: &KvCache) -> Result<()> {
        if self.batch == 0 {
            *self = other.clone();
            return Ok(());
        }
        if (other.heads, other.dim) != (self.heads, self.dim) {
            return Err(crate::error::Error::InvalidInput(format!(
                "cannot join a key/value cache of {} heads of width {} to one of {} heads of width {}",
                other.heads, other.dim, self.heads, self.dim
            )));
        }
        let len = self.len.max(other.len);
        if len > self.capacity {
            // Wider than this cache's room (a long prompt joins): one fresh copy puts every row
            // in place, with nothing to shift and no padding to zero again, and leaves room for
            // the decode steps that follow.
            let rows: Vec<(&KvCache, usize)> = (0..self.batch)
                .map(|r| (&*self, r))
                .chain((0..other.batch).map(|r| (other, r)))
                .collect();
            *self = KvCache::gather_with_room(&rows, len, capacity_with_room(len))?;
            return Ok(());
        }
        let (dim, shift) = (self.dim, len - self.len);
        if shift > 0 {
            for head in 0..self.batch * self.heads {
                let start = head * self.capacity * dim;
                for buffer in [&mut self.keys, &mut self.values] {
                    buffer.copy_within(start..start + self.len * dim, start + shift * dim);
                    buffer[start..start + shift * dim].fill(0.0);
                }
            }
        }
        let block = self.heads * self.capacity * dim;
        let rows = self.batch + other.batch;
        self.keys.resize(rows * block, 0.0);
        self.values.resize(rows * block, 0.0);
        for head in 0..other.batch * other.heads {
            let source = head * other.capacity * dim;
            let target = self.batch * block + (head * self.capacity + len - other.len) * dim;
            let n = other.len * dim;
            self.keys[target..target + n].copy_from_slice(&other.keys[source..source + n]);
            self.values[target..target + n].copy_from_slice(&other.values[source..source + n]);
        }
        (self.batch, self.len) = (rows, len);
        Ok(())
    }

    /// Moves the cached positions into buffers with room for `capacity` positions per head.
    fn grow(&mut self, capacity: usize) {
        let (heads, dim, len) = (self.batch * self.heads, self.dim, self.len);
        for buffer in [&mut self.keys, &mut self.values] {
            let mut grown = vec![0f32; heads * capacity * dim];
            for head in 0..heads {
                let (from, to) = (head * self.capacity * dim, head * capacity * dim);
                grown[to..to + len * dim].copy_from_slice(&buffer[from..from + len * dim]);
            }
            *buffer = grown;
        }
        self.capacity = capacity;
    }

    /// The cached positions, read in place.
    fn view(&self) -> KvView<'_> {
        KvView {
            keys: &self.keys,
            values: &self.values,
            len: self.len,
            head_stride: self.capacity * self.dim,
        }
    }

    /// The cached keys and values as contiguous `[B, kv_heads, T, D]` tensors.
    #[cfg(test)]
    fn tensors(&self) -> Result<(Tensor, Tensor)> {
        let shape = (self.batch, self.heads, self.len, self.dim);
        let copy = |buffer: &[f32]| -> Result<Tensor> {
            let mut values = Vec::with_capacity(self.batch * self.heads * self.len * self.dim);
            for head in buffer.chunks_exact(self.capacity * self.dim) {
                values.extend_from_slice(&head[..self.len * self.dim]);
            }
            Ok(Tensor::from_vec(values, shape, &candle_core::Device::Cpu)?)
        };
        Ok((copy(&self.keys)?, copy(&self.values)?))
    }
}

/// Keys and values of `len` positions per head, head `h`'s positions starting at
/// `h * head_stride` (`[B, kv_heads, ≥len, D]` row-major).
#[derive(Debug, Clone, Copy)]
struct KvView<'a> {
    keys: &'a [f32],
    values: &'a [f32],
    len: usize,
    head_stride: usize,
}

/// The key/value caches of every layer of a rank.
#[derive(Debug, Clone, Default)]
pub struct LayerCaches {
    layers: Vec<KvCache>,
}

impl FromIterator<KvCache> for LayerCaches {
    /// Caches of one layer each, in order.
    fn from_iter<I: IntoIterator<Item = KvCache>>(layers: I) -> Self {
        LayerCaches {
            layers: layers.into_iter().collect(),
        }
    }
}

impl LayerCaches {
    /// Empty caches for `layers` layers.
    pub fn new(layers: usize) -> Self {
        LayerCaches {
            layers: vec![KvCache::default(); layers],
        }
    }

    /// The cache of layer `index`, to read.
    pub fn get(&self, index: usize) -> Option<&KvCache> {
        self.layers.get(index)
    }

    /// The cache of layer `index`.
    pub fn layer(&mut self, index: usize) -> &mut KvCache {
        &mut self.layers[index]
    }

    /// Rearranges every layer's rows: row `i` becomes the old row `rows[i]` (a row may be
    /// copied to several places, as beams that share a history are, or left out, as finished
    /// sequences are), keeping the last `len` positions of each.
    pub fn select(&mut self, rows: &[usize], len: usize) -> Result<()> {
        let picked: Vec<(&LayerCaches, usize)> = rows.iter().map(|&r| (&*self, r)).collect();
        *self = LayerCaches::gather(&picked, len, self.layers.len())?;
        Ok(())
    }

    /// Caches of `layers` layers whose row `i` is row `rows[i].1` of `rows[i].0`, its positions
    /// aligned to the end of `len` (padded with zeros in front, or losing leading padding).
    pub fn gather(rows: &[(&LayerCaches, usize)], len: usize, layers: usize) -> Result<Self> {
        (0..layers)
            .map(|layer| {
                let picked = rows
                    .iter()
                    .map(|(c, r)| c.layers.get(layer).map(|cache| (cache, *r)))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| {
                        crate::error::Error::InvalidInput(format!(
                            "a key/value cache lacks layer {layer}"
                        ))
                    })?;
                KvCache::gather(&picked, len)
            })
            .collect::<Result<Vec<_>>>()
            .map(|layers| LayerCaches { layers })
    }

    /// Keeps rows `kept` (increasing) of every layer, each with its last `len` positions, in
    /// place (sequences that ended leave the batch, with the padding every remaining row has).
    pub fn retain(&mut self, kept: &[usize], len: usize) -> Result<()> {
        self.layers.iter_mut().try_for_each(|c| c.retain(kept, len))
    }

    /// Appends the rows of `other` to every layer, each row aligned to the end of the longer
    /// of the two (sequences join a running batch).
    pub fn append_rows(&mut self, other: &LayerCaches) -> Result<()> {
        if other.layers.len() != self.layers.len() {
            return Err(crate::error::Error::InvalidInput(format!(
                "cannot join caches of {} layers to caches of {}",
                other.layers.len(),
                self.layers.len()
            )));
        }
        self.layers
            .iter_mut()
            .zip(&other.layers)
            .try_for_each(|(c, o)| c.append_rows(o))
    }

    /// Layers these caches are for.
    pub fn layer_count(&self) -> usize {
        self.layers.len()
    }

    /// Takes the cached positions out, leaving empty caches with as many layers.
    pub fn take(&mut self) -> LayerCaches {
        std::mem::replace(self, LayerCaches::new(self.layers.len()))
    }

    /// Forgets everything cached.
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|c| *c = KvCache::default());
    }

    /// Bytes held by all layers.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(KvCache::bytes).sum()
    }

    /// Positions cached (the same in every layer).
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, KvCache::len)
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// This rank's share of one attention layer's heads.
#[derive(Debug, Clone, Copy)]
pub struct HeadLayout {
    /// Query heads on this rank.
    pub heads: usize,
    /// Key/value heads on this rank.
    pub kv_heads: usize,
    /// Width of a head.
    pub head_dim: usize,
    /// The model-wide index of this rank's first query head.
    pub first_head: usize,
    /// The model-wide index of this rank's first key/value head.
    pub first_kv_head: usize,
    /// Query heads per key/value head in the whole model.
    pub group: usize,
}

impl HeadLayout {
    /// Rank `rank`'s heads under `plan`.
    pub fn of_rank(plan: &crate::parallel::Plan, rank: usize, head_dim: usize) -> Self {
        let (heads, kv_heads) = (plan.heads.units(rank), plan.kv_heads.units(rank));
        let all_kv_heads = plan.kv_heads.total_elements() / head_dim.max(1);
        HeadLayout {
            heads: heads.len(),
            kv_heads: kv_heads.len(),
            head_dim,
            first_head: heads.start,
            first_kv_head: kv_heads.start,
            group: plan.heads.total_elements() / head_dim.max(1) / all_kv_heads.max(1),
        }
    }

    /// The local key/value head that local query head `head` reads.
    pub fn kv_head_of(&self, head: usize) -> usize {
        (self.first_head + head) / self.group.max(1) - self.first_kv_head
    }
}

/// Projections already applied: `q` `[B, L, heads*D]`, `k`/`v` `[B, L, kv_heads*D]`.
pub struct Projected {
    /// Queries.
    pub q: Tensor,
    /// Keys.
    pub k: Tensor,
    /// Values.
    pub v: Tensor,
}

impl Projected {
    /// Splits a fused projection `[B, L, q | k | v]` for this rank's heads.
    pub fn split_fused(fused: &Tensor, layout: &HeadLayout) -> Result<Self> {
        let q_width = layout.heads * layout.head_dim;
        let kv_width = layout.kv_heads * layout.head_dim;
        Ok(Projected {
            q: fused.narrow(2, 0, q_width)?,
            k: fused.narrow(2, q_width, kv_width)?,
            v: fused.narrow(2, q_width + kv_width, kv_width)?,
        })
    }
}

/// Scaled dot-product attention of the projected heads: queries and keys rotated by the given
/// angles, the cache extended when given. Returns `[B, L, heads*D]` in the input's dtype.
pub fn attend(
    projected: Projected,
    layout: HeadLayout,
    rotary: Option<&RotaryAngles>,
    cache: Option<&mut KvCache>,
    mask: &Mask,
) -> Result<Tensor> {
    let scale = 1.0 / (layout.head_dim as f64).sqrt();
    attend_scaled(projected, layout, rotary, cache, mask, scale)
}

/// [`attend`] with the scores multiplied by `scale` instead of `1/sqrt(D)` (T5 scales none).
pub fn attend_scaled(
    projected: Projected,
    layout: HeadLayout,
    rotary: Option<&RotaryAngles>,
    cache: Option<&mut KvCache>,
    mask: &Mask,
    scale: f64,
) -> Result<Tensor> {
    let scores = Scores {
        scale,
        softcap: None,
    };
    attend_with(projected, layout, rotary, cache, mask, scores)
}

/// How raw attention scores `q·k` become the logits of the softmax, before the mask.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scores {
    /// Multiplier of `q·k` (`1/sqrt(D)` usually).
    pub scale: f64,
    /// Gemma 2's soft-capping: scores become `cap * tanh(score / cap)`.
    pub softcap: Option<f64>,
}

/// [`attend`] with the scores computed as `scores` says.
pub fn attend_with(
    projected: Projected,
    layout: HeadLayout,
    rotary: Option<&RotaryAngles>,
    cache: Option<&mut KvCache>,
    mask: &Mask,
    scores: Scores,
) -> Result<Tensor> {
    let dtype = projected.q.dtype();
    let mut q = split_heads(&projected.q, layout.heads, layout.head_dim)?;
    let mut k = split_heads(&projected.k, layout.kv_heads, layout.head_dim)?;
    let v = split_heads(&projected.v, layout.kv_heads, layout.head_dim)?;
    if let Some(angles) = rotary {
        q = angles.apply(&q)?;
        k = angles.apply(&k)?;
    }
    let q = q.to_dtype(DType::F32)?;
    let out = match cache {
        Some(cache) => {
            cache.append(&k, &v)?;
            over_keys(&q, cache.view(), mask, &layout, scores)?
        }
        None => {
            let (k, v) = (k.to_dtype(DType::F32)?, v.to_dtype(DType::F32)?);
            let len = k.dim(2)?;
            with_values(&k, |keys| {
                with_values(&v, |values| {
                    let view = KvView {
                        keys,
                        values,
                        len,
                        head_stride: len * layout.head_dim,
                    };
                    over_keys(&q, view, mask, &layout, scores)
                })
            })???
        }
    };
    Ok(out.to_dtype(dtype)?)
}

/// Attention of queries `q` `[B, L, heads*D]` over keys and values cached earlier, which it
/// leaves as they are (an encoder–decoder's cross-attention over the encoder output).
/// Returns `[B, L, heads*D]` in the queries' dtype.
pub fn attend_cached(
    q: &Tensor,
    layout: HeadLayout,
    cache: &KvCache,
    mask: &Mask,
    scale: f64,
) -> Result<Tensor> {
    let heads = split_heads(q, layout.heads, layout.head_dim)?.to_dtype(DType::F32)?;
    let scores = Scores {
        scale,
        softcap: None,
    };
    Ok(over_keys(&heads, cache.view(), mask, &layout, scores)?.to_dtype(q.dtype())?)
}

/// A cache holding keys `k` and values `v` `[B, L, kv_heads*D]` (an encoder output's, which
/// every decode step's cross-attention reads).
pub fn cache_of(k: &Tensor, v: &Tensor, layout: &HeadLayout) -> Result<KvCache> {
    let mut cache = KvCache::default();
    cache.append(
        &split_heads(k, layout.kv_heads, layout.head_dim)?,
        &split_heads(v, layout.kv_heads, layout.head_dim)?,
    )?;
    Ok(cache)
}

/// `[B, L, heads*D]` as contiguous `[B, heads, L, D]`.
fn split_heads(t: &Tensor, heads: usize, head_dim: usize) -> Result<Tensor> {
    let (batch, len, _) = t.dims3()?;
    Ok(t.reshape((batch, len, heads, head_dim))?
        .transpose(1, 2)?
        .contiguous()?)
}

/// Attention of the f32 queries `q` `[B, heads, L, D]` over the keys and values of `kv`, a
/// tile at a time: `[B, L, heads*D]` in f32.
fn over_keys(
    q: &Tensor,
    kv: KvView,
    mask: &Mask,
    layout: &HeadLayout,
    scores: Scores,
) -> Result<Tensor> {
    let (batch, _, len, _) = q.dims4()?;
    let out = with_values(q, |q| tiled::attend(q, len, kv, mask, layout, scores))??;
    Ok(Tensor::from_vec(
        out,
        (batch, len, layout.heads * layout.head_dim),
        q.device(),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A layout of `heads` query heads starting at model-wide head `first_head`, with model-wide
    /// groups of `group`.
    fn layout(heads: usize, first_head: usize, group: usize, dim: usize) -> HeadLayout {
        let first_kv_head = first_head / group;
        HeadLayout {
            heads,
            kv_heads: (first_head + heads - 1) / group + 1 - first_kv_head,
            head_dim: dim,
            first_head,
            first_kv_head,
            group,
        }
    }

    /// Attention by definition, in f64: every score plus an additive mask of `f32::MIN` on the
    /// keys `hidden(b, q, k)` says, softmax over all keys, weighted sum of values. The
    /// reference the tiled kernel is held to (a fully hidden row averages every value).
    fn reference(
        (q, k, v): (&[f32], &[f32], &[f32]),
        (batch, query_len, key_len): (usize, usize, usize),
        layout: &HeadLayout,
        scores: Scores,
        bias: impl Fn(usize, usize, usize, usize) -> f32,
        hidden: impl Fn(usize, usize, usize) -> bool,
    ) -> Vec<f32> {
        let (heads, dim) = (layout.heads, layout.head_dim);
        let mut out = vec![0f32; batch * query_len * heads * dim];
        for b in 0..batch {
            for h in 0..heads {
                let kv = (b * layout.kv_heads + layout.kv_head_of(h)) * key_len * dim;
                for i in 0..query_len {
                    let query = &q[((b * heads + h) * query_len + i) * dim..][..dim];
                    let logits: Vec<f64> = (0..key_len)
                        .map(|t| {
                            let key = &k[kv + t * dim..][..dim];
                            let dot: f32 = query.iter().zip(key).map(|(a, b)| a * b).sum();
                            let mut s = dot * scores.scale as f32;
                            if let Some(cap) = scores.softcap {
                                s = (s / cap as f32).tanh() * cap as f32;
                            }
                            let mask = if hidden(b, i, t) { f32::MIN } else { 0.0 };
                            (s + bias(b, h, i, t) + mask) as f64
                        })
                        .collect();
                    let max = logits.iter().cloned().fold(f64::MIN, f64::max);
                    let weights: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
                    let total: f64 = weights.iter().sum();
                    let row = &mut out[((b * query_len + i) * heads + h) * dim..][..dim];
                    for (t, w) in weights.iter().enumerate() {
                        for (o, x) in row.iter_mut().zip(&v[kv + t * dim..][..dim]) {
                            *o += (w / total * *x as f64) as f32;
                        }
                    }
                }
            }
        }
        out
    }

    /// Deterministic values in [-1, 1].
    fn wave(n: usize, seed: f32) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * 0.37 + seed).sin()).collect()
    }

    /// The tiled kernel against [`reference`] for one mask: queries at `past..past + len`
    /// over `past + len` keys (or `keys` for cross-attention), batch 2, the second sequence
    /// left-padded by `padding` positions.
    fn check_tiled(
        layout: HeadLayout,
        (len, past, padding): (usize, usize, usize),
        softcap: Option<f64>,
        build: impl Fn(Mask) -> Mask,
        bias: impl Fn(usize, usize, usize, usize) -> f32,
        hidden: impl Fn(usize, usize, usize) -> bool,
    ) {
        let (batch, dim) = (2, layout.head_dim);
        let keys = past + len;
        let q = wave(batch * layout.heads * len * dim, 0.1);
        let k = wave(batch * layout.kv_heads * keys * dim, 0.7);
        let v = wave(batch * layout.kv_heads * keys * dim, 1.3);
        let attention_mask: Vec<u32> = (0..batch * keys)
            .map(|i| u32::from(i < keys || i - keys >= padding))
            .collect();
        let mask = build(
            Mask::all_visible(batch, keys, past)
                .with_padding(Some(&attention_mask))
                .unwrap(),
        );
        let scores = Scores {
            scale: 1.0 / (dim as f64).sqrt(),
            softcap,
        };
        let view = KvView {
            keys: &k,
            values: &v,
            len: keys,
            head_stride: keys * dim,
        };
        let got = tiled::attend(&q, len, view, &mask, &layout, scores).unwrap();
        let padded = |b: usize, t: usize| attention_mask[b * keys + t] == 0;
        let want = reference(
            (&q, &k, &v),
            (batch, len, keys),
            &layout,
            scores,
            bias,
            |b, i, t| padded(b, t) || hidden(b, past + i, t),
        );
        let diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-5, "{layout:?} len {len} past {past}: {diff}");
    }

    #[test]
    fn tiled_attention_equals_attention_by_definition_for_every_kind_of_mask() {
        // Whole groups, and a rank whose two query heads straddle two groups.
        let layouts = [layout(4, 0, 2, 8), layout(2, 1, 2, 8)];
        // A decode step over a long cache, a prompt crossing tiles, one after a cached prefix.
        let shapes = [(1, 300, 0), (150, 0, 37), (70, 200, 5), (3, 0, 2)];
        for layout in layouts {
            for (len, past, padding) in shapes {
                let shape = (len, past, padding);
                let none = |_: usize, _: usize, _: usize, _: usize| 0.0;
                // Bidirectional, with and without Gemma 2's soft-capping.
                for softcap in [None, Some(0.3)] {
                    check_tiled(layout, shape, softcap, |m| m, none, |_, _, _| false);
                }
                // Causal; causal within a sliding window of 50.
                let causal = |_: usize, q: usize, t: usize| t > q;
                check_tiled(layout, shape, None, Mask::causal, none, causal);
                let window = |_: usize, q: usize, t: usize| t > q || q >= t + 50;
                let windowed = |m: Mask| m.causal().with_window(Some(50));
                check_tiled(layout, shape, None, windowed, none, window);
                // ALiBi (positions count tokens only), causal.
                let slopes = [0.5, 0.25, 0.125, 0.0625];
                let keys = past + len;
                let alibi = |b: usize, h: usize, _: usize, t: usize| {
                    let lead = if b == 1 { padding } else { 0 };
                    slopes[h] * t.saturating_sub(lead) as f32
                };
                let with_alibi = |m: Mask| m.causal().with_alibi(&slopes[..layout.heads]);
                check_tiled(layout, shape, None, with_alibi, alibi, causal);
                // A relative bias of key - query (T5).
                let relative = |h: usize, offset: i64| (h as f32 + 1.0) * 0.01 * offset as f32;
                let with_relative = |m: Mask| m.with_relative_bias(layout.heads, len, relative);
                let bias = |_: usize, h: usize, i: usize, t: usize| {
                    relative(h, t as i64 - (past + i) as i64)
                };
                check_tiled(layout, shape, None, with_relative, bias, |_, _, _| false);
                assert!(keys > 0);
            }
        }
    }

    #[test]
    fn the_cache_grows_in_place_and_returns_every_position_in_order() {
        let (batch, heads, dim) = (2, 3, 4);
        let total = FIRST_CAPACITY + 40;
        let all = Tensor::arange(0f32, (batch * heads * total * dim) as f32, &Device::Cpu)
            .unwrap()
            .reshape((batch, heads, total, dim))
            .unwrap();
        let mut cache = KvCache::default();
        let mut start = 0;
        for len in [5, FIRST_CAPACITY - 5, 1, 39] {
            let piece = all.narrow(2, start, len).unwrap();
            cache.append(&piece, &(&piece * 2.0).unwrap()).unwrap();
            start += len;
        }
        assert_eq!(cache.len(), total);
        assert!(cache.capacity >= total && cache.capacity >= 2 * FIRST_CAPACITY);
        let (keys, values) = cache.tensors().unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(flat(&keys), flat(&all));
        assert_eq!(flat(&values), flat(&(&all * 2.0).unwrap()));
        let wrong = Tensor::zeros((batch, heads + 1, 1, dim), DType::F32, &Device::Cpu).unwrap();
        let err = cache.append(&wrong, &wrong).unwrap_err().to_string();
        assert!(err.contains("4 heads"), "{err}");
    }

    /// Positions `[B, heads, len, dim]` numbered so that every value says where it came from.
    fn numbered(batch: usize, heads: usize, len: usize, dim: usize, offset: f32) -> Tensor {
        let count = batch * heads * len * dim;
        (Tensor::arange(0f32, count as f32, &Device::Cpu).unwrap() + offset as f64)
            .unwrap()
            .reshape((batch, heads, len, dim))
            .unwrap()
    }

    #[test]
    fn gathering_rows_aligns_them_to_the_end_padding_or_trimming_the_front() {
        let (heads, dim) = (2, 3);
        let mut long = KvCache::default();
        let long_keys = numbered(2, heads, 4, dim, 0.0);
        long.append(&long_keys, &(&long_keys * -1.0).unwrap())
            .unwrap();
        let mut short = KvCache::default();
        let short_keys = numbered(1, heads, 2, dim, 1000.0);
        short
            .append(&short_keys, &(&short_keys * -1.0).unwrap())
            .unwrap();
        // Row 1 of the long batch, the short row padded by 2, and row 0 trimmed to 3 positions.
        let gathered = KvCache::gather(&[(&long, 1), (&short, 0), (&long, 0)], 4).unwrap();
        let trimmed = KvCache::gather(&[(&long, 0)], 3).unwrap();
        let (keys, values) = gathered.tensors().unwrap();
        assert_eq!(keys.dims(), [3, heads, 4, dim]);
        let row = |t: &Tensor, r: usize| {
            t.get(r)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(row(&keys, 0), row(&long_keys, 1));
        assert_eq!(row(&keys, 2), row(&long_keys, 0));
        let padded = Tensor::cat(
            &[
                Tensor::zeros((1, heads, 2, dim), DType::F32, &Device::Cpu).unwrap(),
                short_keys.clone(),
            ],
            2,
        )
        .unwrap();
        assert_eq!(row(&keys, 1), row(&padded, 0));
        assert_eq!(row(&values, 1), row(&(&padded * -1.0).unwrap(), 0));
        let (trimmed_keys, _) = trimmed.tensors().unwrap();
        assert_eq!(
            row(&trimmed_keys, 0),
            row(&long_keys.narrow(2, 1, 3).unwrap(), 0)
        );
        // The gathered cache keeps growing in place.
        let mut grown = gathered;
        let next = numbered(3, heads, 1, dim, 5000.0);
        grown.append(&next, &next).unwrap();
        assert_eq!(grown.len(), 5);
        let err = KvCache::gather(&[(&long, 2)], 4).unwrap_err().to_string();
        assert!(err.contains("row 2"), "{err}");
    }

    #[test]
    fn retaining_and_appending_rows_in_place_equal_gathering_them() {
        let (heads, dim) = (2, 3);
        let mut wide = KvCache::default();
        let wide_keys = numbered(4, heads, 6, dim, 0.0);
        wide.append(&wide_keys, &(&wide_keys * 0.5).unwrap())
            .unwrap();
        let mut narrow = KvCache::default();
        let narrow_keys = numbered(2, heads, 3, dim, 700.0);
        narrow
            .append(&narrow_keys, &(&narrow_keys * 0.5).unwrap())
            .unwrap();
        let flat = |c: &KvCache| {
            let (k, v) = c.tensors().unwrap();
            let flat = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (flat(k), flat(v))
        };
        // Drop rows 0 and 2 and the first two positions.
        let mut kept = wide.clone();
        kept.retain(&[1, 3], 4).unwrap();
        let want = KvCache::gather(&[(&wide, 1), (&wide, 3)], 4).unwrap();
        assert_eq!(flat(&kept), flat(&want));
        // A longer batch joins a shorter one (the old rows shift right), and the other way.
        let mut joined = narrow.clone();
        joined.append_rows(&kept).unwrap();
        let want =
            KvCache::gather(&[(&narrow, 0), (&narrow, 1), (&kept, 0), (&kept, 1)], 4).unwrap();
        assert_eq!(flat(&joined), flat(&want));
        let mut joined = kept.clone();
        joined.append_rows(&narrow).unwrap();
        let want =
            KvCache::gather(&[(&kept, 0), (&kept, 1), (&narrow, 0), (&narrow, 1)], 4).unwrap();
        assert_eq!(flat(&joined), flat(&want));
        // Both keep growing in place; keeping nothing empties the cache.
        joined
            .append(
                &numbered(4, heads, 1, dim, 0.0),
                &numbered(4, heads, 1, dim, 0.0),
            )
            .unwrap();
        assert_eq!(joined.len(), 5);
        joined.retain(&[], 0).unwrap();
        assert_eq!((joined.len(), joined.bytes()), (0, 0));
        assert!(kept.retain(&[1, 0], 2).is_err());
    }

    #[test]
    fn rows_wider_than_the_batchs_room_join_it_in_one_copy_with_room_to_decode() {
        let (heads, dim) = (2, 3);
        let mut short = KvCache::default();
        let short_keys = numbered(2, heads, 3, dim, 0.0);
        short.append(&short_keys, &short_keys).unwrap();
        let mut long = KvCache::default();
        let long_keys = numbered(1, heads, FIRST_CAPACITY + 60, dim, 9000.0);
        long.append(&long_keys, &long_keys).unwrap();
        let want = KvCache::gather(&[(&short, 0), (&short, 1), (&long, 0)], long.len).unwrap();
        let mut joined = short.clone();
        joined.append_rows(&long).unwrap();
        let flat = |c: &KvCache| {
            c.tensors()
                .unwrap()
                .0
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
        };
        assert_eq!(flat(&joined).unwrap(), flat(&want).unwrap());
        // The next decode step writes in place.
        let capacity = joined.capacity;
        assert!(capacity > joined.len);
        let next = numbered(3, heads, 1, dim, 0.0);
        joined.append(&next, &next).unwrap();
        assert_eq!(joined.capacity, capacity);
    }

    #[test]
    fn alibi_slopes_follow_transformers_for_powers_of_two_and_others() {
        let eight = alibi_slopes(8);
        assert_eq!(eight.len(), 8);
        assert!((eight[0] - 0.5).abs() < 1e-7 && (eight[7] - 1.0 / 256.0).abs() < 1e-9);
        // 6 heads: 4 slopes of base 2^-2, then 2^-1 and 2^-3 (odd powers of base 2^-1).
        let six = alibi_slopes(6);
        let want = [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125];
        for (got, want) in six.iter().zip(want) {
            assert!((got - want).abs() < 1e-7, "{six:?}");
        }
    }
}
