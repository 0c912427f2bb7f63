//! The multi-row matrix product of prefill: `y[m, n] = x[m, k] · w[n, k]ᵀ` for f32 activations
//! and a weight kept as its rank stores it (row-major `[out, in]`, f32, f16 or bf16, or
//! quantized rows dequantized a block at a time), on AVX-512 CPUs.
//!
//! A general matmul repacks the weight on every call; this one repacks only the activations
//! (64 tokens side by side per column), a fraction of the weight's size at prefill, and reads
//! f32 weight rows where they lie. A tile keeps 6 weight rows × 64 tokens of sums in 24
//! registers: each column costs four vector loads of activations and six broadcast weights for
//! 24 fused multiply-adds, and the next tile's weight rows are prefetched meanwhile. A few
//! tokens (a decode step of a batch) use tiles of 12 rows × 16 tokens instead, so that the
//! weights are still read once for all of them. Blocks of
//! weight rows are spread over the compute threads; 16-bit and quantized blocks are widened to
//! f32 once per block and reused by every token.
//!
//! On this project's 2-core AVX-512 machine a tile runs at ≈ 140 GFLOP/s per core, against
//! ≈ 95–130 for candle's general matmul on the same shapes (prefill of 128 tokens).

use std::ops::Range;

use crate::models::kernels::{self, Weight};

/// 16-lane vectors of tokens per tile when there are many tokens (prefill): 64 tokens × 6
/// weight rows.
const WIDE_VECTORS: usize = 4;
/// Weight rows per tile of the wide tiling.
const WIDE_ROWS: usize = 6;
/// Tokens up to which the narrow tiling is used (a decode step of a batch): 16 tokens × 12
/// weight rows, so that a few tokens do not pay for 64.
const NARROW_TOKENS: usize = 16;
/// Weight rows per tile of the narrow tiling.
const NARROW_ROWS: usize = 12;
/// Weight rows per tile of 2 and of 3 vectors of tokens (17 to 48 tokens: a decode step
/// beside a chunk of a prompt), so that such a pass does not pay for 64.
const TWO_VECTOR_ROWS: usize = 12;
const THREE_VECTOR_ROWS: usize = 8;
/// Most tokens a tile holds (the wide tiling's).
const MAX_TILE_TOKENS: usize = WIDE_VECTORS * 16;
/// Weight rows per task (a multiple of both tilings' rows); a 16-bit or quantized task widens
/// this many rows at a time.
const BLOCK_ROWS: usize = 48;
/// Token groups per pass over a row tile, so that the pass's packed activations stay in the
/// second-level cache.
const BLOCK_GROUPS: usize = 4;
/// Most columns per pass, so that a tile's weight rows stay in the first-level cache while
/// every token group passes over them.
const BLOCK_COLUMNS: usize = 1024;

/// Whether this CPU runs these kernels; callers fall back to a general matmul otherwise.
pub fn available() -> bool {
    kernels::has_avx512()
}

/// `x · wᵀ` `[m, n]` for `x` `[m, k]` and a dense `w` `[n, k]`, all row-major.
///
/// # Panics
/// If the lengths disagree with `k`, or the CPU lacks AVX-512 ([`available`]).
pub fn matmul<W: Weight>(x: &[f32], w: &[W], k: usize) -> Vec<f32> {
    let shape = Shape::of(x, w.len(), k);
    let tokens = &pack_tokens(x, shape);
    product(shape, |rows, scratch, out| {
        let block = &w[rows.start * k..rows.end * k];
        // SAFETY: `available()` was asserted by `Shape::of`; blocks write disjoint columns.
        unsafe {
            match W::as_f32(block) {
                Some(block) => avx512::block(tokens, block, shape, out, rows.start),
                None => {
                    avx512::widen(block, scratch);
                    avx512::block(tokens, scratch, shape, out, rows.start)
                }
            }
        }
    })
}

