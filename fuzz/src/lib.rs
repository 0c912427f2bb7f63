//! The harness of the fuzz targets, shared with `tests/fuzz_regressions.rs` (which includes this
//! file as a module), so that the regression corpus replays through exactly the code the fuzzers
//! ran.
//!
//! Every entry point feeds untrusted bytes to one parser through its public API, walks whatever
//! the parser accepted, and returns `Ok(())` when the input was accepted or `Err(message)` when
//! the parser refused it with an error. A panic, or an invariant violated by an accepted input
//! (`assert!` here), is a bug.
//!
//! Files are written to a per-thread temporary directory (under `$TMPDIR`; point it at a tmpfs
//! such as `/dev/shm` for speed), rewritten on every call.

use std::cell::RefCell;
use std::io::{ErrorKind, Read};
use std::path::{Path, PathBuf};

use parallelformers::checkpoint::config::ModelConfig;
use parallelformers::checkpoint::gguf::{hf_tensor_name, GgufFile};
use parallelformers::checkpoint::gguf_model::config_from_gguf;
use parallelformers::checkpoint::safetensors::SafetensorsCheckpoint;
use parallelformers::checkpoint::source::WeightsLocation;
use parallelformers::checkpoint::WeightSource;
use parallelformers::parallel::engine::plan_slice;
use parallelformers::parallel::ipc::{
    decode, read_frame, write_frame, FrameReader, LoadSpec, Reply, Request,
};
use parallelformers::parallel::Plan;
use parallelformers::policy::file::PolicyFile;
use parallelformers::policy::Policy;
use parallelformers::WeightDType;

/// Names of the targets, as `cargo fuzz` and `tests/fixtures/fuzz/` know them.
pub const TARGETS: [&str; 6] = [
    "safetensors_header",
    "safetensors_index",
    "gguf_reader",
    "ipc_frames",
    "config_json",
    "policy_file",
];

/// Runs the target called `name` on `data`; `None` for an unknown name.
pub fn run_target(name: &str, data: &[u8]) -> Option<Result<(), String>> {
    Some(match name {
        "safetensors_header" => safetensors_header(data),
        "safetensors_index" => safetensors_index(data),
        "gguf_reader" => gguf_reader(data),
        "ipc_frames" => ipc_frames(data),
        "config_json" => config_json(data),
        "policy_file" => policy_file(data),
        _ => return None,
    })
}

thread_local! {
    static SCRATCH: RefCell<Option<tempfile::TempDir>> = const { RefCell::new(None) };
}

/// A directory of this thread for `target`, emptied of the files of the previous call.
fn scratch(target: &str) -> PathBuf {
    let root = SCRATCH.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(
                tempfile::Builder::new()
                    .prefix("pf-fuzz-")
                    .tempdir()
                    .expect("cannot create a temporary directory"),
            );
        }
        slot.as_ref()
            .map(|d| d.path().to_path_buf())
            .unwrap_or_default()
    });
    let dir = root.join(target);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).expect("cannot empty the scratch directory");
    }
    std::fs::create_dir_all(&dir).expect("cannot create the scratch directory");
    dir
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).expect("cannot write a scratch file");
}

// ---------------------------------------------------------------------------------------------
// Safetensors
// ---------------------------------------------------------------------------------------------

/// `model.safetensors` = `data`: [`SafetensorsCheckpoint::open`], then every tensor read whole,
/// as blocks, and as a candle tensor.
pub fn safetensors_header(data: &[u8]) -> Result<(), String> {
    let dir = scratch("safetensors_header");
    write(&dir.join("model.safetensors"), data);
    let ckpt = SafetensorsCheckpoint::open(&dir).map_err(|e| e.to_string())?;
    // An accepted file's tensors lie in its data section without overlapping, so their sizes
    // add up to at most that section.
    let header_len = u64::from_le_bytes(data[..8].try_into().expect("8 bytes were checked"));
    let data_len = data.len() as u64 - 8 - header_len;
    let total = walk_checkpoint(&ckpt);
    assert!(
        total <= data_len,
        "tensors of {total} bytes in a data section of {data_len}: they overlap"
    );
    Ok(())
}

