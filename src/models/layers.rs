//! The tensor-parallel building blocks every family is wired from: column- and row-parallel
//! linears, the vocabulary-parallel embedding and LM head, norms and activations.
//!
//! A column-parallel linear needs no communication; a row-parallel one ends in an all-reduce and
//! adds its (replicated) bias afterwards, once. With one rank the communicator is a no-op, so the
//! same code runs unsplit.

use std::ops::Range;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};

use crate::checkpoint::Activation;
use crate::comm::Communicator;
use crate::error::Result;
use crate::models::quantized::QuantizedMatrix;
use crate::models::{elementwise, kernels};

/// Sums `t` across ranks (through f32, whatever its dtype).
pub fn all_reduce(t: &Tensor, comm: &dyn Communicator) -> Result<Tensor> {
    if comm.world_size() == 1 {
        return Ok(t.clone());
    }
    let mut values: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    comm.all_reduce_sum(&mut values)?;
    Ok(Tensor::from_vec(values, t.shape(), t.device())?.to_dtype(t.dtype())?)
}

/// Converts a small replicated tensor (bias, norm weight, position table) to f32, the dtype of
/// every activation.
pub fn to_f32(t: Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F32)?)
}

/// A weight matrix `[out, in]` as a rank holds it: a candle tensor in the run's dtype, or the
/// quantized blocks of a GGUF tensor, dequantized only inside the kernels.
#[derive(Debug, Clone)]
pub enum LinearWeight {
    /// f32, f16 or bf16 values.
    Dense(Tensor),
    /// GGUF blocks, shared by the layers that use them (a tied embedding and LM head).
    Quantized(Arc<QuantizedMatrix>),
}

impl From<Tensor> for LinearWeight {
    fn from(t: Tensor) -> Self {
        LinearWeight::Dense(t)
    }
}

impl From<QuantizedMatrix> for LinearWeight {
    fn from(m: QuantizedMatrix) -> Self {
        LinearWeight::Quantized(Arc::new(m))
    }
}

impl LinearWeight {
    /// Output features (rows).
    pub fn rows(&self) -> Result<usize> {
        Ok(match self {
            LinearWeight::Dense(t) => t.dim(0)?,
            LinearWeight::Quantized(m) => m.rows(),
        })
    }

    /// Rows `index` as f32 `[index.len(), in]` (an embedding lookup).
    pub fn select_rows(&self, index: &[u32]) -> Result<Tensor> {
        match self {
            LinearWeight::Dense(t) => {
                let index = Tensor::from_slice(index, index.len(), &Device::Cpu)?;
                Ok(t.index_select(&index, 0)?.to_dtype(DType::F32)?)
            }
            LinearWeight::Quantized(m) => {
                let mut values = Vec::with_capacity(index.len() * m.cols());
                for &row in index {
                    let row = row as usize;
                    m.dequantize_rows(row..row + 1, &mut values);
                }
                Ok(Tensor::from_vec(
                    values,
                    (index.len(), m.cols()),
                    &Device::Cpu,
                )?)
            }
        }
    }

    /// The whole matrix in f32 (for matmuls over several rows).
    fn to_f32(&self) -> Result<Tensor> {
        match self {
            LinearWeight::Dense(t) => Ok(t.to_dtype(DType::F32)?),
            LinearWeight::Quantized(m) => {
                let mut values = Vec::with_capacity(m.rows() * m.cols());
                m.dequantize_rows(0..m.rows(), &mut values);
                Ok(Tensor::from_vec(
                    values,
                    (m.rows(), m.cols()),
                    &Device::Cpu,
                )?)
            }
        }
    }
}

/// `x @ weight.T + bias` for f32 activations `x` of shape `[.., in]` and a weight of shape
/// `[out, in]` kept in the run's dtype (f32, f16, bf16 or quantized) and widened on the fly.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
}

impl Linear {
    /// A linear layer from a weight `[out, in]` and an optional bias `[out]`.
    pub fn new(weight: impl Into<LinearWeight>, bias: Option<Tensor>) -> Self {
        let bias = bias.map(|b| b.to_dtype(DType::F32).unwrap_or(b));
        Linear {
            weight: weight.into(),
            bias,
        }
    }

    /// Applies the layer.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let features = dims[dims.len() - 1];
        let x = x.reshape((rows, features))?;
        let y = match rows {
            1 => self.matvec(&x)?,
            _ => self.matmul(&x)?,
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out_dims = dims;
        let last = out_dims.len() - 1;
        out_dims[last] = self.weight.rows()?;
        Ok(y.reshape(out_dims)?)
    }
}

