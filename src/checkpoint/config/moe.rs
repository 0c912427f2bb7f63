//! The mixture-of-experts switches of the Llama-style decoders (Mixtral, Qwen2-MoE, Qwen3-MoE,
//! OLMoE): how many experts, how many each token reads, their width, whether the router's top-k
//! weights are renormalised, which layers are sparse, Qwen2-MoE's shared expert, and how the
//! checkpoint names the experts' tensors. Read from `config.json` as transformers' config
//! classes read it.

use super::RawConfig;

/// How a family names its sparse MLP's tensors under `layers.N.`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ExpertNames {
    /// Mixtral: `block_sparse_moe.gate` routes, `block_sparse_moe.experts.E.{w1,w3,w2}` are
    /// each expert's gate, up and down projections.
    Mixtral,
    /// Qwen2-MoE, Qwen3-MoE, OLMoE: `mlp.gate` routes,
    /// `mlp.experts.E.{gate_proj,up_proj,down_proj}`.
    Qwen,
}

impl ExpertNames {
    /// The router's weight name under `layers.N.`, without `.weight`.
    pub fn router(self) -> &'static str {
        match self {
            ExpertNames::Mixtral => "block_sparse_moe.gate",
            ExpertNames::Qwen => "mlp.gate",
        }
    }

    /// The prefix of every expert's tensors under `layers.N.` (`experts.E` follows).
    pub fn experts(self) -> &'static str {
        match self {
            ExpertNames::Mixtral => "block_sparse_moe.experts",
            ExpertNames::Qwen => "mlp.experts",
        }
    }

    /// An expert's gate, up and down projections' names, without `.weight`.
    pub fn projections(self) -> [&'static str; 3] {
        match self {
            ExpertNames::Mixtral => ["w1", "w3", "w2"],
            ExpertNames::Qwen => ["gate_proj", "up_proj", "down_proj"],
        }
    }
}

/// The resolved mixture-of-experts switches of a decoder.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MoeConfig {
    /// Experts per sparse layer (`num_local_experts`, Qwen's `num_experts`).
    pub experts: usize,
    /// Experts each token is routed to (`num_experts_per_tok`).
    pub top_k: usize,
    /// Hidden width of one expert (Qwen's `moe_intermediate_size`, Mixtral's and OLMoE's
    /// `intermediate_size`).
    pub intermediate_size: usize,
    /// The top-k routing weights are divided by their sum (Mixtral always; Qwen2-MoE,
    /// Qwen3-MoE and OLMoE with `norm_topk_prob`).
    pub renormalize: bool,
    /// Per layer, whether its MLP is the sparse one (Qwen's `mlp_only_layers` and
    /// `decoder_sparse_step` make some dense).
    pub sparse_layers: Vec<bool>,
    /// Hidden width of the shared expert every token goes through besides its routed ones,
    /// scaled per token by `sigmoid(shared_expert_gate(x))` (Qwen2-MoE's
    /// `shared_expert_intermediate_size`); `None` without one.
    pub shared_expert: Option<usize>,
    /// How the checkpoint names the experts.
    pub names: ExpertNames,
}

impl RawConfig {
    /// The mixture-of-experts switches of `model_type`, `None` for dense families;
    /// `intermediate_size` is the dense MLP's width, resolved already.
    pub(super) fn moe_config(
        &self,
        model_type: &str,
        intermediate_size: usize,
        layers: usize,
    ) -> Result<Option<MoeConfig>, String> {
        // The defaults of transformers' config classes.
        let (names, experts, top_k, width, renormalize) = match model_type {
            "mixtral" => (
                ExpertNames::Mixtral,
                self.num_local_experts.unwrap_or(8),
                self.num_experts_per_tok.unwrap_or(2),
                intermediate_size,
                true,
            ),
            "qwen2_moe" | "qwen3_moe" => {
                let (experts, top_k, width) = match model_type {
                    "qwen2_moe" => (60, 4, 1408),
                    _ => (128, 8, 768),
                };
                (
                    ExpertNames::Qwen,
                    self.num_local_experts.unwrap_or(experts),
                    self.num_experts_per_tok.unwrap_or(top_k),
                    self.moe_intermediate_size.unwrap_or(width),
                    self.norm_topk_prob.unwrap_or(false),
                )
            }
            "olmoe" => (
                ExpertNames::Qwen,
                self.num_local_experts.unwrap_or(64),
                self.num_experts_per_tok.unwrap_or(8),
                intermediate_size,
                self.norm_topk_prob.unwrap_or(false),
            ),
            _ => return Ok(None),
        };
        // Only the Qwen families have dense layers (and are dense without experts).
        let qwen = matches!(model_type, "qwen2_moe" | "qwen3_moe");
        if experts == 0 {
            let field = match model_type {
                "mixtral" => "num_local_experts",
                _ => "num_experts",
            };
            return match qwen {
                true => Ok(None),
                false => Err(format!("the field `{field}` must be positive, got 0")),
            };
        }
        let shared_expert = match model_type {
            "qwen2_moe" => Some(self.shared_expert_intermediate_size.unwrap_or(5632)),
            _ => None,
        };
        let step = self.decoder_sparse_step.unwrap_or(1);
        for (field, value) in [
            ("num_experts_per_tok", top_k),
            (
                match qwen {
                    true => "moe_intermediate_size",
                    false => "intermediate_size",
                },
                width,
            ),
            ("decoder_sparse_step", step),
            (
                "shared_expert_intermediate_size",
                shared_expert.unwrap_or(1),
            ),
        ] {
            if value == 0 {
                return Err(format!("the field `{field}` must be positive, got 0"));
            }
        }
        if top_k > experts {
            return Err(format!(
                "num_experts_per_tok ({top_k}) is more than the model's experts ({experts})"
            ));
        }
        let dense = self.mlp_only_layers.clone().unwrap_or_default();
        // transformers' Qwen2MoeDecoderLayer / Qwen3MoeDecoderLayer: sparse unless listed in
        // `mlp_only_layers`, when the layer's number (from 1) is a multiple of the step;
        // Mixtral's and OLMoE's are all sparse.
        let sparse_layers = (0..layers)
            .map(|i| !qwen || (!dense.contains(&i) && (i + 1) % step == 0))
            .collect();
        Ok(Some(MoeConfig {
            experts,
            top_k,
            intermediate_size: width,
            renormalize,
            sparse_layers,
            shared_expert,
            names,
        }))
    }
}