/// `x · wᵀ` `[m, n]` where `w` `[n, k]` is produced a block of rows at a time by
/// `dequantize(rows, buffer)`, which appends rows `rows` as f32 to `buffer`.
///
/// # Panics
/// If the lengths disagree with `k`, or the CPU lacks AVX-512 ([`available`]).
pub fn matmul_dequantized(
    x: &[f32],
    n: usize,
    k: usize,
    dequantize: impl Fn(Range<usize>, &mut Vec<f32>) + Sync,
) -> Vec<f32> {
    let shape = Shape::of(x, n * k, k);
    let tokens = &pack_tokens(x, shape);
    product(shape, |rows, scratch, out| {
        scratch.clear();
        dequantize(rows.clone(), scratch);
        assert_eq!(scratch.len(), rows.len() * k, "dequantized block size");
        // SAFETY: as in `matmul`, with the block's rows in `scratch`.
        unsafe { avx512::block(tokens, scratch, shape, out, rows.start) }
    })
}

/// Allocates the `[m, n]` output and runs `task(rows, scratch, output)` for every block of
/// [`BLOCK_ROWS`] weight rows, on the compute thread pool when it has more than one thread;
/// `scratch` is a buffer reused by the blocks of one thread.
fn product(shape: Shape, task: impl Fn(Range<usize>, &mut Vec<f32>, Output) + Sync) -> Vec<f32> {
    use rayon::prelude::*;
    let mut y = Vec::with_capacity(shape.m * shape.n);
    let out = Output(y.as_mut_ptr());
    let block = |b: usize| b * BLOCK_ROWS..((b + 1) * BLOCK_ROWS).min(shape.n);
    let blocks = shape.n.div_ceil(BLOCK_ROWS);
    if rayon::current_num_threads() == 1 {
        let mut scratch = Vec::new();
        (0..blocks).for_each(|b| task(block(b), &mut scratch, out));
    } else {
        (0..blocks)
            .into_par_iter()
            .for_each_init(Vec::new, |scratch, b| task(block(b), scratch, out));
    }
    // SAFETY: the first column pass of every block wrote each of its rows' m outputs, so all
    // m·n elements are initialised.
    unsafe { y.set_len(shape.m * shape.n) };
    y
}

/// The dimensions of one product, and the tiling they call for.
#[derive(Debug, Clone, Copy)]
struct Shape {
    m: usize,
    k: usize,
    n: usize,
    /// 16-lane vectors of tokens per tile.
    vectors: usize,
}

impl Shape {
    /// Checks the operands' lengths and the CPU, and returns the dimensions.
    fn of(x: &[f32], w_len: usize, k: usize) -> Shape {
        assert!(available(), "the prefill matmul needs AVX-512");
        assert!(
            k > 0 && x.len().is_multiple_of(k) && w_len.is_multiple_of(k),
            "matmul operand lengths"
        );
        let m = x.len() / k;
        Shape {
            m,
            k,
            n: w_len / k,
            vectors: if m <= NARROW_TOKENS {
                1
            } else {
                m.div_ceil(16).min(WIDE_VECTORS)
            },
        }
    }

    /// Tokens per tile.
    fn tile_tokens(self) -> usize {
        self.vectors * 16
    }
}

/// The activations regrouped for the tiles: for each group of a tile's tokens, for each
/// column, the group's values side by side (zero past the last token).
fn pack_tokens(x: &[f32], shape: Shape) -> Vec<f32> {
    let tile = shape.tile_tokens();
    let groups = shape.m.div_ceil(tile);
    let mut packed = vec![0f32; groups * shape.k * tile];
    for (group, packed) in packed.chunks_exact_mut(shape.k * tile).enumerate() {
        let first = group * tile;
        let tokens = &x[first * shape.k..((first + tile).min(shape.m)) * shape.k];
        // SAFETY: `available()` was asserted by `Shape::of`; `tokens` holds whole rows of k.
        unsafe { avx512::transpose_group(tokens, shape.k, shape.vectors, packed) };
    }
    packed
}

/// The output matrix as a raw pointer, so blocks running on different threads can write their
/// own (disjoint) columns of it.
#[derive(Debug, Clone, Copy)]
struct Output(*mut f32);

