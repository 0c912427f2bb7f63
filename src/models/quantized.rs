//! Weight matrices kept in their GGUF block quantization, with a matrix-vector product that
//! dequantizes in registers.
//!
//! At batch 1 a linear layer reads every weight once, so decode speed is set by how many bytes
//! stream from memory: a Q4_1 matrix is a sixth of its f32 size. [`QuantizedMatrix::matvec_rows`]
//! reads the blocks as stored, widens each weight to f32 in registers and multiplies it with the
//! f32 activations (which are never quantized, so results equal dequantize-then-dot up to float
//! rounding). Q4_0, Q4_1, Q8_0, Q4_K and Q6_K have AVX-512 kernels (detected at run time); every
//! other type, and every other CPU, decodes one row at a time with the GGUF reader's
//! dequantizer and dots it.

use std::ops::Range;

use crate::checkpoint::gguf::{decode_into, GgmlType};
use crate::models::kernels;

/// A row-major matrix of GGUF quantized blocks: each row is `cols / block_size` whole blocks.
#[derive(Debug, Clone)]
pub struct QuantizedMatrix {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

impl QuantizedMatrix {
    /// Wraps `data`, `rows` rows of `cols` elements of type `ty` each.
    ///
    /// Fails unless `ty` is a quantized type the GGUF reader can decode, `cols` is a multiple of
    /// its block size and `data` holds exactly `rows` rows of whole blocks.
    pub fn new(ty: GgmlType, rows: usize, cols: usize, data: Vec<u8>) -> Result<Self, String> {
        let (Some(block), Some(size)) = (ty.block_size(), ty.type_size()) else {
            return Err(format!("ggml type {ty} has no known block layout"));
        };
        if !ty.is_quantized() || !ty.is_supported() {
            return Err(format!(
                "ggml type {ty} is not a supported quantized type (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, \
                 Q2_K .. Q6_K)"
            ));
        }
        if !cols.is_multiple_of(block) {
            return Err(format!(
                "a {rows}x{cols} {ty} matrix: {cols} columns is not a multiple of the block size \
                 {block}"
            ));
        }
        let expected = (cols / block)
            .checked_mul(size)
            .and_then(|row_bytes| row_bytes.checked_mul(rows));
        if expected != Some(data.len()) {
            let expected =
                expected.map_or_else(|| "more than usize::MAX".into(), |n| n.to_string());
            return Err(format!(
                "a {rows}x{cols} {ty} matrix needs {expected} bytes, got {}",
                data.len()
            ));
        }
        Ok(Self {
            ty,
            rows,
            cols,
            data,
        })
    }

    /// The quantization type.
    pub fn ggml_type(&self) -> GgmlType {
        self.ty
    }

    /// The number of rows (output features).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The number of columns (input features).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The bytes held (for memory reports).
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    /// Bytes per row (validated by [`QuantizedMatrix::new`]).
    fn row_bytes(&self) -> usize {
        self.data.len().checked_div(self.rows).unwrap_or(0)
    }

    /// The raw blocks of `rows`.
    fn row_data(&self, rows: Range<usize>) -> &[u8] {
        let row_bytes = self.row_bytes();
        &self.data[rows.start * row_bytes..rows.end * row_bytes]
    }

    /// A matrix whose row `i` is this matrix's row `order[i]` (the rotary un-permutation of
    /// q/k projections, or a selection of rows).
    ///
    /// # Panics
    /// If an entry of `order` is not a row index.
    pub fn permute_rows(&self, order: &[usize]) -> Self {
        let mut data = Vec::with_capacity(order.len() * self.row_bytes());
        for &row in order {
            data.extend_from_slice(self.row_data(row..row + 1));
        }
        Self {
            ty: self.ty,
            rows: order.len(),
            cols: self.cols,
            data,
        }
    }

    /// Appends rows `rows` dequantized to f32 (`rows.len() * cols` values, row-major) to `out`.
    ///
    /// # Panics
    /// If `rows` is not a range of rows of the matrix.
    pub fn dequantize_rows(&self, rows: Range<usize>, out: &mut Vec<f32>) {
        assert!(
            rows.start <= rows.end && rows.end <= self.rows,
            "rows {rows:?} of a {}-row matrix",
            self.rows
        );
        out.reserve(rows.len() * self.cols);
        decode_into(
            self.ty,
            self.row_data(rows.clone()),
            0,
            rows.len() * self.cols,
            out,
        );
    }

