//! Fast in-place `f32` elementwise kernels for CPU inference: `exp`, SiLU, SiLU-gated
//! multiply (the SwiGLU MLP step) and row-wise softmax.
//!
//! Every public function is safe and picks its implementation at run time: an AVX-512F
//! path (16 lanes per step, masked loads/stores for the tail) when the CPU has it, and a
//! portable scalar path built on [`f32::exp`] everywhere else (including non-x86-64
//! targets).
//!
//! The vector `exp` reduces `x = n·ln2 + r` with `n = round(x·log2 e)` and a two-constant
//! (hi/lo) split of `ln2` applied with FMAs, evaluates a degree-7 polynomial for `exp(r)` on
//! `|r| ≤ ln2/2`, and scales by `2^n` with `vscalefps`, which saturates to `+inf` and
//! flushes to `0` without integer-exponent tricks. Its relative error stays below `3e-7`
//! (about 2 ulp) wherever the result is a normal `f32`; `exp(-inf) = 0` exactly,
//! `exp(+inf) = +inf`, and NaN propagates.

/// Inputs to the vector `exp` are clamped to `[EXP_LO, EXP_HI]` (NaN passes through).
/// `exp(EXP_LO)` is far below the smallest subnormal and `exp(EXP_HI)` far above
/// `f32::MAX`, so `vscalefps` turns them into exactly `0` and `+inf`.
#[cfg(target_arch = "x86_64")]
const EXP_LO: f32 = -150.0;
#[cfg(target_arch = "x86_64")]
const EXP_HI: f32 = 100.0;

/// Below this, `silu(v)` rounds to `-0.0` in `f32`; clamping there keeps `-inf` from
/// producing `-inf · 0 = NaN`.
const SILU_LO: f32 = -200.0;

/// Runs the AVX-512 version of a kernel when the CPU has AVX-512F, the scalar one otherwise.
macro_rules! dispatch {
    ($kernel:ident($($arg:expr),*)) => {{
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F, the only feature the AVX-512 kernels enable.
            return unsafe { avx512::$kernel($($arg),*) };
        }
        scalar::$kernel($($arg),*)
    }};
}

/// In place: `gate[i] = silu(gate[i]) * up[i]`, with `silu(v) = v / (1 + exp(-v))`.
///
/// This is the gating step of a SwiGLU MLP. The slices must have the same length; that
/// is checked with `debug_assert!` only, and in release builds only the common prefix is
/// processed. `silu` of very negative inputs (including `-inf`) is `-0.0`, never NaN;
/// `silu(+inf) = +inf`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    debug_assert_eq!(gate.len(), up.len(), "silu_mul: gate/up length mismatch");
    dispatch!(silu_mul(gate, up))
}

/// In place: `x[i] = silu(x[i]) = x[i] / (1 + exp(-x[i]))`.
///
/// Very negative inputs (including `-inf`) give `-0.0`, `+inf` gives `+inf`, NaN stays
/// NaN. Relative error is below `1e-6` wherever the result is a normal `f32`.
pub fn silu(x: &mut [f32]) {
    dispatch!(silu(x))
}

/// In place: softmax over each row of `cols` consecutive elements of `x`.
///
/// `x.len()` must be a multiple of `cols` (checked with `debug_assert!`; in release builds
/// a trailing partial row is left untouched). Each row is shifted by its maximum before
/// exponentiation, so large logits do not overflow. Entries equal to `-inf` (masked
/// positions) come out as exactly `0.0`.
///
/// Unlike PyTorch, which returns NaN for a row whose entries are all `-inf`, such a row
/// (a fully masked query) becomes all zeros here, so it cannot poison later sums. A row
/// containing NaN or `+inf` becomes NaN, as in PyTorch. `cols == 0` is accepted only
/// with an empty `x` and does nothing.
pub fn softmax_rows(x: &mut [f32], cols: usize) {
    if cols == 0 {
        debug_assert!(x.is_empty(), "softmax_rows: cols == 0 with non-empty input");
        return;
    }
    debug_assert_eq!(
        x.len() % cols,
        0,
        "softmax_rows: length is not a multiple of cols"
    );
    dispatch!(softmax_rows(x, cols))
}

/// In place: `x[i] = exp(x[i] - shift)`, returning the sum of the results: the middle pass
/// of a softmax, which attention's online softmax runs a tile of scores at a time.
///
/// Entries equal to `-inf` (hidden keys) come out as exactly `0.0`; results below `2^-124`
/// flush to zero on the AVX-512 path (they cannot change a sum of at least 1).
pub fn exp_shifted(x: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if !std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
    {
        // SAFETY: the CPU supports AVX2 and FMA, the features the AVX2 kernel enables.
        return unsafe { avx2::exp_shifted(x, shift) };
    }
    dispatch!(exp_shifted(x, shift))
}

