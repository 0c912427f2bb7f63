//! Rotary position embeddings: the inverse frequencies of a rotary base (and, where the
//! checkpoint asks for it, a scaled variant), and the rotation of queries and keys by the angles
//! of their positions.

use candle_core::{Device, Tensor};

use crate::error::Result;

/// Rotary position embedding: the `rotate_half` layout of transformers' Llama, or GPT-J's
/// interleaved pairs, on the whole head or its first dimensions.
#[derive(Debug, Clone)]
pub struct Rotary {
    inv_freq: Vec<f32>,
    interleaved: bool,
}

impl Rotary {
    /// For heads of width `head_dim` and base frequency `theta`.
    pub fn new(head_dim: usize, theta: f64) -> Self {
        Rotary::partial(head_dim, theta, false)
    }

    /// On the first `rotary_dim` dimensions of each head (the others pass unchanged), pairing
    /// adjacent dimensions when `interleaved`.
    pub fn partial(rotary_dim: usize, theta: f64, interleaved: bool) -> Self {
        let inv_freq = (0..rotary_dim / 2)
            .map(|i| (1.0 / theta.powf((2 * i) as f64 / rotary_dim as f64)) as f32)
            .collect();
        Rotary {
            inv_freq,
            interleaved,
        }
    }

    /// The angles of position ids `positions` (`batch` rows of `len`), computed once per
    /// forward pass and shared by every layer's queries and keys.
    pub fn angles(&self, positions: &[u32], batch: usize, len: usize) -> Result<RotaryAngles> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &pos in positions {
            for &f in &self.inv_freq {
                let angle = pos as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Ok(RotaryAngles {
            cos: Tensor::from_vec(cos, (batch, len, half), &Device::Cpu)?,
            sin: Tensor::from_vec(sin, (batch, len, half), &Device::Cpu)?,
            interleaved: self.interleaved,
        })
    }
}

/// Cosines and sines `[B, L, D/2]` of a batch's positions.
#[derive(Debug, Clone)]
pub struct RotaryAngles {
    cos: Tensor,
    sin: Tensor,
    interleaved: bool,
}

impl RotaryAngles {
    /// Rotates `x` `[B, H, L, D]` at these positions (its first dimensions, as many as the
    /// angles cover).
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let cos = self.cos.to_dtype(x.dtype())?;
        let sin = self.sin.to_dtype(x.dtype())?;
        let (dim, rotated) = (x.dim(3)?, 2 * self.cos.dim(2)?);
        let rotate = |x: &Tensor| -> Result<Tensor> {
            let x = x.contiguous()?;
            Ok(match self.interleaved {
                true => candle_nn::rotary_emb::rope_i(&x, &cos, &sin)?,
                false => candle_nn::rotary_emb::rope(&x, &cos, &sin)?,
            })
        };
        if rotated == dim {
            return rotate(x);
        }
        let head = rotate(&x.narrow(3, 0, rotated)?)?;
        Ok(Tensor::cat(
            &[head, x.narrow(3, rotated, dim - rotated)?],
            3,
        )?)
    }
}
