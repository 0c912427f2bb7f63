//! Attention a tile at a time with an online softmax (flash-attention's order of work on a
//! CPU): scores are computed for a tile of queries against a tile of keys, scaled, masked and
//! exponentiated there, and folded into running sums, so memory is `O(queries × tile)` however
//! long the sequence; tiles a query cannot see (the future, beyond a sliding window, padding
//! only) are never computed.
//!
//! A tile's queries are every query head sharing one key/value head (grouped-query attention)
//! at a run of positions, so each key and value is read once for the whole group: a decode
//! step (one position) streams the cache once per key/value head. The two products of a tile
//! go through `gemm`; the tiles of a pass run on the compute thread pool.

use std::ops::Range;

use gemm::Parallelism;

use super::mask::Mask;
use super::{HeadLayout, KvView, Scores};
use crate::error::Result;
use crate::models::elementwise::exp_shifted;

/// Query positions per tile (times the query heads of a group).
const QUERY_TILE: usize = 64;
/// Keys per tile.
const KEY_TILE: usize = 128;

/// Attention of f32 queries `q` `[B, heads, L, D]` (row-major) over the keys and values of
/// `kv` under `mask`: `[B, L, heads * D]` in f32.
pub(super) fn attend(
    q: &[f32],
    query_len: usize,
    kv: KvView,
    mask: &Mask,
    layout: &HeadLayout,
    scores: Scores,
) -> Result<Vec<f32>> {
    let (heads, dim) = (layout.heads, layout.head_dim);
    let batch = q.len() / (heads * query_len * dim).max(1);
    mask.check(batch, heads, query_len, kv.len)?;
    let pass = Pass {
        q,
        query_len,
        kv,
        mask,
        layout,
        scores,
    };
    let tiles: Vec<QueryTile> = (0..batch)
        .flat_map(|b| {
            (0..layout.kv_heads).flat_map(move |kv_head| {
                (0..query_len)
                    .step_by(QUERY_TILE)
                    .map(move |start| QueryTile {
                        b,
                        kv_head,
                        queries: start..(start + QUERY_TILE).min(query_len),
                    })
            })
        })
        .collect();
    let outputs: Vec<Vec<f32>> = if rayon::current_num_threads() == 1 {
        tiles.iter().map(|t| pass.run(t)).collect()
    } else {
        use rayon::prelude::*;
        tiles.par_iter().map(|t| pass.run(t)).collect()
    };
    let mut out = vec![0f32; batch * query_len * heads * dim];
    for (tile, output) in tiles.iter().zip(outputs) {
        let group = pass.group(tile.kv_head);
        let positions = tile.queries.len();
        for (g, head) in group.enumerate() {
            for (i, query) in tile.queries.clone().enumerate() {
                let row = &output[(g * positions + i) * dim..][..dim];
                let at = ((tile.b * query_len + query) * heads + head) * dim;
                out[at..at + dim].copy_from_slice(row);
            }
        }
    }
    Ok(out)
}

/// The queries of one tile: positions `queries` of sequence `b`, for every query head that
/// reads key/value head `kv_head`.
struct QueryTile {
    b: usize,
    kv_head: usize,
    queries: Range<usize>,
}

/// One attention pass's operands.
struct Pass<'a> {
    q: &'a [f32],
    query_len: usize,
    kv: KvView<'a>,
    mask: &'a Mask,
    layout: &'a HeadLayout,
    scores: Scores,
}

/// The running state of a tile's rows: the largest score seen, the sum of weights and the
/// weighted sum of values (each row's `D` outputs).
struct Running {
    max: Vec<f32>,
    sum: Vec<f32>,
    out: Vec<f32>,
}