impl Linear {
    /// `x @ weight.T` for several rows in f32. AVX-512 CPUs read the weight where it lies
    /// (widening 16-bit values and dequantizing blocks inside the kernel); elsewhere a 16-bit
    /// or quantized weight is widened first, because the CPU's f32 matmul is several times
    /// faster than its 16-bit one and keeps f32 accuracy.
    fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        #[cfg(target_arch = "x86_64")]
        if crate::models::matmul::available() {
            if let Some(y) = self.tiled_matmul(&x)? {
                return Ok(y);
            }
        }
        let weight = self.weight.to_f32()?;
        Ok(x.matmul(&weight.t()?)?)
    }

    /// `x @ weight.T` through the prefill kernels for a contiguous f32 `x` `[m, in]`; `None`
    /// when the weight is not contiguous.
    #[cfg(target_arch = "x86_64")]
    fn tiled_matmul(&self, x: &Tensor) -> Result<Option<Tensor>> {
        use crate::models::matmul;
        let (m, k) = x.dims2()?;
        let n = self.weight.rows()?;
        let y = with_dense(x, |input| match input {
            DenseSlice::F32(input) => match &self.weight {
                LinearWeight::Quantized(q) => Ok(Some(matmul::matmul_dequantized(
                    input,
                    n,
                    k,
                    |rows, out| q.dequantize_rows(rows, out),
                ))),
                // A few tokens (a batch's decode step) stream the weight once, like a matvec.
                LinearWeight::Dense(w) if m <= kernels::FEW_TOKENS => with_dense(w, |w| {
                    let mut out = vec![0f32; m * n];
                    on_dense!(w, w => kernels::matmul_few(w, input, k, &mut out));
                    out
                }),
                LinearWeight::Dense(w) => {
                    with_dense(w, |w| on_dense!(w, w => matmul::matmul(input, w, k)))
                }
            },
            _ => Ok(None),
        })?
        .transpose()?
        .flatten();
        y.map(|y| Ok(Tensor::from_vec(y, (m, n), &Device::Cpu)?))
            .transpose()
    }

    /// `x @ weight.T` for a single row `x` `[1, in]`, streaming the weight once through the
    /// decode kernels.
    fn matvec(&self, x: &Tensor) -> Result<Tensor> {
        let input: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let rows = self.weight.rows()?;
        let mut out = vec![0f32; rows];
        let weight = match &self.weight {
            LinearWeight::Quantized(m) => {
                parallel_rows(&mut out, |range, y| m.matvec_rows(range, &input, y));
                return Ok(Tensor::from_vec(out, (1, rows), &Device::Cpu)?);
            }
            LinearWeight::Dense(weight) => weight,
        };
        match with_dense(
            weight,
            |w| on_dense!(w, w => dense_rows(w, &input, &mut out)),
        )? {
            Some(()) => Ok(Tensor::from_vec(out, (1, rows), &Device::Cpu)?),
            None => self.matmul(x),
        }
    }
}

