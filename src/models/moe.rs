//! The sparse mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) split as
//! *tensor-parallel experts*:
//! every expert's gate and up projections split by rows and its down projection by columns,
//! exactly like the dense MLP, so each rank holds `1 / ranks` of every expert. The router is
//! replicated, so every rank routes every token alike; each rank runs only the experts some
//! token was routed to (a decode step reads the top-k experts' slices and nothing else), and
//! one all-reduce per layer sums the ranks' partial outputs. Qwen2-MoE's shared expert, which
//! every token goes through, is split the same way and joins that one all-reduce.
//!
//! Split by *expert parallelism* instead, each rank holds whole experts (a contiguous range of
//! their numbers, as even as the count allows) and runs only the tokens routed to them; the same
//! all-reduce then sums the ranks' outputs, so a token's experts may sit on different ranks.
//!
//! Routing follows transformers' `MixtralTopKRouter` / `Qwen3MoeTopKRouter`: a softmax over the
//! router logits in f32, the top k with `torch.topk`'s order (larger first, the lower expert
//! first on ties), renormalised when the configuration says, applied in f32.

use std::cmp::Ordering;

use candle_core::{DType, Device, Tensor};

use crate::checkpoint::config::MoeConfig;
use crate::checkpoint::{Activation, ModelConfig};
use crate::comm::Communicator;
use crate::error::Result;
use crate::models::elementwise;
use crate::models::layers::{all_reduce, gated, with_values, Linear};
use crate::parallel::engine::ShardLoader;

/// This rank's slice of one expert: `down(act(gate(x)) * up(x))` without the all-reduce.
struct Expert {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Expert {
    /// This rank's share of the expert's output for `rows` (`[tokens, hidden]`, f32).
    fn forward(&self, rows: &Tensor, activation: Activation) -> Result<Tensor> {
        let inner = gated(
            activation,
            &self.gate.forward(rows)?,
            &self.up.forward(rows)?,
        )?;
        self.down.forward(&inner)
    }

    /// Loads `{prefix}.{gate,up,down}.weight` (the names in `projections`' order), `width`
    /// hidden units wide over `hidden`.
    fn load(
        loader: &mut ShardLoader,
        prefix: &str,
        projections: [&str; 3],
        width: usize,
        hidden: usize,
    ) -> Result<Self> {
        let [gate, up, down] = projections;
        let mut proj = |name: &str, shape: [usize; 2]| -> Result<Linear> {
            let weight = loader.load_linear(&format!("{prefix}.{name}.weight"), &shape)?;
            Ok(Linear::new(weight, None))
        };
        Ok(Expert {
            gate: proj(gate, [width, hidden])?,
            up: proj(up, [width, hidden])?,
            down: proj(down, [hidden, width])?,
        })
    }
}

/// Qwen2-MoE's shared expert: this rank's slice of a gated MLP every token goes through, whose
/// output is scaled per token by `sigmoid(gate(x))` (`shared_expert_gate`, `[1, hidden]`,
/// replicated) and added to the routed experts' before the layer's all-reduce. The scale is
/// the same on every rank, so scaling each rank's partial output scales their sum.
struct SharedExpert {
    expert: Expert,
    gate: Linear,
}

impl SharedExpert {
    /// Loads layer `layer`'s shared expert, `width` hidden units wide.
    fn load(
        loader: &mut ShardLoader,
        c: &ModelConfig,
        moe: &MoeConfig,
        layer: usize,
        width: usize,
    ) -> Result<Self> {
        let h = c.hidden_size;
        let prefix = format!("layers.{layer}.mlp.shared_expert");
        let expert = Expert::load(loader, &prefix, moe.names.projections(), width, h)?;
        let gate_name = format!("layers.{layer}.mlp.shared_expert_gate.weight");
        let gate = Linear::new(loader.load_linear(&gate_name, &[1, h])?, None);
        Ok(SharedExpert { expert, gate })
    }