/// In place: `x[i] = exp(x[i])` (the primitive under SiLU and softmax, tested on its own).
///
/// Relative error is below `3e-7` wherever the result is a normal `f32`. `exp(-inf)` is
/// exactly `0.0`, large inputs give `+inf`, NaN stays NaN.
#[cfg(test)]
pub fn exp_inplace(x: &mut [f32]) {
    dispatch!(exp_inplace(x))
}

/// Portable implementations, used when AVX-512F is unavailable.
mod scalar {
    use super::SILU_LO;

    /// `silu(v)`, with very negative inputs (and `-inf`) mapped to `-0.0`.
    ///
    /// Uses `e = exp(-|v|)` so nothing overflows: `v / (1 + e)` for `v ≥ 0`,
    /// `v · e / (1 + e)` for `v < 0`.
    #[inline]
    pub(super) fn silu1(v: f32) -> f32 {
        if v < SILU_LO {
            return -0.0;
        }
        let e = (-v.abs()).exp();
        let num = if v < 0.0 { v * e } else { v };
        num / (1.0 + e)
    }

    pub(super) fn silu_mul(gate: &mut [f32], up: &[f32]) {
        for (g, &u) in gate.iter_mut().zip(up) {
            *g = silu1(*g) * u;
        }
    }

    pub(super) fn silu(x: &mut [f32]) {
        for v in x {
            *v = silu1(*v);
        }
    }

    #[cfg(test)]
    pub(super) fn exp_inplace(x: &mut [f32]) {
        for v in x {
            *v = v.exp();
        }
    }

    pub(super) fn exp_shifted(x: &mut [f32], shift: f32) -> f32 {
        // Accumulate in f64: a long sequential f32 sum drifts by more than 1e-6.
        let mut sum = 0.0f64;
        for v in x.iter_mut() {
            *v = (*v - shift).exp();
            sum += *v as f64;
        }
        sum as f32
    }

    pub(super) fn softmax_rows(x: &mut [f32], cols: usize) {
        for row in x.chunks_exact_mut(cols) {
            // NaN entries are skipped here but still turn the whole row into NaN below,
            // through the sum.
            let max = row
                .iter()
                .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
            if max == f32::NEG_INFINITY {
                row.fill(0.0);
                continue;
            }
            let inv = 1.0 / exp_shifted(row, max);
            for v in row.iter_mut() {
                *v *= inv;
            }
        }
    }
}

/// The AVX2 version of [`exp_shifted`], the inner loop of attention's softmax, for processors
/// without AVX-512: 8 lanes, the same reduction and polynomial as the AVX-512 `exp`, `2^n`
/// built in the exponent bits, results below `2^-124` flushed to zero.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::avx512::{LN2_HI, LN2_LO, P0, P1, P2, P3, P4, P5};

    const LANES: usize = 8;

    /// Lane-wise `exp(x)` for `x ≤ 0` (NaN propagates), zero below `-86`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp_or_zero(x: __m256) -> __m256 {
        let lowest = _mm256_set1_ps(-86.0);
        let kept = _mm256_cmp_ps::<_CMP_NLT_UQ>(x, lowest);
        // `max` returns its second operand when either is NaN, so NaN survives the clamp.
        let x = _mm256_max_ps(lowest, x);
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let one = _mm256_set1_ps(1.0);
        let mut p = _mm256_set1_ps(P0);
        for c in [P1, P2, P3, P4, P5] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        p = _mm256_fmadd_ps(p, r, one);
        p = _mm256_fmadd_ps(p, r, one);
        // 2^n for n in [-125, 0]: a normal float built from its exponent bits.
        let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_and_ps(kept, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)))
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn exp_shifted(x: &mut [f32], shift: f32) -> f32 {
        let shift_v = _mm256_set1_ps(shift);
        let mut sum = _mm256_setzero_ps();
        let mut chunks = x.chunks_exact_mut(LANES);
        for chunk in &mut chunks {
            // SAFETY: `chunk` holds exactly eight elements; unaligned access is allowed.
            unsafe {
                let y = exp_or_zero(_mm256_sub_ps(_mm256_loadu_ps(chunk.as_ptr()), shift_v));
                _mm256_storeu_ps(chunk.as_mut_ptr(), y);
                sum = _mm256_add_ps(sum, y);
            }
        }
        let mut lanes = [0f32; LANES];
        // SAFETY: `lanes` holds eight elements.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
        let tail = chunks.into_remainder();
        lanes.iter().sum::<f32>() + super::scalar::exp_shifted(tail, shift)
    }
}