/// The values of a contiguous CPU tensor in one of the dtypes the kernels read.
enum DenseSlice<'a> {
    F32(&'a [f32]),
    F16(&'a [half::f16]),
    BF16(&'a [half::bf16]),
}

/// Evaluates `$body` with `$w` bound to the typed slice inside a [`DenseSlice`], whatever its
/// dtype (the kernels are generic over the weight type).
macro_rules! on_dense {
    ($slice:expr, $w:ident => $body:expr) => {
        match $slice {
            DenseSlice::F32($w) => $body,
            DenseSlice::F16($w) => $body,
            DenseSlice::BF16($w) => $body,
        }
    };
}
use on_dense;

/// Calls `f` with the values of `t` when it is a contiguous CPU tensor in f32, f16 or bf16;
/// `None` otherwise.
fn with_dense<R>(t: &Tensor, f: impl FnOnce(DenseSlice) -> R) -> Result<Option<R>> {
    let (storage, layout) = t.storage_and_layout();
    let (candle_core::Storage::Cpu(cpu), Some((start, end))) =
        (&*storage, layout.contiguous_offsets())
    else {
        return Ok(None);
    };
    let slice = match t.dtype() {
        DType::F32 => DenseSlice::F32(&cpu.as_slice::<f32>()?[start..end]),
        DType::F16 => DenseSlice::F16(&cpu.as_slice::<half::f16>()?[start..end]),
        DType::BF16 => DenseSlice::BF16(&cpu.as_slice::<half::bf16>()?[start..end]),
        _ => return Ok(None),
    };
    Ok(Some(f(slice)))
}

/// `out = w · x` for a dense row-major `w` through the decode kernel, rows spread over the
/// compute threads.
fn dense_rows<W: kernels::Weight>(w: &[W], x: &[f32], out: &mut [f32]) {
    let cols = x.len();
    parallel_rows(out, |range, y| {
        kernels::matvec(&w[range.start * cols..range.end * cols], x, y)
    });
}

/// Runs `kernel(rows, out[rows])` over blocks of rows on the compute thread pool (in one call
/// when there is one thread).
fn parallel_rows(out: &mut [f32], kernel: impl Fn(Range<usize>, &mut [f32]) + Sync) {
    use rayon::prelude::*;
    const ROWS_PER_TASK: usize = 64;
    if rayon::current_num_threads() == 1 {
        return kernel(0..out.len(), out);
    }
    out.par_chunks_mut(ROWS_PER_TASK)
        .enumerate()
        .for_each(|(i, y)| kernel(i * ROWS_PER_TASK..i * ROWS_PER_TASK + y.len(), y));
}

impl From<(Tensor, Option<Tensor>)> for Linear {
    fn from((weight, bias): (Tensor, Option<Tensor>)) -> Self {
        Linear::new(weight, bias)
    }
}

impl From<(LinearWeight, Option<Tensor>)> for Linear {
    fn from((weight, bias): (LinearWeight, Option<Tensor>)) -> Self {
        Linear::new(weight, bias)
    }
}

/// A linear whose input features are split among ranks; partial outputs are summed by an
/// all-reduce and the bias is added after it.
#[derive(Debug, Clone)]
pub struct RowParallelLinear {
    linear: Linear,
    bias: Option<Tensor>,
}

impl RowParallelLinear {
    /// From this rank's weight slice `[out, in_r]` and the whole bias `[out]`.
    pub fn new(weight: impl Into<LinearWeight>, bias: Option<Tensor>) -> Self {
        RowParallelLinear {
            linear: Linear::new(weight, None),
            bias: bias.map(|b| b.to_dtype(DType::F32).unwrap_or(b)),
        }
    }

    /// Applies the layer; every rank returns the same full output.
    pub fn forward(&self, x: &Tensor, comm: &dyn Communicator) -> Result<Tensor> {
        let y = all_reduce(&self.linear.forward(x)?, comm)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

impl From<(Tensor, Option<Tensor>)> for RowParallelLinear {
    fn from((weight, bias): (Tensor, Option<Tensor>)) -> Self {
        RowParallelLinear::new(weight, bias)
    }
}

impl From<(LinearWeight, Option<Tensor>)> for RowParallelLinear {
    fn from((weight, bias): (LinearWeight, Option<Tensor>)) -> Self {
        RowParallelLinear::new(weight, bias)
    }
}

/// A word embedding whose rows (vocabulary entries) are split among ranks: each rank looks up
/// the ids it owns, zeros elsewhere, and an all-reduce assembles the full embedding.
#[derive(Debug, Clone)]
pub struct VocabParallelEmbedding {
    weight: LinearWeight,
    first_id: u32,
}

impl VocabParallelEmbedding {
    /// From this rank's rows `[v_r, hidden]`, which start at vocabulary id `first_id`.
    pub fn new(weight: impl Into<LinearWeight>, first_id: usize) -> Self {
        VocabParallelEmbedding {
            weight: weight.into(),
            first_id: first_id as u32,
        }
    }

    /// This rank's rows, for a tied LM head.
    pub fn weight(&self) -> &LinearWeight {
        &self.weight
    }

    /// Embeds `ids` (any shape given by `shape`), returning f32 `[shape.., hidden]` on every rank.
    pub fn forward(&self, ids: &[u32], shape: &[usize], comm: &dyn Communicator) -> Result<Tensor> {
        let rows = self.weight.rows()? as u32;
        let (local, owned): (Vec<u32>, Vec<f32>) = ids
            .iter()
            .map(|&id| match id.checked_sub(self.first_id) {
                Some(local) if local < rows => (local, 1.0),
                _ => (0, 0.0),
            })
            .unzip();
        let owned = Tensor::from_vec(owned, (ids.len(), 1), &Device::Cpu)?;
        let rows = self.weight.select_rows(&local)?.broadcast_mul(&owned)?;
        let mut out_shape = shape.to_vec();
        out_shape.push(rows.dim(1)?);
        all_reduce(&rows.reshape(out_shape)?, comm)
    }
}

/// The LM head over a vocabulary split among ranks: each rank computes its logits, an
/// all-gather concatenates them in vocabulary order.
#[derive(Debug, Clone)]
pub struct VocabParallelHead {
    linear: Linear,
    widths: Vec<usize>,
}

impl VocabParallelHead {
    /// From this rank's rows `[v_r, hidden]`, optional bias slice `[v_r]`, and every rank's
    /// vocabulary width (to reassemble the gathered logits).
    pub fn new(weight: impl Into<LinearWeight>, bias: Option<Tensor>, widths: Vec<usize>) -> Self {
        VocabParallelHead {
            linear: Linear::new(weight, bias),
            widths,
        }
    }

    /// Logits `[rows, V]` in f32 for hidden states `[rows, hidden]`, identical on every rank.
    pub fn forward(&self, hidden: &Tensor, comm: &dyn Communicator) -> Result<Tensor> {
        let local = self.linear.forward(hidden)?.to_dtype(DType::F32)?;
        if comm.world_size() == 1 {
            return Ok(local);
        }
        let rows = local.dim(0)?;
        let gathered = comm.all_gather(&local.flatten_all()?.to_vec1::<f32>()?)?;
        let expected = rows * self.widths.iter().sum::<usize>();
        if gathered.len() != expected {
            return Err(crate::error::Error::InvalidInput(format!(
                "gathered {} logits from the ranks, expected {expected}",
                gathered.len()
            )));
        }
        let mut pieces = Vec::with_capacity(self.widths.len());
        let mut start = 0;
        for &width in &self.widths {
            let len = rows * width;
            pieces.push(Tensor::from_slice(
                &gathered[start..start + len],
                (rows, width),
                &Device::Cpu,
            )?);
            start += len;
        }
        Ok(Tensor::cat(&pieces, 1)?)
    }
}

/// LayerNorm with weight and bias, computed in f32.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    /// From the (replicated) weight and bias.
    pub fn new(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        LayerNorm {
            weight: weight.to_dtype(DType::F32).unwrap_or(weight),
            bias: bias.to_dtype(DType::F32).unwrap_or(bias),
            eps: eps as f32,
        }
    }

    /// Normalises over the last dimension, returning `x`'s dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = candle_nn::ops::layer_norm(
            &x.to_dtype(DType::F32)?.contiguous()?,
            &self.weight,
            &self.bias,
            self.eps,
        )?;
        Ok(y.to_dtype(x.dtype())?)
    }
}

/// RMSNorm (Llama), computed in f32 as transformers does.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    /// From the (replicated) weight.
    pub fn new(weight: Tensor, eps: f64) -> Self {
        RmsNorm {
            weight: weight.to_dtype(DType::F32).unwrap_or(weight),
            eps: eps as f32,
        }
    }

    /// Normalises over the last dimension, returning `x`'s dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = candle_nn::ops::rms_norm(
            &x.to_dtype(DType::F32)?.contiguous()?,
            &self.weight,
            self.eps,
        )?;
        Ok(y.to_dtype(x.dtype())?)
    }
}