    /// Adds this rank's share of the shared expert's output for `flat` (`[tokens, hidden]`,
    /// f32) to `out`, row by row.
    fn add_to(&self, flat: &Tensor, activation: Activation, out: &mut [f32]) -> Result<()> {
        let gate_logits: Vec<f32> = self.gate.forward(flat)?.flatten_all()?.to_vec1()?;
        let scales = gate_logits
            .iter()
            .map(|&logit| 1.0 / (1.0 + (-logit).exp()));
        let partial = self.expert.forward(flat, activation)?;
        add_weighted_rows(out, &partial, scales.enumerate())
    }
}

/// A sparse MLP: a replicated router; what this rank holds of the experts, by number: a slice of
/// every expert (tensor-parallel experts), or whole experts, `None` for those another rank holds
/// (expert parallelism); and its slice of the shared expert where the family has one.
pub(crate) struct SparseMoe {
    router: Linear,
    experts: Vec<Option<Expert>>,
    top_k: usize,
    renormalize: bool,
    shared: Option<SharedExpert>,
}

/// The tokens one expert serves and the weight each gives its output.
#[derive(Debug, Default, PartialEq)]
struct Assignment {
    tokens: Vec<u32>,
    weights: Vec<f32>,
}

impl SparseMoe {
    /// Loads layer `layer`'s router and this rank's slice of its experts.
    pub(crate) fn load(
        loader: &mut ShardLoader,
        c: &ModelConfig,
        moe: &MoeConfig,
        layer: usize,
    ) -> Result<Self> {
        let (h, width) = (c.hidden_size, moe.intermediate_size);
        let router_name = format!("layers.{layer}.{}.weight", moe.names.router());
        // In f32 whatever the dtype (the policy's `Role::Router`).
        let router = Linear::new(loader.load_linear(&router_name, &[moe.experts, h])?, None);
        let mut experts = Vec::with_capacity(moe.experts);
        for e in 0..moe.experts {
            let prefix = format!("layers.{layer}.{}.{e}", moe.names.experts());
            let [gate, ..] = moe.names.projections();
            if !loader.holds(&format!("{prefix}.{gate}.weight"))? {
                experts.push(None);
                continue;
            }
            experts.push(Some(Expert::load(
                loader,
                &prefix,
                moe.names.projections(),
                width,
                h,
            )?));
        }
        let shared = match moe.shared_expert {
            Some(width) => Some(SharedExpert::load(loader, c, moe, layer, width)?),
            None => None,
        };
        Ok(SparseMoe {
            router,
            experts,
            top_k: moe.top_k,
            renormalize: moe.renormalize,
            shared,
        })
    }

    /// The MLP's output for `x` `[.., hidden]`, summed across ranks.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        activation: Activation,
        comm: &dyn Communicator,
    ) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let hidden = dims[dims.len() - 1];
        let tokens = x.elem_count() / hidden.max(1);
        let flat = x.reshape((tokens, hidden))?.to_dtype(DType::F32)?;
        let mut logits: Vec<f32> = self.router.forward(&flat)?.flatten_all()?.to_vec1()?;
        let routes = route(
            &mut logits,
            self.experts.len(),
            self.top_k,
            self.renormalize,
        );
        let mut out = vec![0f32; tokens * hidden];
        for (expert, assigned) in self.experts.iter().zip(&routes) {
            let Some(expert) = expert.as_ref().filter(|_| !assigned.tokens.is_empty()) else {
                continue;
            };
            let index = Tensor::from_slice(&assigned.tokens, assigned.tokens.len(), &Device::Cpu)?;
            let partial = expert.forward(&flat.index_select(&index, 0)?, activation)?;
            let targets = assigned.tokens.iter().map(|&token| token as usize);
            add_weighted_rows(
                &mut out,
                &partial,
                targets.zip(assigned.weights.iter().copied()),
            )?;
        }
        if let Some(shared) = &self.shared {
            shared.add_to(&flat, activation, &mut out)?;
        }
        let out = Tensor::from_vec(out, dims, &Device::Cpu)?;
        all_reduce(&out, comm)
    }
}

