//! The experts of a GGUF mixture of experts (`qwen3moe`, and `llama` files with experts:
//! Mixtral) under the names of a Hugging Face checkpoint's per-expert matrices.
//!
//! llama.cpp's converter stacks each layer's experts into one 3-D tensor per projection:
//! `blk.N.ffn_gate_exps.weight`, `ffn_up_exps` and `ffn_down_exps`, of PyTorch shape
//! `[experts, out, in]` (or, written with `--fuse-gate-up-exps`, `ffn_gate_up_exps` holding each
//! expert's gate rows then its up rows). [`GgufFile`] reads such a tensor as the matrix
//! `[experts * out, in]`, in which expert `e`'s projection is the run of whole rows
//! `e * out .. (e + 1) * out`: a rank's slice of one expert (rows of the gate and up
//! projections, columns of the down projection) is a block of rows and columns of that matrix,
//! read from the file, dequantized or kept in its blocks, exactly as from a 2-D tensor. Naming
//! these row runs `model.layers.N.mlp.experts.E.gate_proj.weight` (Mixtral's
//! `block_sparse_moe.experts.E.w1.weight`) lets the model's loader and split rules be those of
//! a safetensors checkpoint, and every rank read only its experts' bytes.
//!
//! Every stacked tensor's shape is checked against the metadata when the file is opened, so a
//! file whose tensors disagree with its `expert_count` or widths is refused by the tensor's name
//! rather than read at the wrong offsets.

use crate::checkpoint::config::{ExpertNames, MoeConfig};
use crate::checkpoint::gguf::GgufFile;
use crate::error::{Error, Result};

/// The stacked projections' GGUF names inside `blk.N.`, in the order of
/// [`ExpertNames::projections`] (gate, up, down).
const STACKED: [&str; 3] = ["ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"];

/// llama.cpp's fused gate and up projections (`--fuse-gate-up-exps`).
const FUSED_GATE_UP: &str = "ffn_gate_up_exps";

/// Where one expert's projection lies in the file: rows `first_row .. first_row + shape[0]`
/// and every column of GGUF tensor `gguf_name`, read as a matrix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ExpertSlice {
    /// The stacked tensor (`blk.3.ffn_up_exps.weight`).
    pub gguf_name: String,
    /// Its first row that belongs to the expert's projection.
    pub first_row: usize,
    /// The projection's shape, `[out, in]`.
    pub shape: [usize; 2],
}

/// The stacked expert tensors of one file, with the sizes the metadata gives them.
#[derive(Debug, Clone)]
pub(crate) struct ExpertTensors {
    names: ExpertNames,
    experts: usize,
    /// Per layer, whether it is sparse (has stacked experts).
    sparse: Vec<bool>,
    /// Per layer, whether its gate and up projections are fused in `ffn_gate_up_exps`.
    fused: Vec<bool>,
    /// The hidden width and one expert's width.
    hidden: usize,
    width: usize,
}

/// The keys the metadata's expert sizes come from, for messages.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SizeKeys<'a> {
    /// The key of the number of experts (`qwen3moe.expert_count`).
    pub experts: &'a str,
    /// The key of one expert's width (`qwen3moe.expert_feed_forward_length`).
    pub width: &'a str,
    /// The key of the hidden width (`qwen3moe.embedding_length`).
    pub hidden: &'a str,
}

impl ExpertTensors {
    /// The stacked experts of `file` for a model of `hidden` width with experts `moe`, after
    /// checking that every sparse layer has them in the shapes the metadata (`keys`) implies.
    pub(crate) fn open(
        file: &GgufFile,
        moe: &MoeConfig,
        hidden: usize,
        keys: SizeKeys,
    ) -> Result<Self> {
        let width = moe.intermediate_size;
        let fused: Vec<bool> = (0..moe.sparse_layers.len())
            .map(|layer| file.tensor(&stacked_name(layer, FUSED_GATE_UP)).is_some())
            .collect();
        let out = ExpertTensors {
            names: moe.names,
            experts: moe.experts,
            sparse: moe.sparse_layers.clone(),
            fused,
            hidden,
            width,
        };
        for layer in (0..out.sparse.len()).filter(|&l| out.sparse[l]) {
            for (stem, rows, cols) in out.stored(layer) {
                let name = stacked_name(layer, stem);
                let expected = vec![out.experts, rows, cols];
                let implied = || {
                    format!(
                        "the metadata ({} {}, {} {}, {} {hidden}) implies {expected:?}",
                        keys.experts, out.experts, keys.width, width, keys.hidden
                    )
                };
                let Some(info) = file.tensor(&name) else {
                    return Err(Error::checkpoint(
                        file.path(),
                        format!(
                            "tensor `{name}` is missing: layer {layer} is a mixture of experts, and {}",
                            implied()
                        ),
                    ));
                };
                if info.shape() != expected {
                    return Err(Error::checkpoint(
                        file.path(),
                        format!(
                            "tensor `{name}` has shape {:?}, but {}",
                            info.shape(),
                            implied()
                        ),
                    ));
                }
            }
        }
        Ok(out)
    }