/// A valid one-tensor shard, for the shards `safetensors_index` does not take from its input.
fn small_shard(name: &str) -> Vec<u8> {
    let header = format!(
        r#"{{"{name}":{{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}},"__metadata__":{{"format":"pt"}}}}"#
    );
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend((0..6u8).flat_map(|i| f32::from(i).to_le_bytes()));
    bytes
}

/// A sharded checkpoint: `data` up to its first NUL byte is `model.safetensors.index.json`, the
/// rest (if there is a NUL) `model-00001-of-00003.safetensors`; shards 2 and 3 are small valid
/// files. [`SafetensorsCheckpoint::open`], then every tensor read as in `safetensors_header`.
pub fn safetensors_index(data: &[u8]) -> Result<(), String> {
    let dir = scratch("safetensors_index");
    let (index, shard) = match data.iter().position(|&b| b == 0) {
        Some(nul) => (&data[..nul], Some(&data[nul + 1..])),
        None => (data, None),
    };
    write(&dir.join("model.safetensors.index.json"), index);
    match shard {
        Some(bytes) => write(&dir.join("model-00001-of-00003.safetensors"), bytes),
        None => write(
            &dir.join("model-00001-of-00003.safetensors"),
            &small_shard("model.embed_tokens.weight"),
        ),
    }
    write(
        &dir.join("model-00002-of-00003.safetensors"),
        &small_shard("model.layers.0.mlp.up_proj.weight"),
    );
    write(
        &dir.join("model-00003-of-00003.safetensors"),
        &small_shard("model.norm.weight"),
    );
    let ckpt = SafetensorsCheckpoint::open(&dir).map_err(|e| e.to_string())?;
    walk_checkpoint(&ckpt);
    Ok(())
}

/// Reads every tensor of an accepted checkpoint every way the crate does; returns the sum of
/// their sizes in bytes.
fn walk_checkpoint(ckpt: &SafetensorsCheckpoint) -> u64 {
    let mut total = 0u64;
    let names: Vec<String> = ckpt.tensors().map(|(n, _)| n.to_string()).collect();
    for name in &names {
        let info = ckpt.info(name).expect("listed tensor").clone();
        let elem = info.element_bytes();
        let numel = info
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .expect("an accepted shape has a countable number of elements");
        let bytes = numel
            .checked_mul(elem)
            .expect("an accepted tensor's size fits in usize");
        total += bytes as u64;
        // The data was checked to lie inside the file: reading it must succeed.
        let all = ckpt
            .read_all(name)
            .unwrap_or_else(|e| panic!("accepted tensor `{name}` cannot be read: {e}"));
        assert_eq!(all.len(), bytes, "`{name}`: read_all length");
        let (rows, cols) = match info.shape.as_slice() {
            [c] => (1, *c),
            [r, c] => (*r, *c),
            _ => {
                assert!(ckpt.read_block(name, 0..1, 0..1).is_err());
                let _ = ckpt.read(name, None);
                continue;
            }
        };
        let whole = ckpt
            .read_block(name, 0..rows, 0..cols)
            .unwrap_or_else(|e| panic!("accepted tensor `{name}`: whole block: {e}"));
        assert_eq!(
            whole, all,
            "`{name}`: the whole block differs from read_all"
        );
        let (r, c) = (rows / 2..rows, cols / 3..cols - cols / 3);
        let part = ckpt
            .read_block(name, r.clone(), c.clone())
            .unwrap_or_else(|e| panic!("accepted tensor `{name}`: block {r:?} {c:?}: {e}"));
        assert_eq!(part.len(), r.len() * c.len() * elem);
        if let (Some(r1), Some(c1)) = (rows.checked_add(1), cols.checked_add(1)) {
            assert!(ckpt.read_block(name, 0..r1, 0..cols).is_err());
            assert!(ckpt.read_block(name, 0..rows, 0..c1).is_err());
        }
        // Through the WeightSource interface the engine uses (candle tensors; integer dtypes
        // are refused with an error).
        let _ = ckpt.shape(name);
        let _ = ckpt.read(name, None);
        let _ = ckpt.read(name, Some((r, c)));
    }
    let _ = ckpt.names();
    total
}

