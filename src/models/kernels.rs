//! Hand-written kernels for the decode hot path: a matrix-vector product that streams the weight
//! matrix once, row by row, with AVX-512 or AVX2/FMA where the CPU has it (detected at run time).
//!
//! At batch 1 a linear layer reads every weight once and does two flops per weight, so decode
//! speed is set by how fast weights stream from memory. The general matmul pays for packing and
//! blocking it cannot use at one row; this kernel does not.

/// Whether this CPU runs the AVX-512 kernels (AVX-512 F/BW/VL, FMA and F16C).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && has_avx2()
}

/// In a test of the AVX-512 kernels: whether this CPU lacks them, in which case the test says
/// it is skipped (visibly, so that it is not mistaken for a pass) and must return.
#[cfg(all(test, target_arch = "x86_64"))]
pub(crate) fn skips_without_avx512(test: &str) -> bool {
    let lacks = !has_avx512();
    if lacks {
        eprintln!("\nskipped: {test}: this CPU lacks AVX-512 (F, BW, VL)\n");
    }
    lacks
}

/// Whether this CPU runs the AVX2 kernels (AVX2, FMA and F16C).
#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
}

/// A weight element the kernels read: f32, or a 16-bit float widened to f32 on the fly.
pub trait Weight: Copy + Sync {
    /// One weight as f32.
    fn widen(self) -> f32;

    /// The slice itself when the weights already are f32 (nothing to widen).
    fn as_f32(slice: &[Self]) -> Option<&[f32]> {
        let _ = slice;
        None
    }

    /// Loads eight weights starting at `ptr` as f32 lanes.
    ///
    /// # Safety
    /// Eight elements must be readable at `ptr`; the CPU must support AVX2, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(ptr: *const Self) -> std::arch::x86_64::__m256;

    /// Loads the first weights of `ptr` selected by `mask` (of sixteen) as f32 lanes, zero
    /// elsewhere; only the selected elements are read.
    ///
    /// # Safety
    /// The selected elements must be readable at `ptr`; the CPU must support AVX-512 F/BW/VL
    /// and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(ptr: *const Self, mask: u16) -> std::arch::x86_64::__m512;
}