/// Adds row `i` of `partial` (`[rows, hidden]`), times its weight, to row `token` of `out`
/// (`[tokens, hidden]`), for each `(token, weight)` of `targets` in row order.
fn add_weighted_rows(
    out: &mut [f32],
    partial: &Tensor,
    targets: impl Iterator<Item = (usize, f32)>,
) -> Result<()> {
    let hidden = partial.dim(1)?;
    with_values(partial, |values| {
        for (row, (token, weight)) in values.chunks_exact(hidden).zip(targets) {
            let target = &mut out[token * hidden..][..hidden];
            for (o, v) in target.iter_mut().zip(row) {
                *o += v * weight;
            }
        }
    })
}

/// Routes each token (a row of `logits`, `[tokens, experts]`, softmaxed in place) to its
/// `top_k` experts; per expert, the tokens it serves in order and their weights.
fn route(logits: &mut [f32], experts: usize, top_k: usize, renormalize: bool) -> Vec<Assignment> {
    let mut routes: Vec<Assignment> = (0..experts).map(|_| Assignment::default()).collect();
    if experts == 0 {
        return routes;
    }
    elementwise::softmax_rows(logits, experts);
    let mut order: Vec<usize> = Vec::with_capacity(experts);
    for (token, probs) in logits.chunks_exact(experts).enumerate() {
        order.clear();
        order.extend(0..experts);
        // torch.topk: larger first; on ties, the lower index first (a stable sort keeps it).
        order.sort_by(|&a, &b| probs[b].partial_cmp(&probs[a]).unwrap_or(Ordering::Equal));
        let chosen = &order[..top_k.min(experts)];
        let sum: f32 = chosen.iter().map(|&e| probs[e]).sum();
        for &e in chosen {
            let weight = match renormalize {
                true => probs[e] / sum,
                false => probs[e],
            };
            routes[e].tokens.push(token as u32);
            routes[e].weights.push(weight);
        }
    }
    routes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_token_goes_to_its_two_most_probable_experts_with_renormalised_weights() {
        // Probabilities are proportional to exp(logit): token 0 prefers 2 then 0, token 1
        // prefers 1 then 2.
        let mut logits = [1.0, 0.0, 2.0, 0.0, 3.0, 1.0];
        let routes = route(&mut logits, 3, 2, true);
        let e = std::f32::consts::E;
        assert_eq!(routes[0].tokens, [0]);
        assert!((routes[0].weights[0] - 1.0 / (1.0 + e)).abs() < 1e-6);
        assert_eq!(routes[1].tokens, [1]);
        assert!((routes[1].weights[0] - e * e / (e * e + 1.0)).abs() < 1e-6);
        assert_eq!(routes[2].tokens, [0, 1]);
    }

    #[test]
    fn the_shared_expert_adds_its_output_scaled_by_the_sigmoid_of_its_gate() {
        let linear = |rows: usize, values: &[f32]| {
            let weight = Tensor::from_slice(values, (rows, values.len() / rows), &Device::Cpu);
            Linear::new(weight.unwrap(), None)
        };
        // Hidden width 2, one hidden unit: gate(x) = x0, up(x) = x1, down(u) = (u, 2u); the
        // gate's logit is x0 - x1.
        let shared = SharedExpert {
            expert: Expert {
                gate: linear(1, &[1.0, 0.0]),
                up: linear(1, &[0.0, 1.0]),
                down: linear(2, &[1.0, 2.0]),
            },
            gate: linear(1, &[1.0, -1.0]),
        };
        let x = Tensor::from_slice(&[0.0f32, 3.0, 2.0, 2.0], (2, 2), &Device::Cpu).unwrap();
        let mut out = vec![1.0f32; 4];
        shared.add_to(&x, Activation::Relu, &mut out).unwrap();
        // Token 0: relu(0) * 3 = 0, nothing added. Token 1: relu(2) * 2 = 4, scaled by
        // sigmoid(0) = 1/2.
        assert_eq!(out, [1.0, 1.0, 3.0, 5.0]);
    }

    #[test]
    fn ties_pick_the_lower_expert_first_like_torch_topk() {
        let mut logits = [0.5, 0.5, 0.5, 0.5];
        let routes = route(&mut logits, 4, 2, false);
        let served: Vec<usize> = routes.iter().map(|r| r.tokens.len()).collect();
        assert_eq!(served, [1, 1, 0, 0]);
        // Without renormalisation the weights are the softmax's own.
        assert_eq!(routes[0].weights, [0.25]);
    }
}