    /// The stacked tensors of sparse layer `layer`: their stems and the rows and columns of
    /// one expert in each.
    fn stored(&self, layer: usize) -> Vec<(&'static str, usize, usize)> {
        let (h, w) = (self.hidden, self.width);
        match self.fused.get(layer) {
            Some(true) => vec![(FUSED_GATE_UP, 2 * w, h), (STACKED[2], h, w)],
            _ => vec![(STACKED[0], w, h), (STACKED[1], w, h), (STACKED[2], h, w)],
        }
    }

    /// Where Hugging Face tensor `hf_name` (an expert's projection) lies; `None` for any other
    /// name.
    pub(crate) fn locate(&self, hf_name: &str) -> Option<ExpertSlice> {
        let rest = hf_name.strip_prefix("model.layers.")?;
        let (layer, rest) = rest.split_once('.')?;
        let layer: usize = canonical(layer)?;
        let rest = rest.strip_prefix(self.names.experts())?.strip_prefix('.')?;
        let (expert, rest) = rest.split_once('.')?;
        let expert: usize = canonical(expert)?;
        let projection = rest.strip_suffix(".weight")?;
        let part = self
            .names
            .projections()
            .iter()
            .position(|&p| p == projection)?;
        if !self.sparse.get(layer).copied().unwrap_or(false) || expert >= self.experts {
            return None;
        }
        let (h, w) = (self.hidden, self.width);
        let (stem, stride, offset, shape) = match (part, self.fused[layer]) {
            (0 | 1, true) => (FUSED_GATE_UP, 2 * w, part * w, [w, h]),
            (0 | 1, false) => (STACKED[part], w, 0, [w, h]),
            _ => (STACKED[2], h, 0, [h, w]),
        };
        Some(ExpertSlice {
            gguf_name: stacked_name(layer, stem),
            first_row: expert * stride + offset,
            shape,
        })
    }

    /// The Hugging Face names of the expert projections stored in GGUF tensor `gguf_name`;
    /// `None` when it is not a stacked expert tensor of a sparse layer.
    pub(crate) fn hf_names(&self, gguf_name: &str) -> Option<Vec<String>> {
        let rest = gguf_name.strip_prefix("blk.")?;
        let (layer, stem) = rest.split_once('.')?;
        let layer: usize = canonical(layer)?;
        let stem = stem.strip_suffix(".weight")?;
        if !self.sparse.get(layer).copied().unwrap_or(false) {
            return None;
        }
        let [gate, up, down] = self.names.projections();
        let parts: &[&str] = match (stem, self.fused[layer]) {
            (FUSED_GATE_UP, true) => &[gate, up],
            (s, false) if s == STACKED[0] => &[gate],
            (s, false) if s == STACKED[1] => &[up],
            (s, _) if s == STACKED[2] => &[down],
            _ => return None,
        };
        let prefix = self.names.experts();
        Some(
            (0..self.experts)
                .flat_map(|e| {
                    parts
                        .iter()
                        .map(move |p| format!("model.layers.{layer}.{prefix}.{e}.{p}.weight"))
                })
                .collect(),
        )
    }
}

/// `blk.{layer}.{stem}.weight`.
fn stacked_name(layer: usize, stem: &str) -> String {
    format!("blk.{layer}.{stem}.weight")
}

