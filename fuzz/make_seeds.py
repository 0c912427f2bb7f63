#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets into fuzz/corpus/<target>/ from tests/fixtures/.

    python3 fuzz/make_seeds.py                       # safetensors_*, config_json, policy_file
    /root/.cache/pf-venv/bin/python fuzz/make_seeds.py  # also gguf_reader (needs gguf-py)

The ipc_frames seeds are encoded by the crate itself (`write_frame`):

    cargo test --test fuzz_regressions -- --ignored write_ipc_seeds

Seeds are small (a few kB): large fixtures are cut down to valid files with a few tensors of a
few rows each, plus one truncated copy of the real header.
"""

import json
import re
import struct
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
CORPUS = ROOT / "fuzz" / "corpus"

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U8": 1, "BOOL": 1, "F8_E4M3": 1, "U64": 8}


def out(target: str, name: str, data: bytes) -> None:
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


def read_safetensors(path: Path):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    return raw, n, header


def safetensors_bytes(tensors, metadata=None) -> bytes:
    """tensors: list of (name, dtype, shape, data bytes)."""
    header, data = {}, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape, blob in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [len(data), len(data) + len(blob)]}
        data += blob
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)  # safetensors pads headers to 8 bytes
    return struct.pack("<Q", len(h)) + h + data


def shrink(path: Path, max_tensors=6, max_bytes=512) -> bytes:
    """A valid file with a few tensors of `path`, each cut to its first rows."""
    raw, n, header = read_safetensors(path)
    base = 8 + n
    picked = []
    for name, e in header.items():
        if name == "__metadata__":
            continue
        shape, dtype = e["shape"], e["dtype"]
        start, end = e["data_offsets"]
        row = DTYPE_BYTES[dtype] * int(np.prod(shape[1:], dtype=np.int64)) if shape else 1
        rows = max(1, min(shape[0] if shape else 1, max_bytes // max(row, 1)))
        if row * rows > 4 * max_bytes:
            continue
        new_shape = [rows] + shape[1:] if shape else []
        blob = raw[base + start: base + start + row * rows]
        picked.append((name, dtype, new_shape, blob))
        if len(picked) == max_tensors:
            break
    return safetensors_bytes(picked, header.get("__metadata__"))


def synthetic_safetensors() -> dict:
    rng = np.random.default_rng(0)
    f = lambda n: rng.standard_normal(n).astype(np.float32)  # noqa: E731
    seeds = {
        "dtypes": safetensors_bytes([
            ("f32", "F32", [2, 3], f(6).tobytes()),
            ("f16", "F16", [4], f(4).astype(np.float16).tobytes()),
            ("bf16", "BF16", [2, 2], (f(4).view(np.uint32) >> 16).astype(np.uint16).tobytes()),
            ("f64", "F64", [3], f(3).astype(np.float64).tobytes()),
            ("i64", "I64", [2, 2], np.arange(4, dtype=np.int64).tobytes()),
            ("i32", "I32", [1, 3], np.arange(3, dtype=np.int32).tobytes()),
            ("u8", "U8", [5], bytes(range(5))),
            ("bool", "BOOL", [2], b"\x00\x01"),
        ], {"format": "pt"}),
        "ranks": safetensors_bytes([
            ("scalar", "F32", [], f(1).tobytes()),
            ("empty", "F32", [0, 4], b""),
            ("cube", "F32", [2, 2, 2], f(8).tobytes()),
            ("row", "F32", [1, 8], f(8).tobytes()),
        ]),
        "unsupported_dtype": safetensors_bytes([("q", "F8_E4M3", [4], b"\x01\x02\x03\x04")]),
        "empty_header": safetensors_bytes([]),
        "metadata_only": safetensors_bytes([], {"format": "pt", "note": "x"}),
    }
    return seeds


def safetensors_seeds() -> None:
    files = sorted(FIXTURES.glob("*/model*.safetensors")) + sorted(
        FIXTURES.glob("*/reference.safetensors"))
    for path in files:
        tag = f"{path.parent.name}_{path.stem}"
        out("safetensors_header", f"{tag}_small", shrink(path))
    # Real headers with a little data: refused as truncated, but full-size real JSON.
    for path in (FIXTURES / "gpt2" / "model.safetensors",
                 FIXTURES / "llama" / "model-00001-of-00003.safetensors"):
        raw, n, _ = read_safetensors(path)
        out("safetensors_header", f"{path.parent.name}_{path.stem}_truncated", raw[:8 + n + 64])
    for name, data in synthetic_safetensors().items():
        out("safetensors_header", name, data)

    index = (FIXTURES / "llama" / "model.safetensors.index.json").read_bytes()
    out("safetensors_index", "llama_index", index)
    shard1 = shrink(FIXTURES / "llama" / "model-00001-of-00003.safetensors")
    out("safetensors_index", "llama_index_with_shard", index + b"\x00" + shard1)
    single = json.dumps({"metadata": {}, "weight_map": {
        "model.norm.weight": "model-00003-of-00003.safetensors"}}).encode()
    out("safetensors_index", "one_shard", single)
    out("safetensors_index", "one_shard_with_shard", single + b"\x00" + synthetic_safetensors()["dtypes"])


def config_seeds() -> None:
    for path in sorted(FIXTURES.glob("*/config.json")):
        out("config_json", path.parent.name, path.read_bytes())
    out("config_json", "llama_4x", json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 100,
        "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 8,
        "num_key_value_heads": 4, "intermediate_size": 96, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "rope_scaling": None, "eos_token_id": [1, 2]}).encode())
    out("config_json", "gpt2_short", json.dumps({
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 50,
        "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 16, "eos_token_id": 7}).encode())
    out("config_json", "qwen2_window", json.dumps({
        "model_type": "qwen2", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 16, "use_sliding_window": True,
        "sliding_window": 4, "rope_scaling": {"type": "default"}, "head_dim": 4}).encode())


def gguf_seeds() -> None:
    try:
        import gguf  # noqa: PLC0415
    except ImportError:
        print("gguf-py not installed: gguf_reader seeds skipped", file=sys.stderr)
        return
    T = gguf.GGMLQuantizationType
    rng = np.random.default_rng(1)
    d = CORPUS / "gguf_reader"
    d.mkdir(parents=True, exist_ok=True)

    # One row of every supported type (256 columns: one K-quant super-block).
    path = d / "quant_small"
    w = gguf.GGUFWriter(str(path), arch="quanttest")
    w.add_custom_alignment(64)
    w.add_uint8("t.u8", 200)
    w.add_int16("t.i16", -3)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_float64("t.f64", 0.1)
    w.add_bool("t.bool", True)
    w.add_string("t.string", "h\u00e9llo")
    w.add_array("t.array_nested", [[1, 2], [3]])
    w.add_array("t.array_str", ["a", ""])
    x = rng.standard_normal((1, 256)).astype(np.float32)
    w.add_tensor("f32", x)
    w.add_tensor("f16", x.astype(np.float16))
    w.add_tensor("bf16", gguf.quants.quantize(x, T.BF16), raw_dtype=T.BF16)
    w.add_tensor("f32_3d", rng.standard_normal((2, 1, 32)).astype(np.float32))
    for name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"):
        bs, ts = gguf.GGML_QUANT_SIZES[T[name]]
        blocks = rng.integers(0, 256, size=(1, 256 // bs * ts), dtype=np.uint8)
        w.add_tensor(name.lower(), blocks, raw_dtype=T[name])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    # A llama model of the shapes config_from_gguf and the tensor-name mapping expect.
    path = d / "tiny_llama"
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_token_list(["<s>", "</s>", "a", "b", "c", "d", "e", "f"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    shapes = {"token_embd.weight": (8, 32), "output_norm.weight": (32,),
              "blk.0.attn_norm.weight": (32,), "blk.0.attn_q.weight": (32, 32),
              "blk.0.attn_k.weight": (16, 32), "blk.0.ffn_down.weight": (32, 64)}
    for name, shape in shapes.items():
        x = rng.standard_normal(shape).astype(np.float32)
        if len(shape) == 2:
            w.add_tensor(name, gguf.quants.quantize(x, T.Q8_0), raw_dtype=T.Q8_0)
        else:
            w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    # The fixture's real header, with a little data: refused (tensors outside the file).
    real = (FIXTURES / "gguf" / "tiny_llama_q8_0.gguf").read_bytes()
    reader = gguf.GGUFReader(str(FIXTURES / "gguf" / "tiny_llama_q8_0.gguf"))
    start = min(int(t.data_offset) for t in reader.tensors)
    out("gguf_reader", "tiny_llama_q8_0_header", real[:start + 64])


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(v)


def policy_toml(policy: dict) -> str:
    """The subset of TOML policy files use: top-level values, [config], [[tensor]]."""
    lines = [f"{k} = {toml_value(v)}" for k, v in policy.items() if k not in ("config", "tensor")]
    if "config" in policy:
        lines += ["", "[config]"] + [f"{k} = {toml_value(v)}" for k, v in policy["config"].items()]
    for entry in policy.get("tensor", []):
        lines += ["", "[[tensor]]"] + [f"{k} = {toml_value(v)}" for k, v in entry.items()]
    return "\n".join(lines) + "\n"


def policy_seeds() -> None:
    import tomllib  # noqa: PLC0415 (Python 3.11)
    text = (ROOT / "tests" / "policy_file.rs").read_text()
    tinyllm = re.search(r'const POLICY: &str = r#"(.*?)"#;', text, re.S).group(1)
    out("policy_file", "tinyllm.toml", tinyllm.encode())
    policy = tomllib.loads(tinyllm)
    out("policy_file", "tinyllm.json", json.dumps(policy, indent=1).encode())
    # The same rules over a checkpoint of other names and shapes (after the NUL byte).
    tensors = "\n".join([
        "backbone.tok_embeddings.weight 103x64", "head.weight 103x64",
        "backbone.blocks.7.attn.wq.weight 64x64", "backbone.blocks.7.attn.wk.weight 30x64",
        "backbone.blocks.7.attn.wo.weight 64", "backbone.blocks.7.ffn.w_up.weight 64x100x2",
        "backbone.blocks.7.norm1.weight", "extra.weight 1x1"])
    out("policy_file", "tinyllm_other_tensors", tinyllm.encode() + b"\x00" + tensors.encode())
    # Every split and option: fused parts, per-head blocks, transposed (GPT-2 Conv1D) storage.
    fused = {
        "model_type": "fusedlm", "wiring": "gpt2", "prefixes": ["transformer.", ""],
        "config": {"n_embd": "width", "n_layer": "depth"},
        "tensor": [
            {"name": "h.*.qkv.weight", "wiring_name": "h.*.attn.c_attn.weight",
             "split": "column", "partition": "heads", "parts": 3, "transposed": True},
            {"name": "h.*.neox_qkv.weight", "split": "per_head", "parts": 3},
            {"name": "h.*.out.weight", "wiring_name": "h.*.attn.c_proj.weight",
             "split": "row", "partition": "heads", "transposed": True},
            {"name": "h.*.fc.*", "wiring_name": "h.*.mlp.c_fc.*", "split": "column",
             "partition": "intermediate"},
            {"name": "wte.weight", "wiring_name": "wte.weight", "split": "column",
             "partition": "vocab"},
            {"name": "*", "split": "replicate"},
        ]}
    out("policy_file", "fused.toml", policy_toml(fused).encode())
    out("policy_file", "fused.json", json.dumps(fused).encode())
    out("policy_file", "fused_tensors", policy_toml(fused).encode() + b"\x00" + "\n".join([
        "transformer.h.0.qkv.weight 64x192", "transformer.h.0.neox_qkv.weight 192x64",
        "transformer.h.0.out.weight 64x64", "h.0.fc.bias 100", "wte.weight 103x64",
        "rotary.inv_freq 4"]).encode())
    # Refused: a rule without a partition, parts on a row split, an unknown wiring.
    out("policy_file", "refused_entries", b'model_type = "x"\nwiring = "bert"\n[[tensor]]\n'
        b'name = "a"\nsplit = "row"\nparts = 2\npartition = "kv_heads"\n')
    out("policy_file", "unknown_wiring.json", b'{"model_type": "x", "wiring": "t5", "tensor": []}')


if __name__ == "__main__":
    safetensors_seeds()
    config_seeds()
    policy_seeds()
    gguf_seeds()
    for d in sorted(CORPUS.iterdir()):
        files = list(d.iterdir())
        print(f"{d.name}: {len(files)} seeds, {sum(f.stat().st_size for f in files)} bytes")
