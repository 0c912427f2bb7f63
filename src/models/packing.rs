//! Several batches in one forward pass. Their token rows are laid end to end, so that every
//! row-wise part of a block (projections, norms, MLPs, all-reduces) runs once over all of them,
//! reading each weight once, while attention runs on each batch over its own caches. A decode
//! step and a chunk of a joining prompt share a pass this way (vLLM's mixed batches).
//!
//! One batch alone is not repacked: its tensors keep their `[batch, len, ..]` shape.

use candle_core::Tensor;

use crate::comm::Communicator;
use crate::error::Result;
use crate::models::last_position;
use crate::models::layers::VocabParallelHead;

/// The `[batch, len]` shape of each batch of a pass, in order.
#[derive(Debug, Clone)]
pub struct Packing {
    shapes: Vec<(usize, usize)>,
}

impl Packing {
    /// A pass over batches of these `[batch, len]` shapes.
    pub fn new(shapes: Vec<(usize, usize)>) -> Self {
        Packing { shapes }
    }

    /// The shape of the packed token ids: a batch's own, or `[1, all tokens]` for several.
    pub fn ids_shape(&self) -> [usize; 2] {
        match self.shapes.as_slice() {
            [(batch, len)] => [*batch, *len],
            shapes => [1, shapes.iter().map(|(b, l)| b * l).sum()],
        }
    }

    /// Lays the batches' tensors `[batch, len, ..]` end to end along the token axis.
    pub fn pack(&self, mut parts: Vec<Tensor>) -> Result<Tensor> {
        if parts.len() == 1 {
            if let Some(part) = parts.pop() {
                return Ok(part);
            }
        }
        let flat = parts
            .iter()
            .map(|part| {
                let width = part.dim(2)?;
                Ok(part.reshape((1, part.dim(0)? * part.dim(1)?, width))?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&flat, 1)?)
    }

    /// Each batch's part `[batch, len, ..]` of a packed tensor.
    pub fn unpack(&self, packed: &Tensor) -> Result<Vec<Tensor>> {
        if self.shapes.len() == 1 {
            return Ok(vec![packed.clone()]);
        }
        let width = packed.dim(2)?;
        let mut start = 0;
        self.shapes
            .iter()
            .map(|&(batch, len)| {
                let part = packed.narrow(1, start, batch * len)?;
                start += batch * len;
                Ok(part.reshape((batch, len, width))?)
            })
            .collect()
    }
}

/// The LM head over each hidden state `[batch, len, hidden]` (its last position only where
/// `last_only` says), in one pass: `[batch, len or 1, vocab]` each, on every rank.
pub fn apply_head_to_each(
    head: &VocabParallelHead,
    hidden: &[(Tensor, bool)],
    comm: &dyn Communicator,
) -> Result<Vec<Tensor>> {
    let kept = hidden
        .iter()
        .map(|(h, last_only)| match last_only {
            true => last_position(h),
            false => Ok(h.clone()),
        })
        .collect::<Result<Vec<_>>>()?;
    let rows = kept
        .iter()
        .map(|h| {
            let (b, l, width) = h.dims3()?;
            Ok(h.reshape((b * l, width))?)
        })
        .collect::<Result<Vec<_>>>()?;
    let rows = match rows.len() {
        1 => rows[0].clone(),
        _ => Tensor::cat(&rows, 0)?,
    };
    let logits = head.forward(&rows, comm)?;
    let vocab = logits.dim(1)?;
    let mut start = 0;
    kept.iter()
        .map(|h| {
            let (b, l, _) = h.dims3()?;
            let part = logits.narrow(0, start, b * l)?;
            start += b * l;
            Ok(part.reshape((b, l, vocab))?)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn packing_lays_batches_end_to_end_and_unpacking_restores_them() -> Result<()> {
        let device = Device::Cpu;
        let a = Tensor::arange(0f32, 2.0 * 1.0 * 3.0, &device)?.reshape((2, 1, 3))?;
        let b = Tensor::arange(100f32, 100.0 + 3.0 * 4.0 * 3.0, &device)?.reshape((3, 4, 3))?;
        let packing = Packing::new(vec![(2, 1), (3, 4)]);
        assert_eq!(packing.ids_shape(), [1, 14]);
        let packed = packing.pack(vec![a.clone(), b.clone()])?;
        assert_eq!(packed.dims(), &[1, 14, 3]);
        assert_eq!(
            packed.get(0)?.get(2)?.to_vec1::<f32>()?,
            vec![100.0, 101.0, 102.0]
        );
        let parts = packing.unpack(&packed)?;
        assert_eq!(parts[0].to_vec3::<f32>()?, a.to_vec3::<f32>()?);
        assert_eq!(parts[1].to_vec3::<f32>()?, b.to_vec3::<f32>()?);
        Ok(())
    }

    #[test]
    fn one_batch_keeps_its_shape() -> Result<()> {
        let t = Tensor::zeros((2, 5, 3), candle_core::DType::F32, &Device::Cpu)?;
        let packing = Packing::new(vec![(2, 5)]);
        assert_eq!(packing.ids_shape(), [2, 5]);
        assert_eq!(packing.pack(vec![t.clone()])?.dims(), &[2, 5, 3]);
        assert_eq!(packing.unpack(&t)?[0].dims(), &[2, 5, 3]);
        Ok(())
    }
}