    /// `out[i] = Σ_k W[rows.start + i][k] · x[k]`, single-threaded (callers split row ranges
    /// across threads).
    ///
    /// # Panics
    /// If `rows` is not a range of rows of the matrix, `x.len() != cols` or
    /// `out.len() != rows.len()`.
    pub fn matvec_rows(&self, rows: Range<usize>, x: &[f32], out: &mut [f32]) {
        assert!(
            rows.start <= rows.end && rows.end <= self.rows,
            "rows {rows:?} of a {}-row matrix",
            self.rows
        );
        assert_eq!(x.len(), self.cols, "input length vs matrix columns");
        assert_eq!(out.len(), rows.len(), "output length vs rows");
        if rows.is_empty() {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(kernel) = avx512::Kernel::for_type(self.ty) {
            if avx512::available() {
                let aux = kernel.x_sums(x);
                // SAFETY: the CPU has the kernels' features (checked just above); the slice holds
                // `out.len()` rows of `row_bytes()` bytes, each `x.len() / block_size` whole
                // blocks of `self.ty` (validated by `new`), and `aux` is `kernel.x_sums(x)`.
                unsafe {
                    avx512::matvec(kernel, self.row_data(rows), self.row_bytes(), x, &aux, out)
                };
                return;
            }
        }
        self.matvec_fallback(rows, x, out);
    }

    /// The portable [`QuantizedMatrix::matvec_rows`]: decode a row, dot it, next row.
    fn matvec_fallback(&self, rows: Range<usize>, x: &[f32], out: &mut [f32]) {
        let mut row = Vec::with_capacity(self.cols);
        for (i, y) in rows.zip(out.iter_mut()) {
            row.clear();
            decode_into(self.ty, self.row_data(i..i + 1), 0, self.cols, &mut row);
            kernels::matvec(&row, x, std::slice::from_mut(y));
        }
    }
}

/// AVX-512 kernels, keeping the activations in f32. Codes are widened to 32-bit lanes and turned
/// into weights by `vpermps` from a 16-entry table (4-bit codes: the table is the block's 16
/// possible values, `vpermps` ignores the lanes' upper bits) or by `vcvtdq2ps` (8-bit codes, then
/// scaled per block). The legacy types widen the f16 scales of 16 blocks at once and broadcast
/// them from memory. Four rows are computed together (shared activation loads,
/// several weight streams) and rows further on are prefetched. K-quant minimums and offsets are
/// folded in through per-call sums of `x` ([`avx512::Kernel::x_sums`]).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::GgmlType;

    /// Rows computed together.
    const GROUP: usize = 4;

    /// How many rows ahead the kernels prefetch. Rows are short (a few hundred bytes) and read
    /// [`GROUP`] at a time, a pattern the hardware prefetchers follow too late on their own.
    const AHEAD_ROWS: usize = 4 * GROUP;

    /// Whether this CPU runs the kernels (AVX-512 F/BW/VL, FMA and F16C).
    pub(super) fn available() -> bool {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }

    /// A type with a kernel.
    #[derive(Debug, Clone, Copy)]
    pub(super) enum Kernel {
        Q4_0,
        Q4_1,
        Q8_0,
        Q4K,
        Q6K,
    }

    impl Kernel {
        /// The kernel for `ty`, if it has one.
        pub(super) fn for_type(ty: GgmlType) -> Option<Self> {
            match ty {
                GgmlType::Q4_0 => Some(Self::Q4_0),
                GgmlType::Q4_1 => Some(Self::Q4_1),
                GgmlType::Q8_0 => Some(Self::Q8_0),
                GgmlType::Q4_K => Some(Self::Q4K),
                GgmlType::Q6_K => Some(Self::Q6K),
                _ => None,
            }
        }

