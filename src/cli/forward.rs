//! `parallelformers forward`: inputs from a safetensors file, outputs to another.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use clap::Args;
use parallelformers::api::{check_forward, parallelize_resolved};
use parallelformers::checkpoint::OutputKind;
use parallelformers::ForwardInput;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use super::ModelArgs;

/// Arguments of `forward`.
#[derive(Debug, Args)]
pub struct ForwardArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Safetensors file with `input_ids` (I64 `[B, L]`), optional `attention_mask`, and for an
    /// encoder–decoder optional `decoder_input_ids` (`[B, L']`).
    #[arg(long)]
    inputs: PathBuf,
    /// Where to write `logits` or `last_hidden_state` (F32).
    #[arg(long)]
    output: PathBuf,
}

/// Reads a 2-D integer tensor as `u32`s, naming the file and tensor in errors.
fn integer_matrix(
    view: &TensorView,
    name: &str,
    path: &Path,
) -> anyhow::Result<(Vec<u32>, usize, usize)> {
    let [rows, cols] = view.shape() else {
        bail!(
            "{}: `{name}` must have shape [batch, length], got {:?}",
            path.display(),
            view.shape()
        );
    };
    let values: Vec<i64> = match view.dtype() {
        Dtype::I64 => view
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect(),
        Dtype::I32 => view
            .data()
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap_or_default()) as i64)
            .collect(),
        other => bail!(
            "{}: `{name}` must be I64 (or I32), got {other:?}",
            path.display()
        ),
    };
    let ids = values
        .into_iter()
        .map(|v| {
            u32::try_from(v).map_err(|_| {
                anyhow!(
                    "{}: `{name}` holds {v}, which is not a token id",
                    path.display()
                )
            })
        })
        .collect::<anyhow::Result<Vec<u32>>>()?;
    Ok((ids, *rows, *cols))
}

/// Reads `input_ids` and the optional `attention_mask` from `path`.
fn read_inputs(path: &Path) -> anyhow::Result<ForwardInput> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read --inputs {}", path.display()))?;
    let tensors = SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow!("{} is not a valid safetensors file: {e}", path.display()))?;
    let ids_view = tensors
        .tensor("input_ids")
        .map_err(|_| anyhow!("{} has no `input_ids` tensor", path.display()))?;
    let (input_ids, batch, seq_len) = integer_matrix(&ids_view, "input_ids", path)?;
    let attention_mask = match tensors.tensor("attention_mask") {
        Ok(view) => {
            let (mask, rows, cols) = integer_matrix(&view, "attention_mask", path)?;
            if (rows, cols) != (batch, seq_len) {
                bail!(
                    "{}: attention_mask has shape [{rows}, {cols}] but input_ids has [{batch}, {seq_len}]",
                    path.display()
                );
            }
            Some(mask)
        }
        Err(_) => None,
    };
    let decoder_input_ids = match tensors.tensor("decoder_input_ids") {
        Ok(view) => {
            let (ids, rows, _) = integer_matrix(&view, "decoder_input_ids", path)?;
            if rows != batch {
                bail!(
                    "{}: decoder_input_ids has {rows} rows but input_ids has {batch}",
                    path.display()
                );
            }
            Some(ids)
        }
        Err(_) => None,
    };
    Ok(ForwardInput {
        input_ids,
        batch,
        seq_len,
        attention_mask,
        decoder_input_ids,
    })
}

/// Runs `forward`. Every argument is checked before any rank starts.
pub fn run(args: ForwardArgs) -> anyhow::Result<()> {
    let input = read_inputs(&args.inputs)?;
    let folder = match args.output.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    if !folder.is_dir() {
        bail!(
            "cannot write --output {}: {} is not a directory",
            args.output.display(),
            folder.display()
        );
    }
    let resolved = args.model.resolve()?;
    check_forward(&resolved, &input)
        .with_context(|| format!("--inputs {}", args.inputs.display()))?;
    let mut model = parallelize_resolved(resolved, args.model.options())?;
    let out = model.forward(&input)?;
    let name = match model.config().output {
        OutputKind::Logits => "logits",
        OutputKind::LastHiddenState => "last_hidden_state",
    };
    model.deparallelize();
    let bytes: Vec<u8> = out.data.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = TensorView::new(Dtype::F32, out.shape.clone(), &bytes)?;
    let map: HashMap<String, TensorView> = HashMap::from([(name.to_string(), view)]);
    safetensors::serialize_to_file(map, None, &args.output)
        .with_context(|| format!("cannot write --output {}", args.output.display()))?;
    Ok(())
}
