//! The norms of the Llama-style decoders, chosen by the configuration: a block norm of any
//! [`NormKind`], and the query/key norms ([`QkNorm`]) applied to projected heads, including
//! OLMo 2's norm over the whole projection, whose statistics need every rank's heads.

use candle_core::{DType, Tensor};

use crate::checkpoint::config::{NormKind, QkNorm};
use crate::comm::Communicator;
use crate::error::Result;
use crate::models::attention::HeadLayout;
use crate::models::layers::{all_reduce, LayerNorm, RmsNorm};
use crate::parallel::engine::ShardLoader;

/// A norm over the last dimension, of one of the decoders' kinds.
#[derive(Debug, Clone)]
pub enum Norm {
    /// RMSNorm (Gemma's `1 + weight` folded into the weight at load time).
    Rms(RmsNorm),
    /// LayerNorm (a zero bias where the kind has none).
    Layer(LayerNorm),
}

impl Norm {
    /// Loads `prefix.weight` (and `prefix.bias` for [`NormKind::LayerNorm`]) of width `width`.
    pub fn load(
        loader: &mut ShardLoader,
        prefix: &str,
        kind: NormKind,
        width: usize,
        eps: f64,
    ) -> Result<Self> {
        let weight = loader.load(&format!("{prefix}.weight"), &[width])?;
        Norm::from_weight(loader, prefix, kind, weight, eps)
    }

    /// The norm of `kind` with an already loaded (possibly sliced) weight.
    fn from_weight(
        loader: &mut ShardLoader,
        prefix: &str,
        kind: NormKind,
        weight: Tensor,
        eps: f64,
    ) -> Result<Self> {
        let weight = weight.to_dtype(DType::F32)?;
        Ok(match kind {
            NormKind::Rms => Norm::Rms(RmsNorm::new(weight, eps)),
            NormKind::RmsOffset => Norm::Rms(RmsNorm::new((weight + 1.0)?, eps)),
            NormKind::LayerNorm => {
                let bias = loader.load(&format!("{prefix}.bias"), weight.dims())?;
                Norm::Layer(LayerNorm::new(weight, bias, eps))
            }
            NormKind::LayerNormNoBias => {
                let bias = weight.zeros_like()?;
                Norm::Layer(LayerNorm::new(weight, bias, eps))
            }
        })
    }

    /// Normalises `x` over its last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Norm::Rms(norm) => norm.forward(x),
            Norm::Layer(norm) => norm.forward(x),
        }
    }
}

/// A query or key norm of this rank's heads.
#[derive(Debug, Clone)]
pub enum HeadNorm {
    /// One norm over each head's width, its weight shared by every head.
    Shared {
        /// The norm of one head.
        norm: Norm,
        /// Width of a head.
        head_dim: usize,
    },
    /// A weight-only LayerNorm over each head's width with a weight per head, `[heads, D]`.
    OwnPerHead {
        /// This rank's heads' weights.
        weight: Tensor,
        /// The LayerNorm epsilon.
        eps: f32,
    },
    /// RMSNorm over the whole projection of every rank: this rank's slice of the weight, and
    /// the width of the whole projection.
    Whole {
        /// This rank's slice of the weight, `[heads * D]`.
        weight: Tensor,
        /// Width of the whole projection (every rank's heads).
        width: usize,
        /// The RMSNorm epsilon.
        eps: f32,
        /// The first of this rank's heads whose squares it adds to the statistics (key/value
        /// heads held by an earlier rank too are counted there), as a column offset.
        counted_from: usize,
    },
}

/// Which projection a [`HeadNorm`] normalises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadsOf {
    /// The queries (`q_norm`): heads split without overlap.
    Queries,
    /// The keys (`k_norm`): key/value heads, which ranks may share.
    Keys,
}