/// A number written canonically (decimal digits, no sign, no leading zero).
fn canonical(s: &str) -> Option<usize> {
    let n: usize = s.parse().ok()?;
    (n.to_string() == s).then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::gguf_test_file::{gguf_file, Tensor, V};

    fn moe(names: ExpertNames, experts: usize, width: usize, layers: usize) -> MoeConfig {
        MoeConfig {
            experts,
            top_k: 2,
            intermediate_size: width,
            renormalize: true,
            sparse_layers: vec![true; layers],
            names,
            shared_expert: None,
        }
    }

    const KEYS: SizeKeys<'static> = SizeKeys {
        experts: "qwen3moe.expert_count",
        width: "qwen3moe.expert_feed_forward_length",
        hidden: "qwen3moe.embedding_length",
    };

    /// A stacked tensor of `experts` matrices `[rows, cols]`, value `100 e + 10 r + c` at
    /// expert `e`, row `r`, column `c`.
    fn stacked(name: &str, experts: usize, rows: usize, cols: usize) -> Tensor {
        let values = (0..experts * rows * cols)
            .map(|i| (100 * (i / (rows * cols)) + 10 * (i / cols % rows) + i % cols) as f32)
            .collect();
        Tensor::new(name, &[experts, rows, cols], values)
    }

    /// Layer 0 of a Qwen3-MoE file: 3 experts 2 wide over a hidden width of 4 (the up
    /// projection with `up_experts` experts).
    fn qwen_layer(up_experts: usize) -> Vec<Tensor> {
        vec![
            stacked("blk.0.ffn_gate_exps.weight", 3, 2, 4),
            stacked("blk.0.ffn_up_exps.weight", up_experts, 2, 4),
            stacked("blk.0.ffn_down_exps.weight", 3, 4, 2),
        ]
    }

    /// A file of `tensors`, opened, and its experts as `names`: `experts` experts 2 wide over a
    /// hidden width of 4 in each of `layers` layers.
    fn open(
        tensors: &[Tensor],
        names: ExpertNames,
        experts: usize,
        layers: usize,
    ) -> (tempfile::NamedTempFile, GgufFile, Result<ExpertTensors>) {
        let (tmp, file) = gguf_file(&[("general.architecture", V::Str("test"))], tensors);
        let opened = ExpertTensors::open(&file, &moe(names, experts, 2, layers), 4, KEYS);
        (tmp, file, opened)
    }

    #[test]
    fn each_expert_is_a_run_of_rows_of_its_stacked_tensor() {
        let (_tmp, file, experts) = open(&qwen_layer(3), ExpertNames::Qwen, 3, 1);
        let experts = experts.unwrap();
        let slice = experts
            .locate("model.layers.0.mlp.experts.2.down_proj.weight")
            .unwrap();
        assert_eq!(slice.gguf_name, "blk.0.ffn_down_exps.weight");
        assert_eq!((slice.first_row, slice.shape), (8, [4, 2]));
        let rows = slice.first_row..slice.first_row + slice.shape[0];
        let values = file.read_f32(&slice.gguf_name, rows, 0..2).unwrap();
        assert_eq!(values, [200., 201., 210., 211., 220., 221., 230., 231.]);
        let names = experts.hf_names("blk.0.ffn_up_exps.weight").unwrap();
        assert_eq!(names.len(), 3);
        assert_eq!(names[1], "model.layers.0.mlp.experts.1.up_proj.weight");
        assert_eq!(
            experts.locate("model.layers.0.mlp.experts.3.up_proj.weight"),
            None
        );
        assert_eq!(
            experts.locate("model.layers.1.mlp.experts.0.up_proj.weight"),
            None
        );
        assert_eq!(experts.locate("model.layers.0.mlp.gate.weight"), None);
    }

    #[test]
    fn fused_gate_and_up_split_into_each_expert_s_gate_then_up_rows() {
        let tensors = [
            stacked("blk.0.ffn_gate_up_exps.weight", 2, 4, 4),
            stacked("blk.0.ffn_down_exps.weight", 2, 4, 2),
        ];
        let (_tmp, _file, experts) = open(&tensors, ExpertNames::Mixtral, 2, 1);
        let experts = experts.unwrap();
        let up = experts
            .locate("model.layers.0.block_sparse_moe.experts.1.w3.weight")
            .unwrap();
        assert_eq!(up.gguf_name, "blk.0.ffn_gate_up_exps.weight");
        assert_eq!((up.first_row, up.shape), (6, [2, 4]));
        let gate = experts
            .locate("model.layers.0.block_sparse_moe.experts.1.w1.weight")
            .unwrap();
        assert_eq!(gate.first_row, 4);
        assert_eq!(
            experts.hf_names("blk.0.ffn_gate_up_exps.weight").unwrap(),
            [
                "model.layers.0.block_sparse_moe.experts.0.w1.weight",
                "model.layers.0.block_sparse_moe.experts.0.w3.weight",
                "model.layers.0.block_sparse_moe.experts.1.w1.weight",
                "model.layers.0.block_sparse_moe.experts.1.w3.weight",
            ]
        );
    }

    #[test]
    fn a_stacked_tensor_whose_shape_disagrees_with_the_metadata_is_refused_by_name() {
        let err = open(&qwen_layer(2), ExpertNames::Qwen, 3, 1)
            .2
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("blk.0.ffn_up_exps.weight")
                && err.contains("has shape [2, 2, 4]")
                && err.contains("implies [3, 2, 4]")
                && err.contains("qwen3moe.expert_count 3"),
            "{err}"
        );
        // A second sparse layer without its experts.
        let err = open(&qwen_layer(3), ExpertNames::Qwen, 3, 2)
            .2
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("blk.1.ffn_gate_exps.weight") && err.contains("missing"),
            "{err}"
        );
    }
}