/// `out[o] = Σ_k x[k] · w[o·cols + k]` for a row-major `w` of `out.len()` rows and `x.len()`
/// columns.
pub fn matvec<W: Weight>(w: &[W], x: &[f32], out: &mut [f32]) {
    debug_assert_eq!(w.len(), x.len() * out.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: as below, for the AVX-512 features checked here.
        unsafe { avx512::matvec(w, x, out) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports the kernel's features (checked just above), and the slices'
        // lengths are consistent (every row of `w` has `x.len()` elements).
        unsafe { avx2::matvec(w, x, out) };
        return;
    }
    for (row, y) in w.chunks_exact(x.len()).zip(out.iter_mut()) {
        *y = dot_portable(row, x);
    }
}

/// Most tokens [`matmul_few`] takes: beyond, the tiled prefill product is faster.
pub(crate) const FEW_TOKENS: usize = 16;

/// `out[t·n + o] = Σ_c x[t·k + c] · w[o·k + c]` for a few tokens (`x` `[m, k]`, `m` ≤
/// [`FEW_TOKENS`]) and a row-major `w` `[n, k]`: a batch's decode step. Like [`matvec`], it
/// streams each weight row once from memory, for all the tokens at once.
///
/// # Panics
/// If the CPU lacks AVX-512 (callers check [`has_avx512`]) or the lengths disagree.
#[cfg(target_arch = "x86_64")]
pub(crate) fn matmul_few<W: Weight>(w: &[W], x: &[f32], k: usize, out: &mut [f32]) {
    assert!(has_avx512(), "matmul_few needs AVX-512");
    assert!(
        k > 0 && x.len().is_multiple_of(k) && w.len().is_multiple_of(k),
        "matmul_few operand lengths"
    );
    assert_eq!(
        out.len(),
        x.len() / k * (w.len() / k),
        "matmul_few output length"
    );
    // SAFETY: the CPU supports the kernel's features and the lengths are consistent (checked
    // just above).
    unsafe { avx512::matmul_few(w, x, k, out) }
}

/// A dot product in eight independent lanes (so the compiler may vectorise it).
fn dot_portable<W: Weight>(a: &[W], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (a_chunks, b_chunks) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x.widen() * y)
        .sum();
    for (ca, cb) in a_chunks.zip(b_chunks) {
        for i in 0..8 {
            lanes[i] += ca[i].widen() * cb[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

impl Weight for f32 {
    fn widen(self) -> f32 {
        self
    }

    fn as_f32(slice: &[f32]) -> Option<&[f32]> {
        Some(slice)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(ptr: *const f32) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(ptr)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(ptr: *const f32, mask: u16) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_maskz_loadu_ps(mask, ptr)
    }
}

impl Weight for half::f16 {
    fn widen(self) -> f32 {
        self.to_f32()
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(ptr: *const half::f16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(ptr as *const __m128i))
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(ptr: *const half::f16, mask: u16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, ptr as *const i16))
    }
}

impl Weight for half::bf16 {
    fn widen(self) -> f32 {
        self.to_f32()
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(ptr: *const half::bf16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // bfloat16 is the top half of an f32: widen to 32 bits and shift into place.
        let wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(ptr as *const __m128i));
        _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16))
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(ptr: *const half::bf16, mask: u16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        let wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, ptr as *const i16));
        _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16))
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::Weight;

    /// Rows computed together: several weight streams in flight keep more cache misses
    /// outstanding than one, which is what a memory-bound matrix-vector product needs.
    const ROWS: usize = 8;

    /// Sums the eight lanes of `v`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn horizontal_sum(v: __m256) -> f32 {
        let pair = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let quad = _mm_add_ps(pair, _mm_movehl_ps(pair, pair));
        _mm_cvtss_f32(_mm_add_ss(quad, _mm_shuffle_ps(quad, quad, 1)))
    }

    /// A dot product in plain arithmetic, for tails and leftover rows.
    fn dot_scalar<W: Weight>(row: &[W], x: &[f32]) -> f32 {
        row.iter().zip(x).map(|(w, x)| w.widen() * x).sum()
    }

    /// `out[o] = Σ_k x[k] · w[o·cols + k]`, [`ROWS`] rows at a time, eight columns per step.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `w.len() == x.len() * out.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn matvec<W: Weight>(w: &[W], x: &[f32], out: &mut [f32]) {
        let cols = x.len();
        let wide = cols / 8 * 8;
        let mut o = 0;
        while o + ROWS <= out.len() {
            let rows: [*const W; ROWS] = std::array::from_fn(|r| w.as_ptr().add((o + r) * cols));
            let mut acc = [_mm256_setzero_ps(); ROWS];
            let mut k = 0;
            while k < wide {
                // SAFETY: k + 8 <= wide <= cols, inside x and each of the rows.
                let xv = _mm256_loadu_ps(x.as_ptr().add(k));
                for r in 0..ROWS {
                    acc[r] = _mm256_fmadd_ps(W::load8(rows[r].add(k)), xv, acc[r]);
                }
                k += 8;
            }
            for r in 0..ROWS {
                let row = &w[(o + r) * cols..(o + r + 1) * cols];
                out[o + r] = horizontal_sum(acc[r]) + dot_scalar(&row[wide..], &x[wide..]);
            }
            o += ROWS;
        }
        for r in o..out.len() {
            out[r] = dot_scalar(&w[r * cols..(r + 1) * cols], x);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::Weight;

    /// Weight rows of a [`matmul_few`] group.
    const FEW_ROWS: usize = 4;
    /// Tokens of a [`matmul_few`] pass over a group: 4 × 4 sums in registers.
    const FEW_PASS: usize = 4;

    /// [`super::matmul_few`]: groups of four weight rows; for each, passes of four tokens over
    /// all columns, sixteen at a time (the group's rows stay in cache between passes, so they
    /// come from memory once). The first pass prefetches the next group's rows.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F/BW/VL, FMA and F16C; `x` is `[m, k]`, `w` `[n, k]` and
    /// `out` `[m, n]`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
    pub unsafe fn matmul_few<W: Weight>(w: &[W], x: &[f32], k: usize, out: &mut [f32]) {
        let (m, n) = (x.len() / k, w.len() / k);
        let per_line = 64 / std::mem::size_of::<W>();
        for row in (0..n).step_by(FEW_ROWS) {
            let rows = FEW_ROWS.min(n - row);
            let ws: [*const W; FEW_ROWS] =
                std::array::from_fn(|r| w.as_ptr().add((row + r.min(rows - 1)) * k));
            let next = w.as_ptr().wrapping_add((row + FEW_ROWS) * k);
            let end = w.as_ptr_range().end;
            for first in (0..m).step_by(FEW_PASS) {
                let tokens = FEW_PASS.min(m - first);
                let xs: [*const f32; FEW_PASS] =
                    std::array::from_fn(|t| x.as_ptr().add((first + t.min(tokens - 1)) * k));
                let mut acc = [[_mm512_setzero_ps(); FEW_ROWS]; FEW_PASS];
                let mut c = 0;
                while c < k {
                    let mask = if k - c >= 16 {
                        u16::MAX
                    } else {
                        (1u16 << (k - c)) - 1
                    };
                    if first == 0 && c % per_line == 0 {
                        for r in 0..FEW_ROWS {
                            // A hint only: an address past the weights is never handed to it.
                            let ahead = next.wrapping_add(r * k + c);
                            if ahead < end {
                                _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
                            }
                        }
                    }
                    // SAFETY: the mask selects columns c .. min(c + 16, k) of each row.
                    let wv: [__m512; FEW_ROWS] =
                        std::array::from_fn(|r| W::load16(ws[r].add(c), mask));
                    for (t, acc) in acc.iter_mut().enumerate() {
                        let xv = _mm512_maskz_loadu_ps(mask, xs[t].add(c));
                        for (a, &wr) in acc.iter_mut().zip(&wv) {
                            *a = _mm512_fmadd_ps(xv, wr, *a);
                        }
                    }
                    c += 16;
                }
                for (t, acc) in acc.iter().enumerate().take(tokens) {
                    for (r, a) in acc.iter().enumerate().take(rows) {
                        out[(first + t) * n + row + r] = _mm512_reduce_add_ps(*a);
                    }
                }
            }
        }
    }

    /// Rows computed together, sharing each load of `x`.
    const ROWS: usize = 8;

    /// `out[o] = Σ_k x[k] · w[o·cols + k]`, [`ROWS`] rows at a time, sixteen columns per step;
    /// the last step of a row and the last group of rows are masked rather than scalar.
    ///
    /// While a group is summed, the same columns of the next group are prefetched, one cache
    /// line per row per line consumed: 16-bit weights otherwise keep too few misses in flight
    /// to stream at the memory's speed (≈ 10 instead of ≈ 14 GB/s on one core here).
    ///
    /// # Safety
    /// The CPU must support AVX-512 F/BW/VL, FMA and F16C; `w.len() == x.len() * out.len()`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
    pub unsafe fn matvec<W: Weight>(w: &[W], x: &[f32], out: &mut [f32]) {
        let cols = x.len();
        let per_line = 64 / std::mem::size_of::<W>();
        let end = w.as_ptr_range().end;
        let mut o = 0;
        while o < out.len() {
            let group = ROWS.min(out.len() - o);
            // SAFETY: rows o .. o + group exist, each of `cols` elements.
            let base = w.as_ptr().add(o * cols);
            let mut acc = [_mm512_setzero_ps(); ROWS];
            let mut k = 0;
            while k < cols {
                let mask = if cols - k >= 16 {
                    u16::MAX
                } else {
                    (1u16 << (cols - k)) - 1
                };
                if k % per_line == 0 {
                    for r in 0..ROWS {
                        // A hint only: an address past the weights is never handed to it.
                        let next = base.wrapping_add((ROWS + r) * cols + k);
                        if next < end {
                            _mm_prefetch::<_MM_HINT_T0>(next as *const i8);
                        }
                    }
                }
                // SAFETY: the mask selects columns k .. min(k + 16, cols) only.
                let xv = _mm512_maskz_loadu_ps(mask, x.as_ptr().add(k));
                if group == ROWS {
                    for (r, acc) in acc.iter_mut().enumerate() {
                        *acc = _mm512_fmadd_ps(W::load16(base.add(r * cols + k), mask), xv, *acc);
                    }
                } else {
                    for (r, acc) in acc.iter_mut().enumerate().take(group) {
                        *acc = _mm512_fmadd_ps(W::load16(base.add(r * cols + k), mask), xv, *acc);
                    }
                }
                k += 16;
            }
            for (y, acc) in out[o..o + group].iter_mut().zip(acc) {
                *y = _mm512_reduce_add_ps(acc);
            }
            o += group;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(w: &[f32], x: &[f32]) -> Vec<f64> {
        w.chunks_exact(x.len())
            .map(|row| row.iter().zip(x).map(|(a, b)| *a as f64 * *b as f64).sum())
            .collect()
    }

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 500.0 - 1.0
            })
            .collect()
    }

    /// The outputs of every kernel this CPU can run: the dispatching entry point, and the AVX2
    /// kernel on its own when the CPU would dispatch elsewhere.
    fn kernel_outputs<W: Weight>(w: &[W], x: &[f32], rows: usize) -> Vec<(&'static str, Vec<f32>)> {
        let mut outputs = vec![("dispatched", vec![0f32; rows])];
        matvec(w, x, &mut outputs[0].1);
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            let mut out = vec![0f32; rows];
            // SAFETY: the CPU supports AVX2, FMA and F16C; w holds `rows` rows of x.len().
            unsafe { avx2::matvec(w, x, &mut out) };
            outputs.push(("avx2", out));
        }
        let mut out = vec![0f32; rows];
        for (row, y) in w.chunks_exact(x.len()).zip(out.iter_mut()) {
            *y = dot_portable(row, x);
        }
        outputs.push(("portable", out));
        outputs
    }

    /// Checks `matvec` on weights converted by `to_weight` against a double-precision product of
    /// the same (rounded) weights, for several widths.
    fn check<W: Weight>(widths: &[usize], to_weight: fn(f32) -> W) {
        for (i, &cols) in widths.iter().enumerate() {
            let (rows, x) = (19, data(cols, i as u32));
            let w: Vec<W> = data(rows * cols, 100 + i as u32)
                .into_iter()
                .map(to_weight)
                .collect();
            let widened: Vec<f32> = w.iter().map(|v| v.widen()).collect();
            for (kernel, out) in kernel_outputs(&w, &x, rows) {
                for (got, want) in out.iter().zip(reference(&widened, &x)) {
                    assert!(
                        (*got as f64 - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "{kernel} kernel, cols {cols}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_few_token_product_matches_the_matrix_vector_kernel_row_by_row() {
        if skips_without_avx512("the_few_token_product_matches_the_matrix_vector_kernel_row_by_row")
        {
            return;
        }
        for (m, k, n) in [
            (1, 16, 4),
            (2, 17, 5),
            (5, 100, 13),
            (8, 576, 30),
            (16, 33, 7),
        ] {
            let x = data(m * k, 7);
            let w16: Vec<half::f16> = data(n * k, 8)
                .into_iter()
                .map(half::f16::from_f32)
                .collect();
            let mut few = vec![f32::NAN; m * n];
            matmul_few(&w16, &x, k, &mut few);
            for t in 0..m {
                let mut one = vec![0f32; n];
                matvec(&w16, &x[t * k..(t + 1) * k], &mut one);
                for (o, (a, b)) in few[t * n..(t + 1) * n].iter().zip(&one).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-5 * (k as f32).sqrt(),
                        "{m}x{k}x{n} token {t} row {o}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn f32_matvec_matches_a_double_precision_reference_for_odd_widths() {
        check(&[1, 7, 31, 32, 33, 576, 1000], |v| v);
    }

    #[test]
    fn f16_matvec_matches_the_widened_weights() {
        check(&[3, 32, 100, 576], half::f16::from_f32);
    }

    #[test]
    fn bf16_matvec_matches_the_widened_weights() {
        check(&[5, 64, 577], half::bf16::from_f32);
    }
}