        /// The per-call sums of `x` the kernel folds offsets and minimums in with:
        /// * Q4_K: per super-block, eight zeros then the eight 32-element sub-block sums (lined
        ///   up with the scales `[d·sc_0..7, dmin·m_0..7]`);
        /// * Q6_K: per super-block, `32 Σx_g` for its sixteen 16-element groups (the codes
        ///   are stored plus 32);
        /// * Q4_0, Q4_1, Q8_0: nothing.
        pub(super) fn x_sums(self, x: &[f32]) -> Vec<f32> {
            let sum = |c: &[f32]| c.iter().map(|&v| f64::from(v)).sum::<f64>() as f32;
            match self {
                Self::Q4_0 | Self::Q4_1 | Self::Q8_0 => Vec::new(),
                Self::Q4K => x
                    .chunks_exact(256)
                    .flat_map(|sb| {
                        let mut lanes = [0f32; 16];
                        for (lane, c) in lanes[8..].iter_mut().zip(sb.chunks_exact(32)) {
                            *lane = sum(c);
                        }
                        lanes
                    })
                    .collect(),
                Self::Q6K => x.chunks_exact(16).map(|c| 32.0 * sum(c)).collect(),
            }
        }
    }

    /// `out[i] = Σ_k W_i[k] · x[k]` for the `out.len()` rows of `row_bytes` bytes in `w`.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F/BW/VL, FMA and F16C; `w.len() == out.len() * row_bytes`, each
    /// row holding `x.len() / block_size` whole blocks of the kernel's type; `aux` must be
    /// `kernel.x_sums(x)`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
    pub(super) unsafe fn matvec(
        kernel: Kernel,
        w: &[u8],
        row_bytes: usize,
        x: &[f32],
        aux: &[f32],
        out: &mut [f32],
    ) {
        debug_assert_eq!(w.len(), out.len() * row_bytes);
        let base = w.as_ptr();
        let mut outs = out.chunks_exact_mut(GROUP);
        let mut row = 0;
        for y in &mut outs {
            let rows: [*const u8; GROUP] =
                std::array::from_fn(|r| base.wrapping_add((row + r) * row_bytes));
            y.copy_from_slice(&rows_dot(kernel, rows, AHEAD_ROWS * row_bytes, x, aux));
            row += GROUP;
        }
        for y in outs.into_remainder() {
            let [v] = rows_dot(
                kernel,
                [base.add(row * row_bytes)],
                AHEAD_ROWS * row_bytes,
                x,
                aux,
            );
            *y = v;
            row += 1;
        }
    }

    /// The dot products of `R` rows (starting at `rows`) with `x`.
    ///
    /// # Safety
    /// As [`matvec`], for each row pointer.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
    #[inline]
    unsafe fn rows_dot<const R: usize>(
        kernel: Kernel,
        rows: [*const u8; R],
        ahead: usize,
        x: &[f32],
        aux: &[f32],
    ) -> [f32; R] {
        match kernel {
            Kernel::Q4_0 => q4::<R, 18>(rows, ahead, x),
            Kernel::Q4_1 => q4::<R, 20>(rows, ahead, x),
            Kernel::Q8_0 => q8_0(rows, ahead, x),
            Kernel::Q4K => q4_k(rows, ahead, x, aux),
            Kernel::Q6K => q6_k(rows, ahead, x, aux),
        }
    }

    /// `[0, 1, .., 15]` as floats: `vpermps` with it turns the low 4 bits of each lane into a
    /// float.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn iota() -> __m512 {
        _mm512_setr_ps(
            0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0,
        )
    }

    /// The two f16 at `p` widened, in lanes 0 and 1 (lanes 2 and 3 are zero).
    ///
    /// # Safety
    /// Four bytes must be readable at `p`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
    #[inline]
    unsafe fn f16_pair(p: *const u8) -> __m128 {
        _mm_cvtph_ps(_mm_loadu_si32(p.cast()))
    }

    /// The 16 bytes at `p` zero-extended to 32-bit lanes.
    ///
    /// # Safety
    /// Sixteen bytes must be readable at `p`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
    #[inline]
    unsafe fn widen_u8(p: *const u8) -> __m512i {
        _mm512_cvtepu8_epi32(_mm_loadu_si128(p.cast()))
    }