impl Pass<'_> {
    /// The local query heads that read key/value head `kv_head`.
    fn group(&self, kv_head: usize) -> Range<usize> {
        let heads = 0..self.layout.heads;
        let first = heads
            .clone()
            .find(|&h| self.layout.kv_head_of(h) == kv_head);
        let end = heads
            .clone()
            .rev()
            .find(|&h| self.layout.kv_head_of(h) == kv_head);
        match (first, end) {
            (Some(first), Some(last)) => first..last + 1,
            _ => 0..0,
        }
    }

    /// The keys any query of `tile` may see (an empty range when none).
    fn key_span(&self, tile: &QueryTile) -> Range<usize> {
        let first = self.mask.visible_keys(tile.queries.start);
        let last = self.mask.visible_keys(tile.queries.end - 1);
        let mut span = first.start.min(last.start)..first.end.max(last.end);
        if let Some(kept) = self.mask.kept_row(tile.b) {
            let tokens = &kept[span.clone()];
            let lead = tokens.iter().take_while(|&&k| !k).count();
            let trail = tokens.iter().rev().take_while(|&&k| !k).count();
            span = (span.start + lead)..(span.end - trail).max(span.start + lead);
        }
        span
    }

    /// The outputs `[group heads × positions, D]` of one tile of queries.
    fn run(&self, tile: &QueryTile) -> Vec<f32> {
        let dim = self.layout.head_dim;
        let group = self.group(tile.kv_head);
        let positions = tile.queries.len();
        let rows = group.len() * positions;
        let mut queries = Vec::with_capacity(rows * dim);
        for head in group.clone() {
            let start =
                ((tile.b * self.layout.heads + head) * self.query_len + tile.queries.start) * dim;
            queries.extend_from_slice(&self.q[start..start + positions * dim]);
        }
        let mut running = Running {
            max: vec![f32::NEG_INFINITY; rows],
            sum: vec![0f32; rows],
            out: vec![0f32; rows * dim],
        };
        let base = (tile.b * self.layout.kv_heads + tile.kv_head) * self.kv.head_stride;
        let span = self.key_span(tile);
        let mut scores = vec![0f32; rows * KEY_TILE];
        for start in span.clone().step_by(KEY_TILE) {
            let keys = start..(start + KEY_TILE).min(span.end);
            let width = keys.len();
            let scores = &mut scores[..rows * width];
            // SAFETY: `queries` is `[rows, dim]`, the key tile `[width, dim]` (read transposed)
            // and `scores` `[rows, width]`, all row-major and in bounds.
            unsafe {
                gemm::gemm(
                    rows,
                    width,
                    dim,
                    scores.as_mut_ptr(),
                    1,
                    width as isize,
                    false,
                    queries.as_ptr(),
                    1,
                    dim as isize,
                    self.kv.keys[base + keys.start * dim..][..width * dim].as_ptr(),
                    dim as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
            for (g, head) in group.clone().enumerate() {
                for (i, query) in tile.queries.clone().enumerate() {
                    let row = g * positions + i;
                    let scores = &mut scores[row * width..(row + 1) * width];
                    self.weigh(
                        scores,
                        &mut running,
                        row,
                        (tile.b, head, query),
                        keys.clone(),
                    );
                }
            }
            // SAFETY: `scores` (the weights) is `[rows, width]`, the value tile `[width, dim]`
            // and the running outputs `[rows, dim]`, all row-major and in bounds.
            unsafe {
                gemm::gemm(
                    rows,
                    dim,
                    width,
                    running.out.as_mut_ptr(),
                    1,
                    dim as isize,
                    true,
                    scores.as_ptr(),
                    1,
                    width as isize,
                    self.kv.values[base + keys.start * dim..][..width * dim].as_ptr(),
                    1,
                    dim as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
        }
        for row in 0..rows {
            let out = &mut running.out[row * dim..(row + 1) * dim];
            if running.sum[row] > 0.0 {
                let inv = 1.0 / running.sum[row];
                out.iter_mut().for_each(|o| *o *= inv);
            } else {
                self.average_every_value(base, out);
            }
        }
        running.out
    }

    /// Turns one row's raw scores `q·k` over keys `keys` into softmax weights relative to the
    /// row's running maximum, rescaling what the row has gathered so far when the maximum grows.
    /// Hidden keys get weight 0.
    fn weigh(
        &self,
        scores: &mut [f32],
        running: &mut Running,
        row: usize,
        (b, head, query): (usize, usize, usize),
        keys: Range<usize>,
    ) {
        let visible = self.mask.visible_keys(query);
        let seen = keys.start.max(visible.start)..keys.end.min(visible.end);
        if seen.is_empty() {
            scores.fill(0.0);
            return;
        }
        let (scale, softcap) = (self.scores.scale as f32, self.scores.softcap);
        match softcap {
            None => scores.iter_mut().for_each(|s| *s *= scale),
            Some(cap) => {
                let cap = cap as f32;
                scores
                    .iter_mut()
                    .for_each(|s| *s = (*s * scale / cap).tanh() * cap);
            }
        }
        self.mask.add_bias(scores, head, b, query, keys.clone());
        let offset = keys.start;
        scores[..seen.start - offset].fill(f32::NEG_INFINITY);
        scores[seen.end - offset..].fill(f32::NEG_INFINITY);
        if let Some(kept) = self.mask.kept_row(b) {
            for (s, &k) in scores.iter_mut().zip(&kept[keys]) {
                if !k {
                    *s = f32::NEG_INFINITY;
                }
            }
        }
        let tile_max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        if tile_max == f32::NEG_INFINITY {
            scores.fill(0.0);
            return;
        }
        let max = running.max[row].max(tile_max);
        if max > running.max[row] {
            let correction = (running.max[row] - max).exp();
            running.sum[row] *= correction;
            let dim = self.layout.head_dim;
            running.out[row * dim..(row + 1) * dim]
                .iter_mut()
                .for_each(|o| *o *= correction);
            running.max[row] = max;
        }
        running.sum[row] += exp_shifted(scores, max);
    }

    /// The mean of every value of the head at `base`: the output of a query that sees no key
    /// (an additive mask of `finfo.min` leaves it a uniform distribution over all keys).
    fn average_every_value(&self, base: usize, out: &mut [f32]) {
        let dim = out.len();
        out.fill(0.0);
        for value in self.kv.values[base..base + self.kv.len * dim].chunks_exact(dim) {
            out.iter_mut().zip(value).for_each(|(o, v)| *o += v);
        }
        let inv = 1.0 / self.kv.len.max(1) as f32;
        out.iter_mut().for_each(|o| *o *= inv);
    }
}
