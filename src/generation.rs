//! Token-by-token generation inside the ranks, in lock-step: every rank runs the same forward
//! passes; rank 0 chooses each token and broadcasts it, so all ranks extend their caches with the
//! same ids whatever rounding their own logits carry.

use std::time::Instant;

use candle_core::Tensor;

use crate::comm::Communicator;
use crate::error::{Error, Result};
use crate::models::{Batch, ShardedModel};
use crate::parallel::ipc::{GenerateRequest, Generated};

/// Greedy decoding with `min_new_tokens` (end-of-sequence suppressed until then), stopping after
/// an end-of-sequence id or `max_new_tokens`, as transformers' `generate` does. `on_token` sees
/// each token as soon as it is decided.
pub fn greedy(
    model: &mut dyn ShardedModel,
    comm: &dyn Communicator,
    req: &GenerateRequest,
    on_token: &mut dyn FnMut(u32) -> Result<()>,
) -> Result<Generated> {
    if req.input_ids.is_empty() {
        return Err(Error::InvalidInput("the prompt is empty".into()));
    }
    model.clear_cache();
    let mut ids = Vec::with_capacity(req.max_new_tokens);
    let start = Instant::now();
    if req.max_new_tokens == 0 {
        return Ok(Generated {
            ids,
            prefill_seconds: 0.0,
            decode_seconds: 0.0,
        });
    }
    let mut logits = step(model, comm, &req.input_ids)?;
    let prefill_seconds = start.elapsed().as_secs_f64();
    let decode_start = Instant::now();
    loop {
        let mut chosen = [0u8; 4];
        if comm.rank() == 0 {
            let suppress_eos = ids.len() < req.min_new_tokens;
            let values: Vec<f32> = logits.flatten_all()?.to_vec1()?;
            chosen = argmax(
                &values,
                suppress_eos.then_some(req.eos_token_ids.as_slice()),
            )?
            .to_le_bytes();
        }
        comm.broadcast(&mut chosen, 0)?;
        let token = u32::from_le_bytes(chosen);
        ids.push(token);
        on_token(token)?;
        if req.eos_token_ids.contains(&token) || ids.len() >= req.max_new_tokens {
            break;
        }
        logits = step(model, comm, &[token])?;
    }
    model.clear_cache();
    Ok(Generated {
        ids,
        prefill_seconds,
        decode_seconds: decode_start.elapsed().as_secs_f64(),
    })
}

/// Feeds `ids` after the cached ones and returns the last position's logits (read only by
/// rank 0, which chooses the token).
fn step(model: &mut dyn ShardedModel, comm: &dyn Communicator, ids: &[u32]) -> Result<Tensor> {
    let batch = Batch {
        ids,
        batch: 1,
        seq_len: ids.len(),
        attention_mask: None,
        use_cache: true,
        last_only: true,
    };
    model.forward(&batch, comm)
}

/// The index of the largest logit (the first on ties, like `torch.argmax`), skipping `banned`.
fn argmax(logits: &[f32], banned: Option<&[u32]>) -> Result<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in logits.iter().enumerate() {
        if banned.is_some_and(|b| b.contains(&(i as u32))) {
            continue;
        }
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map(|(i, _)| i as u32).ok_or_else(|| {
        Error::InvalidInput("every token is banned; nothing can be generated".into())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_of_equal_maxima() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0], None).unwrap(), 1);
    }

    #[test]
    fn banned_ids_are_skipped() {
        assert_eq!(argmax(&[1.0, 3.0, 2.0], Some(&[1])).unwrap(), 2);
    }
}