// SAFETY: blocks write disjoint columns of the output, which `product` owns until every
// block has finished.
unsafe impl Send for Output {}
// SAFETY: as above.
unsafe impl Sync for Output {}

/// Splits `0..k` into passes of at most [`BLOCK_COLUMNS`] columns, of similar widths.
fn column_passes(k: usize) -> impl Iterator<Item = Range<usize>> {
    let passes = k.div_ceil(BLOCK_COLUMNS);
    let width = k.div_ceil(passes);
    (0..k)
        .step_by(width)
        .map(move |start| start..(start + width).min(k))
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{
        column_passes, Output, Shape, Weight, BLOCK_GROUPS, MAX_TILE_TOKENS, NARROW_ROWS,
        THREE_VECTOR_ROWS, TWO_VECTOR_ROWS, WIDE_ROWS, WIDE_VECTORS,
    };

    /// Replaces `out` with `w` widened to f32.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F/BW/VL and F16C.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    pub unsafe fn widen<W: Weight>(w: &[W], out: &mut Vec<f32>) {
        out.clear();
        out.reserve(w.len());
        let mut i = 0;
        while i < w.len() {
            let count = (w.len() - i).min(16);
            let mask = if count == 16 {
                u16::MAX
            } else {
                (1u16 << count) - 1
            };
            // SAFETY: the mask selects elements i .. i + count of `w`, and `out` has room for
            // them (reserved above).
            let values = W::load16(w.as_ptr().add(i), mask);
            _mm512_mask_storeu_ps(out.as_mut_ptr().add(i), mask, values);
            i += count;
        }
        out.set_len(w.len());
    }

    /// Writes `packed[c * tile + t] = tokens[t * k + c]` for the (at most `tile = vectors ·
    /// 16`) rows of `tokens`, leaving the lanes of missing tokens untouched.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F; `tokens` is a whole number (≤ `tile`) of rows of `k`,
    /// and `packed` holds `k * tile` values.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn transpose_group(tokens: &[f32], k: usize, vectors: usize, packed: &mut [f32]) {
        let tile = vectors * 16;
        let count = tokens.len() / k;
        assert!(count <= tile && packed.len() == k * tile && k < i32::MAX as usize / tile);
        let stride = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(k as i32),
        );
        for half in 0..vectors {
            let lanes = count.saturating_sub(half * 16).min(16);
            if lanes == 0 {
                break;
            }
            let mask = if lanes == 16 {
                u16::MAX
            } else {
                (1u16 << lanes) - 1
            };
            let base = tokens.as_ptr().add(half * 16 * k);
            for c in 0..k {
                // SAFETY: the mask selects tokens half·16 + t < count, whose column c is inside
                // `tokens`; the store writes lanes of column c of the packed group.
                let values = _mm512_mask_i32gather_ps::<4>(
                    _mm512_setzero_ps(),
                    mask,
                    stride,
                    base.add(c).cast(),
                );
                _mm512_mask_storeu_ps(packed.as_mut_ptr().add(c * tile + half * 16), mask, values);
            }
        }
    }

    /// Multiplies every token of `tokens` (packed by `pack_tokens`) by the f32 weight rows `w`
    /// (`[rows, k]`, the rows starting at output column `first_column`) into `out`.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F and FMA; `tokens` is packed for `shape`, `w` a whole
    /// number of rows of `k`, and `out` an `[m, n]` matrix whose columns `first_column ..` of
    /// `w`'s rows nobody else writes meanwhile.
    #[target_feature(enable = "avx512f,fma")]
    pub unsafe fn block(
        tokens_packed: &[f32],
        w: &[f32],
        shape: Shape,
        out: Output,
        first_column: usize,
    ) {
        match shape.vectors {
            WIDE_VECTORS => {
                tiles::<WIDE_VECTORS, WIDE_ROWS>(tokens_packed, w, shape, out, first_column)
            }
            3 => tiles::<3, THREE_VECTOR_ROWS>(tokens_packed, w, shape, out, first_column),
            2 => tiles::<2, TWO_VECTOR_ROWS>(tokens_packed, w, shape, out, first_column),
            _ => tiles::<1, NARROW_ROWS>(tokens_packed, w, shape, out, first_column),
        }
    }

    /// [`block`] in tiles of `V` vectors of tokens × `R` weight rows.
    ///
    /// # Safety
    /// As for [`block`]; `V` is `shape.vectors`.
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn tiles<const V: usize, const R: usize>(
        tokens_packed: &[f32],
        w: &[f32],
        shape: Shape,
        out: Output,
        first_column: usize,
    ) {
        let rows = w.len() / shape.k;
        let tile_tokens = V * 16;
        let block_tokens = BLOCK_GROUPS * tile_tokens;
        for (pass, columns) in column_passes(shape.k).enumerate() {
            for tokens in (0..shape.m).step_by(block_tokens) {
                let token_end = (tokens + block_tokens).min(shape.m);
                for row in (0..rows).step_by(R) {
                    for token in (tokens..token_end).step_by(tile_tokens) {
                        // The first token group fetches the next tile's weight rows from
                        // memory while it works, so that they are in cache when it starts.
                        let next = row + R..(row + 2 * R).min(rows);
                        let tile = Tile {
                            tokens: token..(token + tile_tokens).min(token_end),
                            rows: row..(row + R).min(rows),
                            prefetch: if token == tokens { next } else { 0..0 },
                        };
                        tile.compute::<V, R>(
                            tokens_packed,
                            w,
                            shape,
                            columns.clone(),
                            out,
                            first_column,
                            pass > 0,
                        );
                    }
                }
            }
        }
    }

    /// A packed group of tokens times a few weight rows.
    struct Tile {
        tokens: Range<usize>,
        rows: Range<usize>,
        /// Weight rows to prefetch (into cache) along the way.
        prefetch: Range<usize>,
    }

    impl Tile {
        /// Adds (or, on the first pass, writes) the dot products over `columns`. A tile with
        /// fewer rows repeats its last row in the unused registers and discards their sums.
        ///
        /// # Safety
        /// As for [`block`]; `tokens` and `rows` are inside the packed tokens and `w`.
        #[target_feature(enable = "avx512f,fma")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn compute<const V: usize, const R: usize>(
            &self,
            tokens: &[f32],
            w: &[f32],
            shape: Shape,
            columns: Range<usize>,
            out: Output,
            first_column: usize,
            accumulate: bool,
        ) {
            let k = shape.k;
            let group = tokens.as_ptr().add(self.tokens.start * k);
            let ws: [*const f32; R] = std::array::from_fn(|r| {
                let row = (self.rows.start + r).min(self.rows.end - 1);
                w.as_ptr().add(row * k)
            });
            let ahead: [*const f32; R] =
                std::array::from_fn(|r| w.as_ptr().wrapping_add((self.prefetch.start + r) * k));
            let mut acc = [[_mm512_setzero_ps(); V]; R];
            for start in columns.clone().step_by(16) {
                for &row in &ahead[..self.prefetch.len()] {
                    // A hint only: the rows to prefetch exist, so the address is inside `w`.
                    _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(start).cast());
                }
                for c in start..(start + 16).min(columns.end) {
                    // SAFETY: column c < k of the token group and of each weight row.
                    let lanes = group.add(c * V * 16);
                    let xv: [__m512; V] =
                        std::array::from_fn(|v| _mm512_loadu_ps(lanes.add(v * 16)));
                    for (r, &wp) in ws.iter().enumerate() {
                        let wv = _mm512_set1_ps(*wp.add(c));
                        for v in 0..V {
                            acc[r][v] = _mm512_fmadd_ps(xv[v], wv, acc[r][v]);
                        }
                    }
                }
            }
            let mut sums = [[0f32; MAX_TILE_TOKENS]; R];
            for (sum, acc) in sums.iter_mut().zip(acc) {
                for (v, acc) in acc.iter().enumerate() {
                    _mm512_storeu_ps(sum.as_mut_ptr().add(v * 16), *acc);
                }
            }
            for (t, token) in self.tokens.clone().enumerate() {
                let line = out.0.add(token * shape.n + first_column);
                for (r, row) in self.rows.clone().enumerate() {
                    let y = line.add(row);
                    *y = if accumulate {
                        *y + sums[r][t]
                    } else {
                        sums[r][t]
                    };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(12345);
        (0..n)
            .map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (state >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    }

    fn reference(x: &[f32], w: &[f32], k: usize) -> Vec<f64> {
        let mut y = Vec::new();
        for xr in x.chunks_exact(k) {
            for wr in w.chunks_exact(k) {
                y.push(xr.iter().zip(wr).map(|(a, b)| *a as f64 * *b as f64).sum());
            }
        }
        y
    }

    fn assert_close(got: &[f32], want: &[f64], k: usize, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        let tolerance = 1e-6 * (k as f64).sqrt() * 4.0;
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (*g as f64 - w).abs() <= tolerance,
                "{what}: element {i} is {g}, expected {w}"
            );
        }
    }

    /// Shapes `(m, k, n)` covering every tiling (1 to 4 vectors of tokens), partial tiles,
    /// partial 16-column steps, several column passes and several token blocks.
    const SHAPES: [(usize, usize, usize); 10] = [
        (1, 1, 1),
        (2, 17, 5),
        (4, 64, 6),
        (7, 100, 13),
        (9, 576, 50),
        (24, 100, 50),
        (33, 17, 13),
        (40, 576, 31),
        (130, 33, 7),
        (5, 2100, 49),
    ];

    #[test]
    fn f32_product_matches_a_double_precision_reference() {
        if crate::models::kernels::skips_without_avx512(
            "f32_product_matches_a_double_precision_reference",
        ) {
            return;
        }
        for (m, k, n) in SHAPES {
            let (x, w) = (data(m * k, 1), data(n * k, 2));
            let y = matmul(&x, &w, k);
            assert_close(&y, &reference(&x, &w, k), k, &format!("{m}x{k}x{n}"));
        }
    }

    #[test]
    fn sixteen_bit_weights_are_widened_exactly() {
        if crate::models::kernels::skips_without_avx512("sixteen_bit_weights_are_widened_exactly") {
            return;
        }
        for (m, k, n) in SHAPES {
            let x = data(m * k, 3);
            let w16: Vec<half::f16> = data(n * k, 4)
                .into_iter()
                .map(half::f16::from_f32)
                .collect();
            let wb: Vec<half::bf16> = w16
                .iter()
                .map(|v| half::bf16::from_f32(v.to_f32()))
                .collect();
            let widened: Vec<f32> = w16.iter().map(|v| v.to_f32()).collect();
            let want = reference(&x, &widened, k);
            let y = matmul(&x, &w16, k);
            assert_close(&y, &want, k, &format!("f16 {m}x{k}x{n}"));
            let y = matmul(&x, &wb, k);
            let widened_b: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
            assert_close(
                &y,
                &reference(&x, &widened_b, k),
                k,
                &format!("bf16 {m}x{k}x{n}"),
            );
        }
    }

    #[test]
    fn dequantized_blocks_give_the_dense_product() {
        if crate::models::kernels::skips_without_avx512("dequantized_blocks_give_the_dense_product")
        {
            return;
        }
        let (m, k, n) = (6, 96, 100);
        let (x, w) = (data(m * k, 5), data(n * k, 6));
        let y = matmul_dequantized(&x, n, k, |rows, out| {
            out.extend_from_slice(&w[rows.start * k..rows.end * k])
        });
        assert_close(&y, &reference(&x, &w, k), k, "dequantized");
    }

    #[test]
    fn column_passes_cover_every_column_once() {
        for k in [1, 16, 1000, 1024, 1025, 2048, 8192, 8200] {
            let passes: Vec<_> = column_passes(k).collect();
            assert_eq!(passes.first().map(|p| p.start), Some(0));
            assert_eq!(passes.last().map(|p| p.end), Some(k));
            for pair in passes.windows(2) {
                assert_eq!(pair[0].end, pair[1].start);
            }
            assert!(passes.iter().all(|p| p.len() <= super::BLOCK_COLUMNS));
        }
    }
}