// ---------------------------------------------------------------------------------------------
// GGUF
// ---------------------------------------------------------------------------------------------

/// `model.gguf` = `data`: [`GgufFile::open`], every metadata accessor on every key, every
/// tensor dequantized whole and in part and read as raw blocks, and the model configuration.
pub fn gguf_reader(data: &[u8]) -> Result<(), String> {
    let dir = scratch("gguf_reader");
    let path = dir.join("model.gguf");
    write(&path, data);
    let file = GgufFile::open(&path).map_err(|e| e.to_string())?;
    assert!(matches!(file.version(), 2 | 3));
    assert!(file.alignment().is_power_of_two());
    let _ = file.architecture();
    let _ = format!("{file:?}");
    for (key, value) in file.metadata() {
        let _ = (
            value.as_u64(),
            value.as_i64(),
            value.as_f64(),
            value.as_bool(),
        );
        let _ = (
            value.as_str(),
            value.as_array().map(<[_]>::len),
            value.type_name(),
        );
        let _ = (
            file.opt_u64_key(key),
            file.opt_f64_key(key),
            file.opt_str_key(key),
        );
        let _ = (file.opt_bool_key(key), file.opt_array_key(key));
        let _ = file.u64_key(key).map_err(|e| e.to_string());
    }
    let len = data.len() as u64;
    let mut total = 0u64;
    for t in file.tensors() {
        let range = t.byte_range();
        assert!(
            range.start <= range.end && range.end <= len,
            "`{}`: {range:?}",
            t.name
        );
        total += range.end - range.start;
        let _ = (t.shape(), hf_tensor_name(&t.name));
        let (rows, cols) = (t.rows(), t.cols());
        assert_eq!(t.n_elements(), rows * cols);
        // Even an empty tensor's other dimensions must be addressable.
        assert!(
            rows.max(1)
                .checked_mul(cols.max(1))
                .is_some_and(|extent| extent <= i64::MAX as usize),
            "`{}`: accepted dimensions {:?}",
            t.name,
            t.dims
        );
        match file.read_tensor_f32(&t.name) {
            Ok(values) => assert_eq!(values.len(), t.n_elements(), "`{}`", t.name),
            Err(e) => assert!(
                !t.ggml_type.is_supported(),
                "tensor `{}` of supported type {} cannot be read: {e}",
                t.name,
                t.ggml_type
            ),
        }
        let (r, c) = (rows / 2..rows, cols / 3..cols - cols / 3);
        if let Ok(values) = file.read_f32(&t.name, r.clone(), c.clone()) {
            assert_eq!(values.len(), r.len() * c.len());
        }
        let _ = file.read_blocks(&t.name, 0..rows, 0..cols);
        let _ = file.read_blocks(&t.name, r, c);
        if let Some(r1) = rows.checked_add(1) {
            assert!(file.read_f32(&t.name, 0..r1, 0..cols).is_err());
        }
    }
    assert!(total <= len, "tensors of {total} bytes in a file of {len}");
    let _ = config_from_gguf(&file).map_err(|e| e.to_string());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// IPC frames
// ---------------------------------------------------------------------------------------------

/// A stream handing out at most `step` bytes per read, timing out every other read.
struct Trickle<'a> {
    data: &'a [u8],
    step: usize,
    stall: bool,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.stall = !self.stall;
        if self.stall {
            return Err(ErrorKind::WouldBlock.into());
        }
        let n = self.step.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// The first byte picks how the rest trickles in (bytes per read); the rest is a stream of
/// frames, collected with [`FrameReader`] and decoded as both a [`Request`] and a [`Reply`].
/// A decoded message must survive `write_frame` / `read_frame` unchanged. The whole rest is
/// also decoded as one payload of each type.
pub fn ipc_frames(data: &[u8]) -> Result<(), String> {
    let Some((&mode, rest)) = data.split_first() else {
        return Err("empty input".into());
    };
    round_trip(rest);
    let mut stream = Trickle {
        data: rest,
        step: if mode == 0 {
            usize::MAX
        } else {
            usize::from(mode)
        },
        stall: mode % 2 == 1,
    };
    let mut reader = FrameReader::default();
    loop {
        match reader.poll(&mut stream) {
            Ok(Some(payload)) => round_trip(&payload),
            Ok(None) => {}
            Err(e) => {
                // The end of the input ends every stream; anything else is a refused frame.
                return match e.kind() {
                    ErrorKind::UnexpectedEof => Ok(()),
                    _ => Err(e.to_string()),
                };
            }
        }
    }
}

/// Decodes `payload` as each message type; what decodes is written and read back.
fn round_trip(payload: &[u8]) {
    if let Ok(request) = decode::<Request>(payload) {
        let mut wire = Vec::new();
        write_frame(&mut wire, &request).expect("a decoded request encodes");
        let again: Request = read_frame(&mut wire.as_slice()).expect("an encoded request decodes");
        assert_eq!(format!("{request:?}"), format!("{again:?}"));
    }
    if let Ok(reply) = decode::<Reply>(payload) {
        let _ = reply.is_partial();
        let mut wire = Vec::new();
        write_frame(&mut wire, &reply).expect("a decoded reply encodes");
        let again: Reply = read_frame(&mut wire.as_slice()).expect("an encoded reply decodes");
        assert_eq!(format!("{reply:?}"), format!("{again:?}"));
    }
}

// ---------------------------------------------------------------------------------------------
// config.json
// ---------------------------------------------------------------------------------------------

/// `config.json` = `data`: [`ModelConfig::from_file`]; an accepted configuration must be
/// self-consistent, its weight shapes addressable, and it must cross the IPC wire unchanged
/// (inside the `Load` request every rank receives).
pub fn config_json(data: &[u8]) -> Result<(), String> {
    let dir = scratch("config_json");
    let path = dir.join("config.json");
    write(&path, data);
    let config = ModelConfig::from_file(&path).map_err(|e| e.to_string())?;
    let c = &config;
    assert!(c.vocab_size > 0 && c.hidden_size > 0 && c.num_layers > 0);
    assert!(c.num_heads > 0 && c.num_kv_heads > 0 && c.head_dim > 0);
    assert!(c.intermediate_size > 0);
    assert_eq!(c.num_heads % c.num_kv_heads, 0);
    // The model code multiplies these; an accepted config must not overflow them.
    for (a, b) in [
        (c.num_heads, c.head_dim),
        (c.num_kv_heads, c.head_dim),
        (c.vocab_size, c.hidden_size),
        (c.intermediate_size, c.hidden_size),
        (c.max_positions, c.hidden_size),
    ] {
        let elements = a.checked_mul(b);
        assert!(
            elements.and_then(|n| n.checked_mul(8)).is_some(),
            "accepted config with a {a} x {b} matrix: {c:?}"
        );
    }
    let _ = c.is_causal();
    let mut wire = Vec::new();
    let load = Request::Load(LoadSpec {
        location: WeightsLocation::Safetensors(dir.clone()),
        config: config.clone(),
        dtype: WeightDType::F32,
        policy: None,
        prefill: Default::default(),
    });
    write_frame(&mut wire, &load).expect("a config encodes");
    match read_frame::<Request>(&mut wire.as_slice()).expect("an encoded config decodes") {
        Request::Load(spec) => assert_eq!(spec.config, config),
        other => panic!("a Load request came back as {other:?}"),
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Policy files
// ---------------------------------------------------------------------------------------------

/// The llama fixture's configuration (`tests/fixtures/llama/config.json`, the fields that
/// matter), which a policy's `[config]` respells before the policy reads it back.
const LLAMA_CONFIG: &str = r#"{"model_type": "llama", "hidden_size": 64, "head_dim": 8,
    "intermediate_size": 100, "max_position_embeddings": 128, "num_attention_heads": 8,
    "num_hidden_layers": 2, "num_key_value_heads": 4, "rms_norm_eps": 1e-05,
    "tie_word_embeddings": false, "vocab_size": 103, "eos_token_id": 67}"#;

/// The checkpoint's tensors when the input names none: the llama fixture renamed as in
/// `tests/policy_file.rs`, with its shapes.
const DEFAULT_TENSORS: &str = "backbone.tok_embeddings.weight 103x64
head.weight 103x64
backbone.blocks.0.attn.wq.weight 64x64
backbone.blocks.0.attn.wk.weight 32x64
backbone.blocks.0.attn.wv.weight 32x64
backbone.blocks.0.attn.wo.weight 64x64
backbone.blocks.0.ffn.w_gate.weight 100x64
backbone.blocks.0.ffn.w_up.weight 100x64
backbone.blocks.0.ffn.w_down.weight 64x100
backbone.blocks.0.norm1.weight 64
backbone.blocks.0.norm2.weight 64
backbone.final_norm.weight 64";

/// The wiring's tensor names a llama model asks the policy to spell.
const LLAMA_WIRING_NAMES: [&str; 6] = [
    "embed_tokens.weight",
    "lm_head.weight",
    "layers.0.self_attn.q_proj.weight",
    "layers.1.mlp.down_proj.weight",
    "layers.0.input_layernorm.weight",
    "norm.weight",
];

/// A policy file, then (after a NUL byte, if any) the checkpoint's tensors, one per line as
/// `name` or `name 64x100`: [`PolicyFile::parse`] as TOML and as JSON. An accepted policy gives
/// every entry a role; it reads a `config.json` spelled its way back into the wiring's
/// spelling; its rules decide every tensor's role consistently with `check_coverage`; each
/// role plans slices at 1 to 4 ranks that stay within the tensor and together cover it; and
/// the policy crosses the IPC wire unchanged.
pub fn policy_file(data: &[u8]) -> Result<(), String> {
    let (text, tensors) = match data.iter().position(|&b| b == 0) {
        Some(nul) => (&data[..nul], String::from_utf8_lossy(&data[nul + 1..])),
        None => (data, DEFAULT_TENSORS.into()),
    };
    let text = std::str::from_utf8(text).map_err(|e| format!("not UTF-8: {e}"))?;
    let tensors: Vec<(&str, Vec<usize>)> = tensors.lines().map(tensor_line).collect();
    let as_toml = PolicyFile::parse(text, false);
    let as_json = PolicyFile::parse(text, true);
    let mut accepted = false;
    for file in [&as_toml, &as_json].into_iter().flatten() {
        walk_policy(file, &tensors);
        accepted = true;
    }
    match accepted {
        true => Ok(()),
        false => Err(format!(
            "as TOML: {:?}; as JSON: {:?}",
            as_toml.err(),
            as_json.err()
        )),
    }
}

/// `name` or `name 64x100`; dimensions that do not parse make a 1-D tensor of 0 elements.
fn tensor_line(line: &str) -> (&str, Vec<usize>) {
    match line.rsplit_once(' ') {
        Some((name, dims)) => {
            let shape: Option<Vec<usize>> = dims.split('x').map(|d| d.parse().ok()).collect();
            (name, shape.unwrap_or_else(|| vec![0]))
        }
        None => (line, vec![64]),
    }
}

fn walk_policy(file: &PolicyFile, tensors: &[(&str, Vec<usize>)]) {
    let policy = file.policy();
    assert_eq!(
        policy.rules.len(),
        file.tensors.len(),
        "an accepted entry has no role: {file:?}"
    );
    for name in LLAMA_WIRING_NAMES {
        let _ = policy.checkpoint_name(name);
    }
    let names: Vec<&str> = tensors.iter().map(|(name, _)| *name).collect();
    if file.check_coverage(&names).is_ok() {
        for name in &names {
            assert!(
                policy.role_of(name).is_some(),
                "coverage passed but `{name}` has no role"
            );
        }
    }
    if let Some(config) = respelled_config(file) {
        plan_every_slice(&policy, &config, tensors);
    }
    let load = Request::Load(LoadSpec {
        location: WeightsLocation::Safetensors(PathBuf::from("/nonexistent")),
        config: llama_config().clone(),
        dtype: WeightDType::F32,
        policy: Some(policy.clone()),
        prefill: Default::default(),
    });
    let mut wire = Vec::new();
    write_frame(&mut wire, &load).expect("a policy encodes");
    match read_frame::<Request>(&mut wire.as_slice()).expect("an encoded policy decodes") {
        Request::Load(spec) => assert_eq!(spec.policy, Some(policy)),
        other => panic!("a Load request came back as {other:?}"),
    }
}

/// The llama fixture's configuration, resolved once.
fn llama_config() -> &'static ModelConfig {
    static CONFIG: std::sync::OnceLock<ModelConfig> = std::sync::OnceLock::new();
    CONFIG.get_or_init(|| {
        ModelConfig::from_file(&scratch_config(LLAMA_CONFIG))
            .expect("the llama fixture's configuration resolves")
    })
}

fn scratch_config(text: &str) -> PathBuf {
    let path = scratch("policy_file").join("config.json");
    write(&path, text.as_bytes());
    path
}

/// The llama configuration spelled as `file` says the checkpoint spells it, read back through
/// `file`; `None` when the wiring's configuration does not resolve from it (another wiring, or
/// fields mapped onto each other).
fn respelled_config(file: &PolicyFile) -> Option<ModelConfig> {
    let mut fields: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(LLAMA_CONFIG).expect("the llama configuration is JSON");
    for (wiring_field, their_field) in &file.config {
        if let Some(value) = fields.remove(wiring_field) {
            fields.insert(their_field.clone(), value);
        }
    }
    fields.insert("model_type".into(), file.model_type.clone().into());
    let theirs = serde_json::Value::Object(fields).to_string();
    let ours = file
        .rewrite_config(&theirs)
        .expect("a configuration of the policy's model_type is read");
    let value: serde_json::Value =
        serde_json::from_str(&ours).expect("the rewritten configuration is JSON");
    assert_eq!(value["model_type"], file.wiring.as_str());
    ModelConfig::from_file(&scratch_config(&ours)).ok()
}

/// Every rank's slice of every tensor with a role, at every world size the configuration
/// allows up to 4: within the stored tensor, and all ranks together hold all of it.
fn plan_every_slice(policy: &Policy, config: &ModelConfig, tensors: &[(&str, Vec<usize>)]) {
    for world in 1..=4 {
        let Ok(plan) = Plan::new(config, world) else {
            continue;
        };
        for (name, shape) in tensors {
            let Some(role) = policy.role_of(name) else {
                continue;
            };
            let slices: Result<Vec<_>, _> = (0..world)
                .map(|rank| plan_slice(name, role, shape, &plan, rank))
                .collect();
            let Ok(slices) = slices else {
                continue;
            };
            let stored: u128 = shape.iter().map(|&d| d as u128).product();
            let mut held = 0u128;
            for slice in &slices {
                let elements: u128 = slice.shape.iter().map(|&d| d as u128).product();
                assert!(
                    elements <= stored,
                    "`{name}` {shape:?} as {role}: a slice {:?} larger than the tensor",
                    slice.shape
                );
                held += elements;
            }
            assert!(
                held >= stored,
                "`{name}` {shape:?} as {role} at {world} ranks: slices hold {held} of {stored}"
            );
        }
    }
}