/// AVX-512F implementations. Every function here requires AVX-512F; callers must check
/// for it first.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{EXP_HI, EXP_LO, SILU_LO};
    use std::arch::x86_64::*;

    const LANES: usize = 16;

    // Cody–Waite split of ln 2: `LN2_HI` has few significant bits, so `n · LN2_HI` is
    // exact for every `n` reachable after clamping, and `LN2_HI + LN2_LO ≈ ln 2` to well
    // beyond `f32` precision.
    pub(super) const LN2_HI: f32 = 0.693_359_4;
    pub(super) const LN2_LO: f32 = -2.121_944_4e-4;

    // Minimax coefficients (Cephes `expf`) for
    // `exp(r) ≈ 1 + r + r²·(P5 + r·(P4 + r·(P3 + r·(P2 + r·(P1 + r·P0)))))`, |r| ≤ ln2/2.
    pub(super) const P0: f32 = 1.987_569_1e-4;
    pub(super) const P1: f32 = 1.398_199_9e-3;
    pub(super) const P2: f32 = 8.333_452e-3;
    pub(super) const P3: f32 = 4.166_579_6e-2;
    pub(super) const P4: f32 = 1.666_666_5e-1;
    pub(super) const P5: f32 = 0.5;

    /// Mask selecting the low `rem` lanes (`rem < 16`).
    #[inline]
    fn tail_mask(rem: usize) -> __mmask16 {
        debug_assert!(rem < LANES);
        (1u16 << rem) - 1
    }

    /// Lane-wise `exp(x)` split as `(p, n)` with `exp(x) ≈ p · 2^n`, `p ∈ [0.7, 1.42]`
    /// (NaN for NaN input) and `n` integral.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn exp_parts(x: __m512) -> (__m512, __m512) {
        // `max`/`min` return their second operand when either is NaN, so NaN survives
        // the clamp and propagates through the arithmetic below.
        let x = _mm512_min_ps(_mm512_set1_ps(EXP_HI), x);
        let x = _mm512_max_ps(_mm512_set1_ps(EXP_LO), x);
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
        let one = _mm512_set1_ps(1.0);
        let mut p = _mm512_set1_ps(P0);
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P1));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P2));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P3));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P4));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P5));
        p = _mm512_fmadd_ps(p, r, one);
        p = _mm512_fmadd_ps(p, r, one);
        (p, n)
    }

    /// Lane-wise `exp`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) fn exp(x: __m512) -> __m512 {
        let (p, n) = exp_parts(x);
        // p · 2^n, saturating to +inf / 0 (with correct subnormal rounding in between).
        _mm512_scalef_ps(p, n)
    }

    /// Lane-wise `exp(x)` for `x ≤ 0`, with results below `2^-124` (`x < -86`) flushed to
    /// zero. Softmax weights that small do not change a sum of at least 1, and producing
    /// subnormal results costs a slow microcode assist per vector on Intel CPUs, which the
    /// masked (−inf) half of a causal attention row would otherwise pay on every row.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn exp_or_zero(x: __m512) -> __m512 {
        let lowest = _mm512_set1_ps(-86.0);
        let kept = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(x, lowest);
        // NaN-preserving clamp (see `exp_parts`) into the range whose results stay normal.
        _mm512_maskz_mov_ps(kept, exp(_mm512_max_ps(lowest, x)))
    }

    /// Lane-wise `silu(v) = v · sigmoid(v)`.
    ///
    /// With `e = exp(-|v|) = p · 2^n ∈ [0, 1]`, `d = 1 + e ∈ [1, 2]` and `1/d` from `rcp14`
    /// plus one Newton step (about half an ulp; `d` never meets infinities):
    /// `silu(v) = v / d` for `v ≥ 0` and `(v · p / d) · 2^n` for `v < 0`. Scaling by `2^n`
    /// last keeps full precision for `v < -87`, where `e` itself would be subnormal.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) fn silu_v(v: __m512) -> __m512 {
        // NaN-preserving clamp (see `exp_parts`): `-inf` becomes SILU_LO, whose SiLU
        // rounds to -0.0.
        let v = _mm512_max_ps(_mm512_set1_ps(SILU_LO), v);
        let zero = _mm512_setzero_ps();
        let one = _mm512_set1_ps(1.0);
        let (p, n) = exp_parts(_mm512_sub_ps(zero, _mm512_abs_ps(v)));
        let d = _mm512_add_ps(one, _mm512_scalef_ps(p, n));
        let r0 = _mm512_rcp14_ps(d);
        let t = _mm512_fnmadd_ps(d, r0, one);
        let r = _mm512_fmadd_ps(r0, t, r0);
        let neg = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(v, zero);
        let num = _mm512_mask_blend_ps(neg, one, p);
        let scale = _mm512_mask_blend_ps(neg, zero, n);
        _mm512_scalef_ps(_mm512_mul_ps(v, _mm512_mul_ps(num, r)), scale)
    }

    /// Applies `f` in place to every lane of `x`, 16 at a time, with a masked tail.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn map_inplace(x: &mut [f32], f: impl Fn(__m512) -> __m512) {
        let n = x.len();
        let p = x.as_mut_ptr();
        let mut i = 0;
        while i + LANES <= n {
            // SAFETY: `i + 16 <= n`, so lanes `i..i + 16` lie inside `x`; unaligned
            // access is allowed.
            unsafe { _mm512_storeu_ps(p.add(i), f(_mm512_loadu_ps(p.add(i)))) };
            i += LANES;
        }
        if i < n {
            let k = tail_mask(n - i);
            // SAFETY: only the `n - i` lanes selected by `k` are read or written, and they
            // lie inside `x`; masked-off lanes are never accessed (no fault).
            unsafe { _mm512_mask_storeu_ps(p.add(i), k, f(_mm512_maskz_loadu_ps(k, p.add(i)))) };
        }
    }

    #[target_feature(enable = "avx512f")]
    #[cfg(test)]
    pub(super) fn exp_inplace(x: &mut [f32]) {
        // The closure inherits this function's target features, so it may call `exp`.
        map_inplace(x, |v| exp(v));
    }

    #[target_feature(enable = "avx512f")]
    pub(super) fn silu(x: &mut [f32]) {
        // The closure inherits this function's target features, so it may call `silu_v`.
        map_inplace(x, |v| silu_v(v));
    }

    #[target_feature(enable = "avx512f")]
    pub(super) fn silu_mul(gate: &mut [f32], up: &[f32]) {
        // Stay in bounds of both slices even if a release build gets mismatched lengths.
        let n = gate.len().min(up.len());
        let g = gate.as_mut_ptr();
        let u = up.as_ptr();
        let mut i = 0;
        while i + LANES <= n {
            // SAFETY: `i + 16 <= n <= len` of both slices, so every lane is in bounds.
            unsafe {
                let y = _mm512_mul_ps(silu_v(_mm512_loadu_ps(g.add(i))), _mm512_loadu_ps(u.add(i)));
                _mm512_storeu_ps(g.add(i), y);
            }
            i += LANES;
        }
        if i < n {
            let k = tail_mask(n - i);
            // SAFETY: only the `n - i` lanes selected by `k` are accessed, all in bounds of
            // both slices; masked-off lanes do not fault.
            unsafe {
                let y = _mm512_mul_ps(
                    silu_v(_mm512_maskz_loadu_ps(k, g.add(i))),
                    _mm512_maskz_loadu_ps(k, u.add(i)),
                );
                _mm512_mask_storeu_ps(g.add(i), k, y);
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) fn softmax_rows(x: &mut [f32], cols: usize) {
        for row in x.chunks_exact_mut(cols) {
            softmax_row(row);
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) fn exp_shifted(x: &mut [f32], shift: f32) -> f32 {
        let n = x.len();
        let p = x.as_mut_ptr();
        let mv = _mm512_set1_ps(shift);
        let mut s = _mm512_setzero_ps();
        let mut i = 0;
        while i + LANES <= n {
            // SAFETY: lanes `i..i + 16` are inside `x`.
            unsafe {
                let y = exp_or_zero(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), mv));
                _mm512_storeu_ps(p.add(i), y);
                s = _mm512_add_ps(s, y);
            }
            i += LANES;
        }
        if i < n {
            let k = tail_mask(n - i);
            // SAFETY: only the lanes selected by `k` are read or written, all inside `x`.
            unsafe {
                let y = exp_or_zero(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, p.add(i)), mv));
                _mm512_mask_storeu_ps(p.add(i), k, y);
                // Masked-off lanes hold exp(0 - shift), which must not enter the sum.
                s = _mm512_mask_add_ps(s, k, s, y);
            }
        }
        _mm512_reduce_add_ps(s)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn softmax_row(row: &mut [f32]) {
        let n = row.len();
        let p = row.as_mut_ptr();
        let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);

        // Pass 1: row maximum (masked-off tail lanes read as -inf).
        let mut m = neg_inf;
        let mut i = 0;
        while i + LANES <= n {
            // SAFETY: lanes `i..i + 16` are inside `row`.
            m = _mm512_max_ps(m, unsafe { _mm512_loadu_ps(p.add(i)) });
            i += LANES;
        }
        let tail = (i < n).then(|| tail_mask(n - i));
        if let Some(k) = tail {
            // SAFETY: only the lanes selected by `k` are read, all inside `row`.
            m = _mm512_max_ps(m, unsafe { _mm512_mask_loadu_ps(neg_inf, k, p.add(i)) });
        }
        let max = _mm512_reduce_max_ps(m);
        if max == f32::NEG_INFINITY {
            // Fully masked row: zeros rather than NaN (see `softmax_rows`).
            row.fill(0.0);
            return;
        }

        // Pass 2: exponentiate the shifted values and accumulate their sum.
        let inv = _mm512_set1_ps(1.0 / exp_shifted(row, max));

        // Pass 3: normalise.
        i = 0;
        while i + LANES <= n {
            // SAFETY: lanes `i..i + 16` are inside `row`.
            unsafe { _mm512_storeu_ps(p.add(i), _mm512_mul_ps(_mm512_loadu_ps(p.add(i)), inv)) };
            i += LANES;
        }
        if let Some(k) = tail {
            // SAFETY: only the lanes selected by `k` are read or written, all inside `row`.
            unsafe {
                let y = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, p.add(i)), inv);
                _mm512_mask_storeu_ps(p.add(i), k, y);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SplitMix64: small deterministic generator for test inputs.
    struct Rng(u64);

    impl Rng {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        /// Uniform in `[lo, hi)`.
        fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
            let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
            lo + (hi - lo) * u
        }
    }

    fn has_avx512() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// Special and edge inputs shared by several tests.
    fn edge_values() -> Vec<f32> {
        vec![
            0.0,
            -0.0,
            1e-30,
            -1e-30,
            1e-45,
            -1e-45,
            f32::MIN_POSITIVE,
            -f32::MIN_POSITIVE,
            0.5,
            -0.5,
            1.0,
            -1.0,
            10.0,
            -10.0,
            20.0,
            -20.0,
            80.0,
            -80.0,
            87.0,
            -87.0,
            88.0,
            -88.0,
            89.0,
            -89.0,
            100.0,
            -100.0,
            104.0,
            -104.0,
            150.0,
            -150.0,
            199.0,
            -199.0,
            200.0,
            -200.0,
            201.0,
            -201.0,
            1e10,
            -1e10,
            f32::MAX,
            f32::MIN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
        ]
    }

    fn silu_ref(v: f32) -> f64 {
        if v == f32::NEG_INFINITY {
            return 0.0;
        }
        let v = v as f64;
        v / (1.0 + (-v).exp())
    }

    /// Checks `got` against the f64 reference; returns the relative error where it is
    /// meaningful (0 otherwise).
    fn check_close(got: f32, want: f64, rel: f64, abs: f64, what: &str) -> f64 {
        if want.is_nan() {
            assert!(got.is_nan(), "{what}: got {got}, want NaN");
            return 0.0;
        }
        if want.is_infinite() || want.abs() > f32::MAX as f64 {
            assert_eq!(got as f64, want.signum() * f64::INFINITY, "{what}");
            return 0.0;
        }
        assert!(!got.is_nan(), "{what}: got NaN, want {want}");
        let err = (got as f64 - want).abs();
        assert!(
            err <= (rel * want.abs()).max(abs),
            "{what}: got {got:e}, want {want:e}, rel err {:e}",
            err / want.abs()
        );
        if want.abs() >= f32::MIN_POSITIVE as f64 {
            err / want.abs()
        } else {
            0.0
        }
    }

    /// Runs `f` on `input` placed inside a larger buffer and checks that the guard
    /// elements on both sides are untouched (masked tails must not spill).
    fn with_guards(input: &[f32], f: impl Fn(&mut [f32])) -> Vec<f32> {
        const GUARD: f32 = 12345.0;
        let mut buf = vec![GUARD; input.len() + 32];
        buf[16..16 + input.len()].copy_from_slice(input);
        f(&mut buf[16..16 + input.len()]);
        assert!(buf[..16].iter().all(|&v| v == GUARD), "wrote before slice");
        assert!(
            buf[16 + input.len()..].iter().all(|&v| v == GUARD),
            "wrote past slice"
        );
        buf[16..16 + input.len()].to_vec()
    }

    fn exp_sweep(f: impl Fn(&mut [f32]), name: &str) -> f64 {
        const N: usize = 1_000_000;
        let (lo, hi) = (-87.3f64, 88.7f64);
        let mut x: Vec<f32> = (0..N)
            .map(|i| (lo + (hi - lo) * i as f64 / (N - 1) as f64) as f32)
            .collect();
        let orig = x.clone();
        f(&mut x);
        let mut max_rel = 0.0f64;
        for (&xi, &yi) in orig.iter().zip(&x) {
            let want = (xi as f64).exp();
            if want >= f32::MIN_POSITIVE as f64 && want <= f32::MAX as f64 {
                let rel = ((yi as f64 - want) / want).abs();
                assert!(
                    rel <= 3e-7,
                    "{name}: exp({xi}) = {yi:e}, want {want:e}, rel {rel:e}"
                );
                max_rel = max_rel.max(rel);
            }
        }
        eprintln!("{name}: exp sweep max rel err = {max_rel:.3e}");
        max_rel
    }

    #[test]
    fn exp_dense_sweep() {
        exp_sweep(exp_inplace, "dispatch");
        exp_sweep(scalar::exp_inplace, "scalar");
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            // SAFETY: AVX-512F is available (checked just above).
            exp_sweep(|x| unsafe { avx512::exp_inplace(x) }, "avx512");
        }
    }

    /// Every implementation of `exp_shifted` against f64: relative error within `3e-7` down
    /// to where results flush to zero, `-inf` and very negative inputs exactly zero, the sum
    /// of the results returned, tails of every length.
    #[test]
    fn exp_shifted_matches_f64_on_every_path() {
        type ExpShifted = fn(&mut [f32], f32) -> f32;
        let mut paths: Vec<(&str, ExpShifted)> =
            vec![("dispatch", exp_shifted), ("scalar", scalar::exp_shifted)];
        #[cfg(target_arch = "x86_64")]
        {
            if has_avx512() {
                // SAFETY: AVX-512F is available (checked just above).
                paths.push(("avx512", |x, s| unsafe { avx512::exp_shifted(x, s) }));
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: AVX2 and FMA are available (checked just above).
                paths.push(("avx2", |x, s| unsafe { avx2::exp_shifted(x, s) }));
            }
        }
        let mut rng = Rng(7);
        for (name, path) in paths {
            for len in [0, 1, 7, 8, 9, 15, 16, 17, 64, 131] {
                let shift = 2.5f32;
                let mut input: Vec<f32> = (0..len).map(|_| rng.uniform(-80.0, 2.5)).collect();
                if len > 3 {
                    input[1] = f32::NEG_INFINITY;
                    input[2] = -500.0;
                }
                let mut x = input.clone();
                let sum = path(&mut x, shift);
                let mut want_sum = 0f64;
                for (&v, &y) in input.iter().zip(&x) {
                    let want = ((v - shift) as f64).exp();
                    want_sum += want;
                    if v - shift < -86.0 {
                        assert!(y == 0.0 || (y as f64 - want).abs() < 1e-37, "{name}");
                    } else {
                        check_close(y, want, 3e-7, 0.0, name);
                    }
                }
                let error = (sum as f64 - want_sum).abs() / want_sum.max(1e-30);
                assert!(
                    len == 0 || error < 1e-6,
                    "{name}: sum {sum} against {want_sum}"
                );
            }
        }
    }

    #[test]
    fn exp_special_values() {
        let mut x = vec![
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -1000.0,
            1000.0,
            f32::MIN_POSITIVE.ln(),
            88.72,
            88.73,
            -103.0,
            f32::MAX,
            f32::MIN,
        ];
        exp_inplace(&mut x);
        assert_eq!(x[0], 1.0);
        assert_eq!(x[1], 1.0);
        assert_eq!(x[2], f32::INFINITY);
        assert_eq!(x[3].to_bits(), 0.0f32.to_bits(), "exp(-inf) must be +0");
        assert!(x[4].is_nan());
        assert_eq!(x[5], 0.0);
        assert_eq!(x[6], f32::INFINITY);
        let want = (f32::MIN_POSITIVE.ln() as f64).exp();
        assert!(((x[7] as f64 - want) / want).abs() <= 3e-7, "{}", x[7]);
        assert!(x[8].is_finite() && x[8] > 3.3e38, "exp(88.72) = {}", x[8]);
        assert_eq!(x[9], f32::INFINITY);
        // Subnormal result: positive and close in absolute terms.
        let want = (-103.0f64).exp();
        assert!(
            x[10] > 0.0 && (x[10] as f64 - want).abs() <= 2e-45,
            "{}",
            x[10]
        );
        assert_eq!(x[11], f32::INFINITY);
        assert_eq!(x[12], 0.0);
    }

    #[test]
    fn exp_tails_do_not_spill() {
        let mut rng = Rng(1);
        for len in 0..70 {
            let input: Vec<f32> = (0..len).map(|_| rng.uniform(-80.0, 80.0)).collect();
            let out = with_guards(&input, exp_inplace);
            for (&x, &y) in input.iter().zip(&out) {
                check_close(y, (x as f64).exp(), 3e-7, 0.0, "exp");
            }
        }
    }

    /// Checks a SiLU implementation against the f64 reference. Errors are relative
    /// (`1e-6`) except below `abs` in magnitude; returns the largest relative error among
    /// results of magnitude at least `abs`.
    fn check_silu(f: impl Fn(&mut [f32]), name: &str, abs: f64) -> f64 {
        let mut rng = Rng(2);
        let mut max_rel = 0.0f64;
        let mut check = |x: f32, y: f32| {
            let want = silu_ref(x);
            let r = check_close(y, want, 1e-6, abs, &format!("{name}: silu({x})"));
            if want.abs() >= abs {
                max_rel = max_rel.max(r);
            }
            if x <= -200.0 {
                assert_eq!(y, 0.0, "{name}: silu({x}) = {y}");
            }
        };
        for len in 0..70 {
            let input: Vec<f32> = (0..len)
                .map(|_| {
                    let scale = [1.0, 10.0, 120.0][(rng.next_u64() % 3) as usize];
                    rng.uniform(-scale, scale)
                })
                .collect();
            let out = with_guards(&input, &f);
            input.iter().zip(&out).for_each(|(&x, &y)| check(x, y));
        }
        // Edge values, shifted so that each lands in every lane of a masked tail.
        let edges = edge_values();
        for start in 0..16 {
            let input: Vec<f32> = edges[start..].to_vec();
            let out = with_guards(&input, &f);
            input.iter().zip(&out).for_each(|(&x, &y)| check(x, y));
        }
        eprintln!("{name}: silu max rel err = {max_rel:.3e} (|result| >= {abs:e})");
        max_rel
    }

    /// Like [`check_silu`] for `silu_mul`.
    fn check_silu_mul(f: impl Fn(&mut [f32], &[f32]), name: &str, abs: f64) -> f64 {
        let mut rng = Rng(3);
        let mut max_rel = 0.0f64;
        let mut check = |g: f32, u: f32, y: f32| {
            let want = silu_ref(g) * u as f64;
            let r = check_close(y, want, 1e-6, abs, &format!("{name}: silu_mul({g}, {u})"));
            if want.abs() >= abs {
                max_rel = max_rel.max(r);
            }
        };
        for len in 0..70 {
            let gate: Vec<f32> = (0..len).map(|_| rng.uniform(-20.0, 20.0)).collect();
            let up: Vec<f32> = (0..len).map(|_| rng.uniform(-3.0, 3.0)).collect();
            let out = with_guards(&gate, |g| f(g, &up));
            for ((&g, &u), &y) in gate.iter().zip(&up).zip(&out) {
                check(g, u, y);
            }
        }
        let gate = edge_values();
        let up: Vec<f32> = (0..gate.len()).map(|_| rng.uniform(0.5, 2.0)).collect();
        let out = with_guards(&gate, |g| f(g, &up));
        for ((&g, &u), &y) in gate.iter().zip(&up).zip(&out) {
            check(g, u, y);
        }
        eprintln!("{name}: silu_mul max rel err = {max_rel:.3e} (|result| >= {abs:e})");
        max_rel
    }

    #[test]
    fn silu_matches_reference() {
        check_silu(silu, "dispatch", 1e-30);
        check_silu(scalar::silu, "scalar", 1e-30);
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            // The vector path stays accurate down to the smallest normal results.
            // SAFETY: AVX-512F is available (checked just above).
            check_silu(|x| unsafe { avx512::silu(x) }, "avx512", 1e-37);
        }
    }

    #[test]
    fn silu_mul_matches_reference() {
        check_silu_mul(silu_mul, "dispatch", 1e-30);
        check_silu_mul(scalar::silu_mul, "scalar", 1e-30);
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            // SAFETY: AVX-512F is available (checked just above).
            check_silu_mul(|g, u| unsafe { avx512::silu_mul(g, u) }, "avx512", 1e-37);
        }
    }

    /// f64 softmax of one row; an all -inf row gives zeros.
    fn softmax_ref(row: &[f32]) -> (Vec<f64>, f64) {
        let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
        if max == f64::NEG_INFINITY {
            return (vec![0.0; row.len()], max);
        }
        let e: Vec<f64> = row.iter().map(|&v| (v as f64 - max).exp()).collect();
        let s: f64 = e.iter().sum();
        (e.into_iter().map(|v| v / s).collect(), max)
    }

    fn check_softmax(f: impl Fn(&mut [f32], usize), name: &str) -> f64 {
        let mut rng = Rng(4);
        let mut max_rel = 0.0f64;
        for &cols in &[1usize, 3, 16, 17, 100, 1000] {
            let rows = 5;
            let mut x = Vec::with_capacity(rows * cols);
            for r in 0..rows {
                let scale = [1.0, 10.0, 50.0, 5.0, 1.0][r];
                for _ in 0..cols {
                    let masked = r == 3 || (r == 4 && rng.next_u64() % 10 < 3);
                    x.push(if masked {
                        f32::NEG_INFINITY
                    } else {
                        rng.uniform(-scale, scale)
                    });
                }
            }
            // Row 4 keeps at least one unmasked entry.
            x[4 * cols + cols / 2] = 0.25;
            let out = with_guards(&x, |v| f(v, cols));
            for r in 0..rows {
                let row_in = &x[r * cols..(r + 1) * cols];
                let row_out = &out[r * cols..(r + 1) * cols];
                let (want, max) = softmax_ref(row_in);
                if r == 3 {
                    assert!(row_out.iter().all(|&v| v == 0.0), "{name}: masked row");
                    continue;
                }
                let sum: f64 = row_out.iter().map(|&v| v as f64).sum();
                assert!(
                    (sum - 1.0).abs() <= 1e-6,
                    "{name}: cols {cols} row {r} sum {sum}"
                );
                for ((&xi, &yi), &wi) in row_in.iter().zip(row_out).zip(&want) {
                    if xi == f32::NEG_INFINITY {
                        assert_eq!(yi, 0.0, "{name}: masked entry");
                        continue;
                    }
                    // `x - max` is rounded to f32 before exp: allow for that rounding.
                    let rel = 1e-6 + (xi as f64 - max).abs() * 6e-8;
                    let what = format!("{name}: cols {cols} row {r} x {xi}");
                    // Weights below 2^-124 may be flushed to zero (see `exp_or_zero`).
                    let e = check_close(yi, wi, rel, 2f64.powi(-124), &what);
                    max_rel = max_rel.max(e);
                }
            }
        }
        eprintln!("{name}: softmax max rel err = {max_rel:.3e}");
        max_rel
    }

    #[test]
    fn softmax_matches_reference() {
        check_softmax(softmax_rows, "dispatch");
        check_softmax(scalar::softmax_rows, "scalar");
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            // SAFETY: AVX-512F is available (checked just above).
            check_softmax(|x, c| unsafe { avx512::softmax_rows(x, c) }, "avx512");
        }
    }

    #[test]
    fn softmax_edge_rows() {
        let mut x = vec![f32::NEG_INFINITY; 17];
        softmax_rows(&mut x, 17);
        assert!(x.iter().all(|&v| v == 0.0));

        let mut x = vec![5.0, f32::NEG_INFINITY, 5.0];
        softmax_rows(&mut x, 3);
        assert_eq!(x, [0.5, 0.0, 0.5]);

        let mut x = vec![1.0, f32::NAN, 2.0];
        softmax_rows(&mut x, 3);
        assert!(x.iter().all(|v| v.is_nan()));

        let mut x: Vec<f32> = Vec::new();
        softmax_rows(&mut x, 0);
        softmax_rows(&mut x, 4);
    }

    /// The AVX-512 path and the scalar fallback agree on random and edge inputs.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_agrees_with_scalar() {
        if crate::models::kernels::skips_without_avx512("avx512_agrees_with_scalar") {
            return;
        }
        let mut rng = Rng(5);
        let agree = |a: &[f32], b: &[f32], rel: f32, what: &str| {
            for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
                if x.is_nan() || y.is_nan() {
                    assert!(x.is_nan() && y.is_nan(), "{what}[{i}]: {x} vs {y}");
                } else if x.is_infinite() || y.is_infinite() {
                    assert_eq!(x, y, "{what}[{i}]");
                } else {
                    let tol = (rel * x.abs().max(y.abs())).max(1e-30);
                    assert!((x - y).abs() <= tol, "{what}[{i}]: {x:e} vs {y:e}");
                }
            }
        };
        for len in [0usize, 1, 15, 16, 17, 33, 64, 100, 1000] {
            let mut input: Vec<f32> = (0..len).map(|_| rng.uniform(-90.0, 90.0)).collect();
            input.extend(edge_values());

            let (mut a, mut b) = (input.clone(), input.clone());
            // SAFETY: AVX-512F is available (checked at the top of the test).
            unsafe { avx512::exp_inplace(&mut a) };
            scalar::exp_inplace(&mut b);
            agree(&a, &b, 4e-7, "exp");

            let (mut a, mut b) = (input.clone(), input.clone());
            // SAFETY: as above.
            unsafe { avx512::silu(&mut a) };
            scalar::silu(&mut b);
            agree(&a, &b, 1e-6, "silu");

            let up: Vec<f32> = (0..input.len()).map(|_| rng.uniform(-2.0, 2.0)).collect();
            let (mut a, mut b) = (input.clone(), input.clone());
            // SAFETY: as above.
            unsafe { avx512::silu_mul(&mut a, &up) };
            scalar::silu_mul(&mut b, &up);
            agree(&a, &b, 1e-6, "silu_mul");

            if len > 0 {
                let mut a: Vec<f32> = (0..len * 3).map(|_| rng.uniform(-30.0, 30.0)).collect();
                let mut b = a.clone();
                // SAFETY: as above.
                unsafe { avx512::softmax_rows(&mut a, len) };
                scalar::softmax_rows(&mut b, len);
                agree(&a, &b, 5e-6, "softmax");
            }
        }
    }
}