/// Where the loader finds a [`HeadNorm`]'s weights.
pub struct HeadNormSpec {
    /// The norm's kind.
    pub qk: QkNorm,
    /// The block norm kind (of [`QkNorm::SharedPerHead`]).
    pub kind: NormKind,
    /// Tensor prefix, e.g. `layers.3.self_attn.q_norm`.
    pub prefix: String,
    /// Queries or keys.
    pub heads_of: HeadsOf,
    /// This rank's heads.
    pub layout: HeadLayout,
    /// The whole model's heads of this projection.
    pub total_heads: usize,
    /// The first head of this projection this rank adds to shared statistics.
    pub counted_from_head: usize,
    /// Epsilon.
    pub eps: f64,
}

impl HeadNorm {
    /// Loads the norm `spec` describes.
    pub fn load(loader: &mut ShardLoader, spec: &HeadNormSpec) -> Result<Self> {
        let layout = spec.layout;
        let d = layout.head_dim;
        let (first, count) = match spec.heads_of {
            HeadsOf::Queries => (layout.first_head, layout.heads),
            HeadsOf::Keys => (layout.first_kv_head, layout.kv_heads),
        };
        Ok(match spec.qk {
            QkNorm::SharedPerHead => HeadNorm::Shared {
                norm: Norm::load(loader, &spec.prefix, spec.kind, d, spec.eps)?,
                head_dim: d,
            },
            QkNorm::OwnPerHead => {
                let weight = match loader
                    .try_load(&format!("{}.weight", spec.prefix), &[spec.total_heads, d])?
                {
                    Some(all) => all.narrow(0, first, count)?,
                    // StableLM: one LayerNorm per head, `norms.H.weight`.
                    None => {
                        let heads = (first..first + count)
                            .map(|h| {
                                loader.load(&format!("{}.norms.{h}.weight", spec.prefix), &[d])
                            })
                            .collect::<Result<Vec<_>>>()?;
                        Tensor::stack(&heads, 0)?
                    }
                };
                HeadNorm::OwnPerHead {
                    weight: weight.to_dtype(DType::F32)?,
                    eps: spec.eps as f32,
                }
            }
            QkNorm::WholeProjection => HeadNorm::Whole {
                weight: loader
                    .load(&format!("{}.weight", spec.prefix), &[spec.total_heads * d])?
                    .to_dtype(DType::F32)?,
                width: spec.total_heads * d,
                eps: spec.eps as f32,
                counted_from: (spec.counted_from_head.max(first) - first) * d,
            },
        })
    }

    /// Normalises projected heads `x` `[B, L, heads * D]`, returning `x`'s dtype.
    pub fn forward(&self, x: &Tensor, comm: &dyn Communicator) -> Result<Tensor> {
        let (b, l, width) = x.dims3()?;
        match self {
            HeadNorm::Shared { norm, head_dim } => Ok(norm
                .forward(&x.reshape((b, l, width / head_dim, *head_dim))?)?
                .reshape((b, l, width))?),
            HeadNorm::OwnPerHead { weight, eps } => {
                let (heads, d) = weight.dims2()?;
                let x32 = x.to_dtype(DType::F32)?.reshape((b, l, heads, d))?;
                let centred = x32.broadcast_sub(&x32.mean_keepdim(3)?)?;
                let variance = centred.sqr()?.mean_keepdim(3)?;
                let normed = centred.broadcast_div(&(variance + f64::from(*eps))?.sqrt()?)?;
                Ok(normed
                    .broadcast_mul(weight)?
                    .reshape((b, l, width))?
                    .to_dtype(x.dtype())?)
            }
            HeadNorm::Whole {
                weight,
                width: total,
                eps,
                counted_from,
            } => {
                let x32 = x.to_dtype(DType::F32)?;
                let local = match width - counted_from {
                    0 => Tensor::zeros((b, l, 1), DType::F32, x.device())?,
                    n => x32.narrow(2, *counted_from, n)?.sqr()?.sum_keepdim(2)?,
                };
                let sums = all_reduce(&local.contiguous()?, comm)?;
                let scale = ((sums / *total as f64)? + f64::from(*eps))?
                    .sqrt()?
                    .recip()?;
                Ok(x32
                    .broadcast_mul(&scale)?
                    .broadcast_mul(weight)?
                    .to_dtype(x.dtype())?)
            }
        }
    }
}