/// Applies an activation function.
pub fn activate(activation: Activation, x: &Tensor) -> Result<Tensor> {
    Ok(match activation {
        Activation::GeluErf => x.gelu_erf()?,
        Activation::GeluTanh => x.gelu()?,
        Activation::Silu => map_values(x, elementwise::silu)?,
        Activation::Relu => x.relu()?,
    })
}

/// `activation(gate) * up`, the gated MLP step, fused into one pass for SiLU.
pub fn gated(activation: Activation, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if activation != Activation::Silu || gate.shape() != up.shape() {
        return Ok((activate(activation, gate)? * up)?);
    }
    let up = up.to_dtype(DType::F32)?;
    with_values(&up, |up| {
        map_values(gate, |gate| elementwise::silu_mul(gate, up))
    })?
}

/// Softmax over the last dimension in f32 (a row whose entries are all masked gives zeros).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let cols = x.dim(D::Minus1)?;
    map_values(x, |values| elementwise::softmax_rows(values, cols))
}

/// A copy of `x` in f32 whose values `f` rewrote in place.
fn map_values(x: &Tensor, f: impl FnOnce(&mut [f32])) -> Result<Tensor> {
    let mut values: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    f(&mut values);
    Ok(Tensor::from_vec(values, x.shape(), x.device())?)
}

/// Runs `f` on the values of an f32 tensor, made contiguous if it is not.
pub(crate) fn with_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(cpu), Some((start, end))) => {
            Ok(f(&cpu.as_slice::<f32>()?[start..end]))
        }
        _ => {
            Err(candle_core::Error::Msg("expected contiguous f32 values on the CPU".into()).into())
        }
    }
}