    /// The 16 bytes at `p` as signed integers, converted to floats.
    ///
    /// # Safety
    /// Sixteen bytes must be readable at `p`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
    #[inline]
    unsafe fn widen_i8(p: *const u8) -> __m512 {
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p.cast())))
    }

    /// The sums of each accumulator's lanes.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn reduce<const R: usize>(acc: [__m512; R]) -> [f32; R] {
        let mut out = [0f32; R];
        for (o, a) in out.iter_mut().zip(acc) {
            *o = _mm512_reduce_add_ps(a);
        }
        out
    }

    /// Blocks whose f16 scales are widened together.
    const CHUNK: usize = 16;

    /// 128-byte windows a chunk of the largest block (Q8_0, 34 bytes) spans.
    const WINDOWS: usize = (34 * CHUNK).div_ceil(128);

    /// Where the f16 scales of a chunk of [`CHUNK`] blocks of `ts` bytes lie, for
    /// [`chunk_scales`]: for each 128-byte window of the chunk, the `vpermt2w` indices that move
    /// the scales it holds into place and the mask of the lanes they land in. Lane `j < 16` gets
    /// the f16 at byte 0 of block `j`; with `with_min`, lane `16 + j` the f16 at byte 2.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
    #[inline]
    fn scale_layout(ts: usize, with_min: bool) -> ([__m512i; WINDOWS], [u32; WINDOWS]) {
        let mut index = [[0u16; 32]; WINDOWS];
        let mut lanes = [0u32; WINDOWS];
        for j in 0..CHUNK {
            for half in 0..1 + usize::from(with_min) {
                let word = ts / 2 * j + half;
                let lane = 16 * half + j;
                index[word / 64][lane] = (word % 64) as u16;
                lanes[word / 64] |= 1 << lane;
            }
        }
        // SAFETY: each row of `index` is 64 readable bytes.
        let index = index.map(|w| unsafe { _mm512_loadu_si512(w.as_ptr().cast()) });
        (index, lanes)
    }

    /// The f16 scales of the `n <= CHUNK` blocks at `p`, widened: lanes as [`scale_layout`]
    /// describes (zero past `n`), split into the first 16 and the second 16 lanes.
    ///
    /// # Safety
    /// The `n` blocks must be readable; `layout` must come from [`scale_layout`] for their size.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
    #[inline]
    unsafe fn chunk_scales(
        p: *const u8,
        len: usize,
        layout: &([__m512i; WINDOWS], [u32; WINDOWS]),
    ) -> [[f32; CHUNK]; 2] {
        // The bytes of `p[start..start + 64]` that lie inside the `len` bytes of the chunk.
        let inside = |start: usize| match len.saturating_sub(start) {
            0 => 0,
            n if n >= 64 => u64::MAX,
            n => (1u64 << n) - 1,
        };
        let mut words = _mm512_setzero_si512();
        for (w, (index, lanes)) in layout.0.iter().zip(layout.1).enumerate() {
            if lanes == 0 {
                break;
            }
            // Masked-off bytes are not read (and cannot fault), so the window may pass the end.
            let a = _mm512_maskz_loadu_epi8(inside(128 * w), p.wrapping_add(128 * w).cast());
            let b =
                _mm512_maskz_loadu_epi8(inside(128 * w + 64), p.wrapping_add(128 * w + 64).cast());
            words = _mm512_mask_blend_epi16(lanes, words, _mm512_permutex2var_epi16(a, *index, b));
        }
        let mut out = [[0f32; CHUNK]; 2];
        _mm512_storeu_ps(
            out[0].as_mut_ptr(),
            _mm512_cvtph_ps(_mm512_castsi512_si256(words)),
        );
        _mm512_storeu_ps(
            out[1].as_mut_ptr(),
            _mm512_cvtph_ps(_mm512_extracti64x4_epi64::<1>(words)),
        );
        out
    }

    /// Q4_0 (`TS = 18`: `d: f16 | qs: [u8; 16]`, value `d (q - 8)`) and Q4_1 (`TS = 20`:
    /// `d: f16 | m: f16 | qs: [u8; 16]`, value `d q + m`). Element `j < 16` of a block is the low
    /// nibble of `qs[j]`, element `j + 16` its high nibble. Per row and block, the 16 possible
    /// values are computed once into a table that `vpermps` looks the nibbles up in.
    ///
    /// # Safety
    /// As [`matvec`], with `TS` 18 or 20.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
    #[inline]
    unsafe fn q4<const R: usize, const TS: usize>(
        rows: [*const u8; R],
        ahead: usize,
        x: &[f32],
    ) -> [f32; R] {
        let with_min = TS == 20;
        let codes = TS - 16;
        let iota = iota();
        let iota_less_8 = _mm512_sub_ps(iota, _mm512_set1_ps(8.0));
        let layout = scale_layout(TS, with_min);
        let mut acc = [_mm512_setzero_ps(); R];
        for (c, xc) in x.chunks(32 * CHUNK).enumerate() {
            let (first, n) = (TS * CHUNK * c, xc.len() / 32);
            let mut d = [[0f32; CHUNK]; R];
            let mut m = [[0f32; CHUNK]; R];
            for r in 0..R {
                [d[r], m[r]] = chunk_scales(rows[r].add(first), TS * n, &layout);
            }
            for (j, xb) in xc.chunks_exact(32).enumerate().take(CHUNK) {
                let x0 = _mm512_loadu_ps(xb.as_ptr());
                let x1 = _mm512_loadu_ps(xb.as_ptr().add(16));
                for r in 0..R {
                    let blk = rows[r].add(first + TS * j);
                    _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(ahead).cast());
                    let table = if with_min {
                        _mm512_fmadd_ps(iota, _mm512_set1_ps(d[r][j]), _mm512_set1_ps(m[r][j]))
                    } else {
                        _mm512_mul_ps(iota_less_8, _mm512_set1_ps(d[r][j]))
                    };
                    let q = widen_u8(blk.add(codes));
                    let lo = _mm512_permutexvar_ps(q, table);
                    let hi = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(q), table);
                    acc[r] = _mm512_fmadd_ps(lo, x0, acc[r]);
                    acc[r] = _mm512_fmadd_ps(hi, x1, acc[r]);
                }
            }
        }
        reduce(acc)
    }

    /// Q8_0 (`d: f16 | qs: [i8; 32]`, value `d q`): `Σ_b d_b · Σ q x`.
    ///
    /// # Safety
    /// As [`matvec`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
    #[inline]
    unsafe fn q8_0<const R: usize>(rows: [*const u8; R], ahead: usize, x: &[f32]) -> [f32; R] {
        let layout = scale_layout(34, false);
        let mut acc = [_mm512_setzero_ps(); R];
        for (c, xc) in x.chunks(32 * CHUNK).enumerate() {
            let (first, n) = (34 * CHUNK * c, xc.len() / 32);
            let mut d = [[0f32; CHUNK]; R];
            for r in 0..R {
                [d[r], _] = chunk_scales(rows[r].add(first), 34 * n, &layout);
            }
            for (j, xb) in xc.chunks_exact(32).enumerate().take(CHUNK) {
                let x0 = _mm512_loadu_ps(xb.as_ptr());
                let x1 = _mm512_loadu_ps(xb.as_ptr().add(16));
                for r in 0..R {
                    let blk = rows[r].add(first + 34 * j);
                    _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(ahead).cast());
                    let s = _mm512_mul_ps(widen_i8(blk.add(2)), x0);
                    let s = _mm512_fmadd_ps(widen_i8(blk.add(18)), x1, s);
                    acc[r] = _mm512_fmadd_ps(s, _mm512_set1_ps(d[r][j]), acc[r]);
                }
            }
        }
        reduce(acc)
    }

    /// Prefetches the cache lines of the `N` bytes at `p` (a hint: `p` need not be valid).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
    #[inline]
    fn prefetch_lines<const N: usize>(p: *const u8) {
        for offset in (0..N).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(offset).cast());
        }
    }

    /// The eight 6-bit scales and eight 6-bit minimums of a Q4_K/Q5_K super-block, packed in the
    /// 12 bytes at `p`, as bytes `[sc_0..7, m_0..7]` (ggml's `get_scale_min_k4`, done on the
    /// four 32-bit words at once as ggml's AVX2 code does).
    ///
    /// # Safety
    /// Sixteen bytes must be readable at `p` (the last four are ignored).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
    #[inline]
    unsafe fn k4_scales(p: *const u8) -> __m128i {
        const LOW6: i32 = 0x3f3f_3f3f;
        const LOW4: i32 = 0x0f0f_0f0f;
        const BITS45: i32 = 0x3030_3030;
        let v = _mm_loadu_si128(p.cast());
        // Words [u0, u2, u1, u2 >> 4] give sc_0..3, the low bits of sc_4..7, m_0..3 and the low
        // bits of m_4..7; the top two bits of u0 and u1 bytes complete sc_4..7 and m_4..7.
        let a = _mm_srlv_epi32(
            _mm_shuffle_epi32::<0b10_01_10_00>(v),
            _mm_setr_epi32(0, 0, 0, 4),
        );
        let low = _mm_and_si128(a, _mm_setr_epi32(LOW6, LOW4, LOW6, LOW4));
        let b = _mm_shuffle_epi32::<0b01_00_00_00>(v);
        let high = _mm_and_si128(_mm_srli_epi32::<2>(b), _mm_setr_epi32(0, BITS45, 0, BITS45));
        _mm_or_si128(low, high)
    }

    /// Q4_K (`d: f16 | dmin: f16 | scales: [u8; 12] | qs: [u8; 128]`, value
    /// `d sc_j q - dmin m_j` in sub-block `j`): `Σ_j d sc_j · Σ q x - dmin m_j · Σ x`.
    ///
    /// # Safety
    /// As [`matvec`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
    #[inline]
    unsafe fn q4_k<const R: usize>(
        rows: [*const u8; R],
        ahead: usize,
        x: &[f32],
        aux: &[f32],
    ) -> [f32; R] {
        let table = iota();
        let halves = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
        let mut acc = [_mm512_setzero_ps(); R];
        let mut acc_m = [_mm512_setzero_ps(); R];
        for (sb, (xsb, xs)) in x.chunks_exact(256).zip(aux.chunks_exact(16)).enumerate() {
            let xs = _mm512_loadu_ps(xs.as_ptr());
            for r in 0..R {
                let blk = rows[r].add(144 * sb);
                prefetch_lines::<144>(blk.wrapping_add(ahead));
                let d_dmin = _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(f16_pair(blk)));
                let codes = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(k4_scales(blk.add(4))));
                let scales = _mm512_mul_ps(d_dmin, codes);
                acc_m[r] = _mm512_fmadd_ps(scales, xs, acc_m[r]);
                let mut sc = [0f32; 16];
                _mm512_storeu_ps(sc.as_mut_ptr(), scales);
                let qs = blk.add(16);
                for c in 0..4 {
                    let xc = xsb.as_ptr().add(64 * c);
                    let qa = widen_u8(qs.add(32 * c));
                    let qb = widen_u8(qs.add(32 * c + 16));
                    let lo = _mm512_fmadd_ps(
                        _mm512_permutexvar_ps(qb, table),
                        _mm512_loadu_ps(xc.add(16)),
                        _mm512_mul_ps(_mm512_permutexvar_ps(qa, table), _mm512_loadu_ps(xc)),
                    );
                    let hi = _mm512_fmadd_ps(
                        _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(qb), table),
                        _mm512_loadu_ps(xc.add(48)),
                        _mm512_mul_ps(
                            _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(qa), table),
                            _mm512_loadu_ps(xc.add(32)),
                        ),
                    );
                    acc[r] = _mm512_fmadd_ps(lo, _mm512_set1_ps(sc[2 * c]), acc[r]);
                    acc[r] = _mm512_fmadd_ps(hi, _mm512_set1_ps(sc[2 * c + 1]), acc[r]);
                }
            }
        }
        let (mut out, mins) = (reduce(acc), reduce(acc_m));
        for (o, m) in out.iter_mut().zip(mins) {
            *o -= m;
        }
        out
    }

    /// Q6_K (`ql: [u8; 128] | qh: [u8; 64] | scales: [i8; 16] | d: f16`, value
    /// `d scales[g] (q - 32)` in 16-element group `g`): `Σ_g d scales[g] · (Σ q x - 32 Σ x)`.
    /// The 6-bit code is `low + 16 high`, each part looked up from a 16-entry table.
    ///
    /// # Safety
    /// As [`matvec`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
    #[inline]
    unsafe fn q6_k<const R: usize>(
        rows: [*const u8; R],
        ahead: usize,
        x: &[f32],
        aux: &[f32],
    ) -> [f32; R] {
        let low_table = iota();
        // 16 × (the low two bits of the lane): the high part, whatever the bits above hold.
        let high_table = _mm512_setr_ps(
            0.0, 16.0, 32.0, 48.0, 0.0, 16.0, 32.0, 48.0, 0.0, 16.0, 32.0, 48.0, 0.0, 16.0, 32.0,
            48.0,
        );
        let mut acc = [_mm512_setzero_ps(); R];
        let mut acc_m = [_mm512_setzero_ps(); R];
        for (sb, (xsb, xs)) in x.chunks_exact(256).zip(aux.chunks_exact(16)).enumerate() {
            let xs = _mm512_loadu_ps(xs.as_ptr());
            for r in 0..R {
                let blk = rows[r].add(210 * sb);
                prefetch_lines::<210>(blk.wrapping_add(ahead));
                // Bytes 206..210 are scales[14..16] and d: d is lane 1.
                let d = _mm512_permutexvar_ps(
                    _mm512_set1_epi32(1),
                    _mm512_castps128_ps512(f16_pair(blk.add(206))),
                );
                let scales = _mm512_mul_ps(d, widen_i8(blk.add(192)));
                acc_m[r] = _mm512_fmadd_ps(scales, xs, acc_m[r]);
                let mut sc = [0f32; 16];
                _mm512_storeu_ps(sc.as_mut_ptr(), scales);
                let (ql, qh) = (blk, blk.add(128));
                // Element 128 n + 32 s + 16 h + i: low bits from nibble s / 2 of
                // ql[64 n + 32 (s % 2) + 16 h + i], high bits 2s of qh[32 n + 16 h + i].
                for n in 0..2 {
                    for h in 0..2 {
                        let high_bits = widen_u8(qh.add(32 * n + 16 * h));
                        for s_low in 0..2 {
                            let low_bits = widen_u8(ql.add(64 * n + 32 * s_low + 16 * h));
                            let nibbles = [low_bits, _mm512_srli_epi32::<4>(low_bits)];
                            for (nibble, low) in nibbles.into_iter().enumerate() {
                                let s = s_low + 2 * nibble;
                                let high =
                                    _mm512_srlv_epi32(high_bits, _mm512_set1_epi32(2 * s as i32));
                                let q = _mm512_add_ps(
                                    _mm512_permutexvar_ps(low, low_table),
                                    _mm512_permutexvar_ps(high, high_table),
                                );
                                let e = 128 * n + 32 * s + 16 * h;
                                let qx = _mm512_mul_ps(q, _mm512_loadu_ps(xsb.as_ptr().add(e)));
                                acc[r] = _mm512_fmadd_ps(qx, _mm512_set1_ps(sc[e / 16]), acc[r]);
                            }
                        }
                    }
                }
            }
        }
        let (mut out, offsets) = (reduce(acc), reduce(acc_m));
        for (o, m) in out.iter_mut().zip(offsets) {
            *o -= m;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    /// A xorshift generator: deterministic test data without a dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        /// Uniform in [-1, 1).
        fn unit(&mut self) -> f32 {
            (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }
    }

    /// Byte offsets of the f16 scales in a block of `ty`.
    fn scale_offsets(ty: GgmlType) -> &'static [usize] {
        match ty {
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
            GgmlType::Q4_1 | GgmlType::Q4_K => &[0, 2],
            GgmlType::Q6_K => &[208],
            other => panic!("no test layout for {other}"),
        }
    }

    /// A `rows x cols` matrix of random codes with small finite f16 scales.
    fn random_matrix(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> QuantizedMatrix {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let (bs, ts) = (ty.block_size().unwrap(), ty.type_size().unwrap());
        let mut data: Vec<u8> = (0..rows * cols / bs * ts)
            .map(|_| rng.next() as u8)
            .collect();
        for block in data.chunks_exact_mut(ts) {
            for &o in scale_offsets(ty) {
                let v = f16::from_f32(0.05 * rng.unit());
                block[o..o + 2].copy_from_slice(&v.to_le_bytes());
            }
        }
        QuantizedMatrix::new(ty, rows, cols, data).unwrap()
    }

    /// Checks `got` against the f64 dot of the dequantized rows `rows` with `x`.
    fn check(m: &QuantizedMatrix, rows: Range<usize>, x: &[f32], got: &[f32], what: &str) {
        let mut w = Vec::new();
        m.dequantize_rows(rows.clone(), &mut w);
        for (i, (row, &got)) in w.chunks_exact(m.cols()).zip(got).enumerate() {
            let want: f64 = row.iter().zip(x).map(|(&a, &b)| a as f64 * b as f64).sum();
            let size: f64 = row
                .iter()
                .zip(x)
                .map(|(&a, &b)| (a as f64 * b as f64).abs())
                .sum();
            let tol = 1e-5 * (1.0 + want.abs() + size);
            assert!(
                (got as f64 - want).abs() <= tol,
                "{what}: {} {}x{} row {}: {got} vs {want}",
                m.ggml_type(),
                m.rows(),
                m.cols(),
                rows.start + i
            );
        }
    }

    /// `matvec_rows` and the fallback against the reference, for row counts around the kernel's
    /// row group and one, two and eighteen blocks per row, whole and a sub-range of rows.
    fn check_type(ty: GgmlType) {
        let bs = ty.block_size().unwrap();
        for (seed, (rows, blocks)) in [1, 3, 7, 9]
            .into_iter()
            .flat_map(|r| [(r, 1), (r, 2), (r, 18)])
            .enumerate()
        {
            let cols = blocks * bs;
            let m = random_matrix(ty, rows, cols, seed as u64 + 1);
            let mut rng = Rng(seed as u64 + 77);
            let x: Vec<f32> = (0..cols).map(|_| rng.unit()).collect();
            let ranges = [0..rows, rows / 3..rows - rows / 4, rows - 1..rows];
            for range in ranges {
                let mut fast = vec![f32::NAN; range.len()];
                m.matvec_rows(range.clone(), &x, &mut fast);
                check(&m, range.clone(), &x, &fast, "matvec_rows");
                let mut slow = vec![f32::NAN; range.len()];
                m.matvec_fallback(range.clone(), &x, &mut slow);
                check(&m, range.clone(), &x, &slow, "fallback");
                for (a, b) in fast.iter().zip(&slow) {
                    assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{ty}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn q4_0_matches_the_dequantized_product() {
        check_type(GgmlType::Q4_0);
    }

    #[test]
    fn q4_1_matches_the_dequantized_product() {
        check_type(GgmlType::Q4_1);
    }

    #[test]
    fn q8_0_matches_the_dequantized_product() {
        check_type(GgmlType::Q8_0);
    }

    #[test]
    fn q4_k_matches_the_dequantized_product() {
        check_type(GgmlType::Q4_K);
    }

    #[test]
    fn q6_k_matches_the_dequantized_product() {
        check_type(GgmlType::Q6_K);
    }

    #[test]
    fn q5_0_uses_the_fallback_and_matches() {
        #[cfg(target_arch = "x86_64")]
        assert!(avx512::Kernel::for_type(GgmlType::Q5_0).is_none());
        check_type(GgmlType::Q5_0);
    }

    #[test]
    fn new_rejects_bad_shapes_and_types() {
        let err = QuantizedMatrix::new(GgmlType::Q4_1, 2, 64, vec![0; 79]).unwrap_err();
        assert!(
            err.contains("80") && err.contains("79") && err.contains("2x64"),
            "{err}"
        );
        let err = QuantizedMatrix::new(GgmlType::Q8_0, 1, 48, vec![0; 51]).unwrap_err();
        assert!(err.contains("multiple"), "{err}");
        assert!(QuantizedMatrix::new(GgmlType::F16, 1, 32, vec![0; 64]).is_err());
        assert!(QuantizedMatrix::new(GgmlType::IQ4_NL, 1, 32, vec![0; 18]).is_err());
        let m = QuantizedMatrix::new(GgmlType::Q4_0, 3, 64, vec![0; 108]).unwrap();
        assert_eq!((m.rows(), m.cols(), m.bytes()), (3, 64, 108));
        assert_eq!(m.ggml_type(), GgmlType::Q4_0);
    }

    #[test]
    fn permute_rows_reorders_whole_rows() {
        let m = random_matrix(GgmlType::Q4_1, 5, 64, 9);
        let order = [3, 0, 4, 1, 2, 3];
        let p = m.permute_rows(&order);
        assert_eq!((p.rows(), p.cols()), (6, 64));
        let (mut all, mut permuted) = (Vec::new(), Vec::new());
        m.dequantize_rows(0..5, &mut all);
        p.dequantize_rows(0..6, &mut permuted);
        for (i, &src) in order.iter().enumerate() {
            assert_eq!(
                permuted[i * 64..(i + 1) * 64],
                all[src * 64..(src + 1) * 64]
            );
        }
    }

    #[test]
    fn dequantize_rows_appends_the_requested_rows() {
        let m = random_matrix(GgmlType::Q8_0, 4, 64, 3);
        let (mut all, mut some) = (Vec::new(), vec![1.0]);
        m.dequantize_rows(0..4, &mut all);
        m.dequantize_rows(1..3, &mut some);
        assert_eq!(some.len(), 1 + 2 * 64);
        assert_eq!(some[1..], all[64..192]);
    }
}
