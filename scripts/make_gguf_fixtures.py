#!/usr/bin/env python3
"""Generate the GGUF family fixtures under tests/fixtures/gguf/families/ (tests/gguf_families.rs).

Run by hand:

    /work/pyenv-hf/bin/python scripts/make_gguf_fixtures.py [--only NAME ...] [--llama-cpp DIR]

For each GGUF `general.architecture` below (and Mixtral, a `llama` file with experts, named
`mixtral`), a tiny random Hugging Face checkpoint (64 wide, vocabulary of a few hundred, a small
tokenizer and chat template) is written to a temporary directory and converted by llama.cpp's
own `convert_hf_to_gguf.py --outtype q8_0` (Q8_0 where a row is whole 32-element blocks, F16
where it is not, F32 for vectors and routers), so that every transformation the converter
applies (llama's q/k row permutation, Gemma's `1 + w` norms, Llama 3's `rope_freqs`, Phi-3's
fused tensors, each layer's experts stacked into one 3-D tensor per projection, renamed norms
...) is the converter's and not a re-implementation of it. The one thing patched is
`get_vocab_base_pre`, which recognises a byte-level BPE tokenizer by hashing its output on a
test text: a tiny tokenizer matches no known hash, so each family is given the
`tokenizer.ggml.pre` its real models carry.

The converter is llama.cpp at the commit vendored by the `llama-cpp-python` sdist named in
LLAMA_CPP_PYTHON (its `convert_hf_to_gguf.py`, `conversion/` and `gguf-py/`). Without
`--llama-cpp`, the script downloads that sdist with pip (no dependencies, no build) and unpacks
those three parts into a cache directory.

References (`<arch>_reference.safetensors`): the logits of a padded [2, 10] batch and a greedy
continuation, from transformers 5.25 loading the GGUF itself (`from_pretrained(dir,
gguf_file=...)`) where transformers reads everything llama.cpp wrote for the family, and
otherwise from the "safetensors twin": the same transformers model class with the checkpoint's
configuration (as llama.cpp interprets it) and the GGUF's dequantized tensors, transformed back
the way transformers' GGUF loader does. Where transformers can load the file, its loaded
tensors are checked to equal the dequantized ones, and its logits are compared with the twin's;
`<arch>_meta.json` says which reference was used and why. Also recorded: the token ids
transformers' GGUF tokenizer gives for a few probe texts and for the chat template rendered for
"Hello", the end-of-sequence ids parallelformers should read (eos, and the control tokens
llama.cpp ends a turn on), and the 4-token greedy answer `parallelformers chat` must print (seeds
are tried until it is non-empty text without replacement characters).

Versions: torch 2.15, transformers 5.25.0, gguf 0.19.0 (installed), llama.cpp 0c1e5709
(llama-cpp-python 0.3.36). The output is deterministic for given versions.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))

import make_fixtures as mf  # noqa: E402  (sets the offline environment, imports torch)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import AddedToken  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    Starcoder2Config,
    Starcoder2ForCausalLM,
)

OUT = mf.REPO_ROOT / "tests" / "fixtures" / "gguf" / "families"
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
LLAMA_CPP_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pf-llama-cpp-0.3.36"
MAX_FILE_BYTES = 1_000_000
MAX_TOTAL_BYTES = 3_000_000
# Probe texts for the tokenizer check: plain text, multiple spaces, digits, accents, bytes
# outside the vocabulary, and the chat template's own markers.
PROBES = [
    mf.ROUNDTRIP_SENTENCE,
    "  two leading spaces, a tab\there and 3 digits 1234",
    "emoji \U0001F98A and \u00e9\u00e8 accents",
]

# The common shape: 4 query heads over 2 key/value heads of 16, an MLP of 80 (so `ffn_down`
# rows are not whole Q8_0 blocks and llama.cpp falls back to F16 for them), two layers.
BASE = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=80,
            num_hidden_layers=2, max_position_embeddings=128)

CHATML = mf.CHATML_TEMPLATE
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
CHAT = [{"role": "user", "content": "Hello"}]  # what `parallelformers chat ... "Hello"` sends
CHAT_NEW_TOKENS = 4
PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


# --------------------------------------------------------------------------
# The families
# --------------------------------------------------------------------------

def llama_cfg(vocab, bos, eos):
    # Llama 3.1/3.2's rotary scaling, written by llama.cpp as per-frequency divisors
    # (`rope_freqs.weight`): an original context of 16 puts head_dim 16's eight frequencies in
    # all three of its bands.
    return LlamaConfig(**BASE, vocab_size=vocab, head_dim=16, tie_word_embeddings=True,
                       rms_norm_eps=1e-5, bos_token_id=bos, eos_token_id=eos, pad_token_id=mf.PAD_ID,
                       rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                            low_freq_factor=1.0, high_freq_factor=4.0,
                                            original_max_position_embeddings=16))


def qwen3_cfg(vocab, bos, eos):
    # q/k RMSNorm per head; head_dim 128 as in every Qwen3, which transformers' GGUF loader
    # assumes (it does not read `attention.key_length` for qwen3).
    return Qwen3Config(**BASE, vocab_size=vocab, head_dim=128, tie_word_embeddings=True,
                       rms_norm_eps=1e-6, bos_token_id=bos, eos_token_id=eos, pad_token_id=mf.PAD_ID,
                       rope_parameters=dict(rope_type="default", rope_theta=1000000.0))


def gemma2_cfg(vocab, bos, eos):
    # Sandwich norms, soft-capping low enough to bite, a window of 4 on the even layers (the
    # pattern llama.cpp assumes); query_pre_attn_scalar = head_dim, which is what llama.cpp
    # scales by (it has no key for it).
    return Gemma2Config(**BASE, vocab_size=vocab, head_dim=16, tie_word_embeddings=True,
                        rms_norm_eps=1e-6, sliding_window=4, query_pre_attn_scalar=16,
                        attn_logit_softcapping=2.0, final_logit_softcapping=5.0,
                        bos_token_id=bos, eos_token_id=eos, pad_token_id=mf.PAD_ID)


def gemma3_cfg(vocab, bos, eos):
    # Six layers so that llama.cpp's fixed pattern (every sixth layer global) has a global layer;
    # global layers with linear scaling on base 1e6, sliding ones on base 10000.
    return Gemma3TextConfig(**{**BASE, "num_hidden_layers": 6}, vocab_size=vocab, head_dim=16,
                            tie_word_embeddings=True, rms_norm_eps=1e-6, sliding_window=4,
                            query_pre_attn_scalar=16, bos_token_id=bos, eos_token_id=eos,
                            pad_token_id=mf.PAD_ID,
                            rope_parameters={
                                "full_attention": dict(rope_type="linear", factor=8.0, rope_theta=1000000.0),
                                "sliding_attention": dict(rope_type="default", rope_theta=10000.0),
                            })


def phi3_cfg(vocab, bos, eos):
    # Fused qkv_proj and gate_up_proj (Phi-3-mini-4k: no rotary scaling, whole-head rotary,
    # no sliding window).
    return Phi3Config(**BASE, vocab_size=vocab, tie_word_embeddings=False, rms_norm_eps=1e-5,
                      original_max_position_embeddings=128, sliding_window=None,
                      bos_token_id=bos, eos_token_id=eos, pad_token_id=mf.PAD_ID,
                      rope_parameters=dict(rope_type="default", rope_theta=10000.0))


def granite_cfg(vocab, bos, eos):
    # Embedding, attention, residual and logit multipliers; q/k permuted like llama's.
    return GraniteConfig(**BASE, vocab_size=vocab, tie_word_embeddings=True, rms_norm_eps=1e-6,
                         embedding_multiplier=0.5, attention_multiplier=0.2, residual_multiplier=1.5,
                         logits_scaling=2.0, bos_token_id=bos, eos_token_id=eos, pad_token_id=mf.PAD_ID,
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0))


def starcoder2_cfg(vocab, bos, eos):
    # LayerNorm with biases, biased projections, plain tanh-GELU MLP; StarCoder2's window of
    # 4096 (which llama.cpp does not write; parallelformers and transformers' GGUF loader assume
    # it), longer than any input here.
    return Starcoder2Config(**BASE, vocab_size=vocab, tie_word_embeddings=True, norm_epsilon=1e-5,
                            use_bias=True, sliding_window=4096, hidden_act="gelu_pytorch_tanh",
                            bos_token_id=bos, eos_token_id=eos, pad_token_id=mf.PAD_ID,
                            rope_parameters=dict(rope_type="default", rope_theta=10000.0))


def olmo2_cfg(vocab, bos, eos):
    # Norms after attention and MLP, q/k RMSNorm over the whole projection, untied head.
    return Olmo2Config(**BASE, vocab_size=vocab, tie_word_embeddings=False, rms_norm_eps=1e-6,
                       bos_token_id=bos, eos_token_id=eos, pad_token_id=mf.PAD_ID,
                       rope_parameters=dict(rope_type="default", rope_theta=500000.0))


# Mixtures of experts: each layer's experts are stacked by the converter into one 3-D tensor
# per projection (ffn_gate_exps, ffn_up_exps, ffn_down_exps; router ffn_gate_inp in F32). Expert
# widths of whole Q8_0 blocks, so every stacked tensor is Q8_0; routers drawn wider than the
# other weights (make_fixtures.ROUTER_STD) so that each token's top-k experts stand clear of the
# rest.
def mixtral_cfg(vocab, bos, eos):
    # A `llama` file with experts: 4 experts of width 64, top 2, untied head; q/k permuted.
    return MixtralConfig(**{**BASE, "intermediate_size": 64}, vocab_size=vocab, num_local_experts=4,
                         num_experts_per_tok=2, tie_word_embeddings=False, rms_norm_eps=1e-5,
                         bos_token_id=bos, eos_token_id=eos, pad_token_id=mf.PAD_ID,
                         rope_parameters=dict(rope_type="default", rope_theta=1000000.0))


def qwen3moe_cfg(vocab, bos, eos):
    # Qwen3's q/k norms, 8 experts of width 32, top 2, every layer sparse (llama.cpp builds no
    # dense qwen3moe layer); norm_topk_prob true, which is what llama.cpp computes whatever the
    # checkpoint says (it writes no key for it).
    return Qwen3MoeConfig(**BASE, vocab_size=vocab, head_dim=16, num_experts=8, num_experts_per_tok=2,
                          moe_intermediate_size=32, norm_topk_prob=True, mlp_only_layers=[],
                          decoder_sparse_step=1, tie_word_embeddings=True, rms_norm_eps=1e-6,
                          bos_token_id=bos, eos_token_id=eos, pad_token_id=mf.PAD_ID,
                          rope_parameters=dict(rope_type="default", rope_theta=1000000.0))


# name: HF config builder, class, tokenizer ("bpe:<tokenizer.ggml.pre>" or a SentencePiece
# kind), chat template, seed, and why transformers' own GGUF loading is not the reference
# (None: it is); optionally the GGUF architecture where it is not the name (`arch`) and whether
# the model is a mixture of experts (`moe`).
FAMILIES = {
    "llama": dict(cfg=llama_cfg, cls=LlamaForCausalLM, tok="bpe:llama-bpe", template=CHATML, seed=50000,
                  twin_because="transformers' GGUF loader ignores rope_freqs.weight (Llama 3 rotary scaling)"),
    "qwen3": dict(cfg=qwen3_cfg, cls=Qwen3ForCausalLM, tok="bpe:qwen2", template=CHATML, seed=51000,
                  twin_because=None),
    "gemma2": dict(cfg=gemma2_cfg, cls=Gemma2ForCausalLM, tok="sp:gemma", template=GEMMA_TEMPLATE, seed=52000,
                   twin_because="transformers' GGUF loader ignores gemma2.attn_logit_softcapping and "
                                "final_logit_softcapping and scales queries by 256^-0.5, llama.cpp by head_dim^-0.5"),
    "gemma3": dict(cfg=gemma3_cfg, cls=Gemma3ForCausalLM, tok="sp:gemma", template=GEMMA_TEMPLATE, seed=53000,
                   twin_because="transformers' GGUF loader ignores gemma3.rope.scaling.* and rope.freq_base_swa "
                                "and scales queries by 256^-0.5, llama.cpp by head_dim^-0.5"),
    "phi3": dict(cfg=phi3_cfg, cls=Phi3ForCausalLM, tok="sp:llama", template=PHI3_TEMPLATE, seed=54000,
                 twin_because=None),
    "granite": dict(cfg=granite_cfg, cls=GraniteForCausalLM, tok="bpe:refact", template=CHATML, seed=55000,
                    twin_because="transformers cannot load granite GGUF files"),
    "starcoder2": dict(cfg=starcoder2_cfg, cls=Starcoder2ForCausalLM, tok="bpe:starcoder", template=CHATML,
                       seed=56000, twin_because=None),
    "olmo2": dict(cfg=olmo2_cfg, cls=Olmo2ForCausalLM, tok="bpe:dbrx", template=CHATML, seed=57000,
                  twin_because="transformers cannot load olmo2 GGUF files"),
    "mixtral": dict(cfg=mixtral_cfg, cls=MixtralForCausalLM, tok="bpe:llama-bpe", template=CHATML, seed=58000,
                    arch="llama", moe=True,
                    twin_because="transformers' GGUF loader reads a llama file with experts as a dense "
                                 "Llama (its llama mapping has no expert_count)"),
    "qwen3moe": dict(cfg=qwen3moe_cfg, cls=Qwen3MoeForCausalLM, tok="bpe:qwen2", template=CHATML, seed=59000,
                     moe=True, overrides=dict(moe_intermediate_size=32),
                     twin_because="transformers' GGUF loader does not read qwen3moe.expert_feed_forward_length "
                                  "(moe_intermediate_size keeps its default of 768)"),
}


# --------------------------------------------------------------------------
# llama.cpp's converter
# --------------------------------------------------------------------------

def llama_cpp_dir(given: Path | None) -> Path:
    """A directory with llama.cpp's convert_hf_to_gguf.py, conversion/ and gguf-py/."""
    if given is not None:
        return given
    root = CACHE / "llama.cpp"
    if (root / "convert_hf_to_gguf.py").is_file():
        return root
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                        "llama-cpp-python", LLAMA_CPP_PYTHON, "-d", tmp], check=True)
        (sdist,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        with tarfile.open(sdist) as tar:
            prefix = f"{sdist.name[:-len('.tar.gz')]}/vendor/llama.cpp/"
            wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
            members = []
            for m in tar.getmembers():
                if m.name.startswith(prefix) and m.name[len(prefix):].startswith(wanted):
                    m.name = m.name[len(prefix):]
                    members.append(m)
            tar.extractall(root, members=members, filter="data")
    return root


# Runs the converter in a fresh interpreter with the byte-level pre-tokenizer name fixed.
CONVERT_DRIVER = r"""
import runpy, sys
llama_cpp, pre = sys.argv[1], sys.argv[2]
sys.path[:0] = [llama_cpp, llama_cpp + "/gguf-py"]
import conversion.base as base
if pre != "-":
    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
sys.argv = [llama_cpp + "/convert_hf_to_gguf.py"] + sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def convert(llama_cpp: Path, hf_dir: Path, out: Path, pre: str | None) -> None:
    # The converter uses the gguf-py beside it unless NO_LOCAL_GGUF is set.
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    cmd = [sys.executable, "-c", CONVERT_DRIVER, str(llama_cpp), pre or "-", str(hf_dir),
           "--outtype", "q8_0", "--outfile", str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stdout + r.stderr)
        raise RuntimeError(f"convert_hf_to_gguf.py failed for {hf_dir}")


# --------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------

def bpe_tokenizer(hf_dir: Path, template: str) -> tuple[int, int, int]:
    """The gpt2 fixture's byte-level BPE plus ChatML markers; returns (vocab, bos, eos)."""
    tok = mf.build_byte_level_bpe(300)
    tok.add_special_tokens([AddedToken("<|im_start|>", special=True, normalized=False),
                            AddedToken("<|im_end|>", special=True, normalized=False)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                   eos_token="<|im_end|>", unk_token=None, pad_token="<|endoftext|>")
    fast.chat_template = template
    fast.save_pretrained(hf_dir)
    return tok.get_vocab_size(), tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")


def sentencepiece_model(path_prefix: Path, kind: str) -> None:
    import sentencepiece as spm  # noqa: PLC0415

    corpus = path_prefix.with_suffix(".txt")
    corpus.write_text("\n".join(mf.TOKENIZER_CORPUS) + "\n")
    common = dict(input=str(corpus), model_prefix=str(path_prefix), model_type="bpe",
                  vocab_size=400, byte_fallback=True, character_coverage=1.0,
                  normalization_rule_name="identity", remove_extra_whitespaces=False,
                  split_digits=True, allow_whitespace_only_pieces=True, minloglevel=2,
                  num_threads=1)
    if kind == "gemma":
        # Gemma's layout: <pad> <eos> <bos> <unk> <mask>, turn markers as user-defined pieces,
        # no dummy prefix.
        spm.SentencePieceTrainer.train(**common, add_dummy_prefix=False, pad_id=0, eos_id=1, bos_id=2,
                                       unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
                                       unk_piece="<unk>",
                                       user_defined_symbols=["<mask>", "<start_of_turn>", "<end_of_turn>"])
    else:
        # Llama's (Phi-3's): <unk> <s> </s>, a dummy prefix.
        spm.SentencePieceTrainer.train(**common, add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2,
                                       pad_id=-1)


def sp_tokenizer(hf_dir: Path, kind: str, template: str) -> tuple[int, int, int]:
    """A SentencePiece tokenizer.model (+ the HF files around it); returns (vocab, bos, eos)."""
    import sentencepiece as spm  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:
        sentencepiece_model(Path(tmp) / "sp", kind)
        (hf_dir / "tokenizer.model").write_bytes((Path(tmp) / "sp.model").read_bytes())
    sp = spm.SentencePieceProcessor(model_file=str(hf_dir / "tokenizer.model"))
    n = sp.vocab_size()
    if kind == "gemma":
        added = {str(sp.piece_to_id(t)): t for t in ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>",
                                                      "<start_of_turn>", "<end_of_turn>")}
        config = dict(tokenizer_class="GemmaTokenizer", bos_token="<bos>", eos_token="<eos>",
                      unk_token="<unk>", pad_token="<pad>", add_bos_token=True, add_eos_token=False)
        bos, eos, vocab = 2, 1, n
    else:
        # Phi-3's markers after the SentencePiece vocabulary, all special.
        extra = ["<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>"]
        added = {str(i): t for i, t in ((0, "<unk>"), (1, "<s>"), (2, "</s>"))}
        added.update({str(n + i): t for i, t in enumerate(extra)})
        config = dict(tokenizer_class="LlamaTokenizer", bos_token="<s>", eos_token="<|end|>",
                      unk_token="<unk>", pad_token="<|endoftext|>", add_bos_token=False,
                      add_eos_token=False, legacy=False)
        bos, eos, vocab = 1, n + 2, n + len(extra)
    config["added_tokens_decoder"] = {
        i: dict(content=t, lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
        for i, t in added.items()
    }
    config["chat_template"] = template
    config["model_max_length"] = 128
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return vocab, bos, eos


# --------------------------------------------------------------------------
# GGUF reading and the twin
# --------------------------------------------------------------------------

def gguf_module(llama_cpp: Path):
    sys.path.insert(0, str(llama_cpp / "gguf-py"))
    import gguf  # noqa: PLC0415
    return gguf


def read_gguf(path: Path):
    """(metadata {key: value}, {name: (ggml type name, dequantized f32 array in PyTorch shape)})."""
    import gguf  # noqa: PLC0415

    reader = gguf.GGUFReader(str(path))
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        meta[key] = field.contents()
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        data = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape).astype(np.float32)
        tensors[t.name] = (t.tensor_type.name, data)
    return meta, tensors


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' LlamaTensorProcessor._reverse_permute_weights."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


# A mixture of experts' parameters in transformers 5 (router and stacked experts).
MOE_PARAM = re.compile(
    r"model\.layers\.(?P<layer>\d+)\.mlp\.(?P<param>gate\.weight|experts\.gate_up_proj|experts\.down_proj)")

# Archs whose q/k rows llama.cpp's converter permutes (LlamaModel.permute) for its rotary layout.
PERMUTED = {"llama", "granite"}
# Archs whose RMSNorm weights the converter stores as `1 + w`.
NORM_PLUS_ONE = {"gemma2", "gemma3"}


def expected_state_dict(arch: str, model, tensors: dict, gguf) -> dict[str, torch.Tensor]:
    """The HF state dict the GGUF describes: each HF parameter's GGUF tensor (found through
    gguf-py's name map, as transformers does), dequantized and transformed back."""
    cfg = model.config
    name_map = gguf.get_tensor_name_map(
        next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), cfg.num_hidden_layers)
    out = {}
    used = set()
    for hf_name, p in model.state_dict().items():
        stem, suffix = hf_name.rsplit(".", 1)
        if (moe := MOE_PARAM.fullmatch(hf_name)) is not None:
            # transformers 5 holds each layer's experts as gate_up_proj [experts, 2 * width,
            # hidden] (gate rows, then up rows) and down_proj, the router as mlp.gate.
            blk = f"blk.{moe['layer']}"
            if moe["param"] == "gate.weight":
                parts = [f"{blk}.ffn_gate_inp.weight"]
            elif moe["param"] == "experts.gate_up_proj":
                parts = [f"{blk}.ffn_gate_exps.weight", f"{blk}.ffn_up_exps.weight"]
            else:
                parts = [f"{blk}.ffn_down_exps.weight"]
            missing = [g for g in parts if g not in tensors]
            if missing:
                raise RuntimeError(f"{arch}: {missing} ({hf_name}) not in the GGUF")
            used.update(parts)
            w = np.concatenate([tensors[g][1] for g in parts], axis=1 if len(parts) == 2 else 0)
            if tuple(w.shape) != tuple(p.shape):
                raise RuntimeError(f"{arch}: {parts} give shape {w.shape}, {hf_name} {tuple(p.shape)}")
            out[hf_name] = torch.from_numpy(np.ascontiguousarray(w))
            continue
        if hf_name == "lm_head.weight" and "output.weight" not in tensors:
            gname = "token_embd.weight"  # tied: llama.cpp writes no output.weight
        elif (gname := name_map.get_name(stem)) is None:
            raise RuntimeError(f"{arch}: no GGUF name for {hf_name}")
        else:
            gname = f"{gname}.{suffix}"
        if gname not in tensors:
            raise RuntimeError(f"{arch}: {gname} ({hf_name}) is not in the GGUF")
        used.add(gname)
        w = tensors[gname][1].copy()
        if arch in PERMUTED and gname.endswith(("attn_q.weight", "attn_k.weight")):
            heads = cfg.num_attention_heads if ".attn_q." in gname else cfg.num_key_value_heads
            w = unpermute(w, heads)
        if arch in NORM_PLUS_ONE and "norm.weight" in gname:
            w = w - np.float32(1.0)
        if tuple(w.shape) != tuple(p.shape):
            raise RuntimeError(f"{arch}: {gname} has shape {w.shape}, {hf_name} {tuple(p.shape)}")
        out[hf_name] = torch.from_numpy(np.ascontiguousarray(w))
    extra = set(tensors) - used - {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}
    if extra:
        raise RuntimeError(f"{arch}: GGUF tensors no HF parameter reads: {sorted(extra)}")
    return out


def twin_model(spec, cfg, expected):
    cfg._attn_implementation = "eager"
    twin = spec["cls"](cfg).to(torch.float32)
    missing, unexpected = twin.load_state_dict(expected, strict=False)
    missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"twin: missing {missing}, unexpected {unexpected}")
    if cfg.tie_word_embeddings:
        twin.tie_weights()
    return twin.eval()


def tokenizer_reference(path: Path, meta: dict) -> dict:
    """Token ids of the probe texts and of the rendered chat prompt, from transformers' GGUF
    tokenizer (through its GGUF tokenizer builder where transformers cannot load the file; the
    template is then rendered by transformers' `render_jinja_template`)."""
    from transformers.utils.chat_template_utils import render_jinja_template  # noqa: PLC0415

    try:
        gtok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        backend = gtok.backend_tokenizer
        via = "AutoTokenizer.from_pretrained(gguf_file=...)"
        rendered = gtok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    except ValueError as e:
        from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer  # noqa: PLC0415

        architecture, tokenizer_dict, _config = get_gguf_tokenizer(str(path))
        backend, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
        via = f"convert_gguf_tokenizer (AutoTokenizer refuses the file: {str(e).splitlines()[0][:80]})"
        tokens = meta["tokenizer.ggml.tokens"]
        named = {k: tokens[meta[f"tokenizer.ggml.{k}_token_id"]] for k in ("bos", "eos")
                 if f"tokenizer.ggml.{k}_token_id" in meta}
        (rendered,), _ = render_jinja_template([CHAT], chat_template=meta["tokenizer.chat_template"],
                                               add_generation_prompt=True,
                                               bos_token=named.get("bos"), eos_token=named.get("eos"))
    ids = [backend.encode(t, add_special_tokens=False).ids for t in PROBES]
    chat_ids = backend.encode(rendered, add_special_tokens=False).ids
    return dict(via=via, ids=ids, rendered=rendered, chat_ids=chat_ids, backend=backend)


# Control tokens llama.cpp ends a turn on (gguf_model.rs: END_OF_TURN_TOKENS).
END_OF_TURN = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<|eom_id|>")


def eos_ids(meta: dict) -> list[int]:
    """The end-of-sequence ids parallelformers reads from the file (gguf_model.rs: eos_ids)."""
    ids = []
    for k in ("eos", "eot", "eom"):
        v = meta.get(f"tokenizer.ggml.{k}_token_id")
        if v is not None and v not in ids:
            ids.append(int(v))
    for i, (t, kind) in enumerate(zip(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"])):
        if t in END_OF_TURN and kind == 3 and i not in ids:
            ids.append(i)
    return ids


@torch.no_grad()
def chat_answer(model, chat_ids: list[int], eos: list[int], backend) -> tuple[list[int], str]:
    """`parallelformers chat --max-new-tokens 4`'s answer: greedy, stopping at an eos id."""
    prompt = torch.tensor([chat_ids], dtype=torch.int64)
    gc = mf.greedy_config(eos, pad=mf.PAD_ID)
    gc.max_new_tokens = CHAT_NEW_TOKENS
    new = mf.generate_new(model, prompt, gc)[0].tolist()
    return new, backend.decode(new, skip_special_tokens=True)


# --------------------------------------------------------------------------
# One family
# --------------------------------------------------------------------------

def summary_metadata(meta: dict) -> dict:
    """The metadata without the tokenizer's long arrays (their lengths instead)."""
    out = {}
    for k, v in meta.items():
        if isinstance(v, list) and len(v) > 16:
            out[k] = f"[{len(v)} values]"
        elif isinstance(v, float):
            out[k] = float(np.float32(v))
        else:
            out[k] = v
    return out


@torch.no_grad()
def loaded_vs_twin(loaded, expected: dict, tied: bool, ids, mask, twin_logits) -> float:
    """Checks that transformers' GGUF model holds the twin's tensors; its logits' largest
    difference from the twin's."""
    sd = loaded.state_dict()
    for hf_name, exp in expected.items():
        if hf_name == "lm_head.weight" and tied:
            continue
        if not torch.equal(sd[hf_name].float(), exp):
            raise RuntimeError(f"{hf_name}: transformers loaded other values than the dequantized GGUF "
                               f"(max diff {float((sd[hf_name] - exp).abs().max())})")
    logits = loaded(input_ids=ids, attention_mask=mask).logits.float()
    m = mask.bool()[..., None].expand_as(logits)
    return float((logits - twin_logits).abs().masked_select(m).max())


@torch.no_grad()
def make_family(arch: str, llama_cpp: Path, gguf) -> list[Path]:
    """The fixture `arch` (a family name, the GGUF architecture unless its spec names one)."""
    spec = FAMILIES[arch]
    gguf_arch = spec.get("arch", arch)
    print(f"[{arch}] {spec['cls'].__name__}")
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{arch}.gguf"
    with tempfile.TemporaryDirectory() as tmp:
        hf = Path(tmp) / "hf"
        hf.mkdir()
        kind, _, pre = spec["tok"].partition(":")
        if kind == "bpe":
            vocab, bos, eos = bpe_tokenizer(hf, spec["template"])
        else:
            vocab, bos, eos = sp_tokenizer(hf, pre, spec["template"])
            pre = None
        for attempt in range(mf.MAX_SEED_TRIES):
            seed = spec["seed"] + 10 * attempt
            cfg = spec["cfg"](vocab, bos, eos)
            tied = bool(cfg.tie_word_embeddings)
            build = dict(cls=spec["cls"], cfg=cfg, tied=tied,
                         tie_pairs=[("lm_head.weight", "model.embed_tokens.weight")])
            if spec.get("moe"):
                build["router_std"] = mf.ROUTER_STD
            model = mf.build_model(build, seed)
            model.save_pretrained(hf)
            convert(llama_cpp, hf, path, pre)
            meta, tensors = read_gguf(path)
            if meta["general.architecture"] != gguf_arch:
                raise RuntimeError(f"{arch}: the converter wrote {meta['general.architecture']}")
            expected = expected_state_dict(gguf_arch, model, tensors, gguf)
            twin = twin_model(spec, spec["cfg"](vocab, bos, eos), expected)

            gen = torch.Generator().manual_seed(seed + 2)
            ids, mask = mf.make_batch(gen, vocab)
            prompt = torch.randint(1, vocab, (1, mf.PROMPT_LEN), generator=gen, dtype=torch.int64)
            twin_logits = twin(input_ids=ids, attention_mask=mask).logits.float()
            hf_logits = model(input_ids=ids, attention_mask=mask).logits.float()
            if not torch.isfinite(twin_logits).all():
                raise RuntimeError("non-finite logits")
            twin_new = mf.generate_new(twin, prompt, mf.greedy_config(None, bos=bos))
            free = twin_new[0].tolist()
            assert mf.manual_greedy(twin, prompt, mf.MAX_NEW) == free, "generate != manual greedy"
            if len(set(free)) < 5:
                print(f"  seed {seed}: generation too repetitive {free}, retrying")
                continue
            tokref = tokenizer_reference(path, meta)
            eos_list = eos_ids(meta)
            answer_ids, answer = chat_answer(twin, tokref["chat_ids"], eos_list, tokref["backend"])
            if not answer.strip() or "\ufffd" in answer:
                print(f"  seed {seed}: the chat answer {answer_ids} ({answer!r}) is not whole text, retrying")
                continue
            break
        else:
            raise RuntimeError(f"{arch}: no suitable seed found")

    # ---- transformers loading the GGUF itself
    loaded = None
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            str(OUT), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager").eval()
    except (ValueError, NotImplementedError, KeyError, RuntimeError) as e:
        # RuntimeError: a tensor of another shape than the configuration transformers read.
        why = str(e).splitlines()[0]
        print(f"  transformers cannot load it: {why[:200]}")
        if spec["twin_because"] is None:
            raise
    if loaded is not None and type(loaded) is not spec["cls"]:
        print(f"  transformers loads it as {type(loaded).__name__}, not {spec['cls'].__name__}")
        if spec["twin_because"] is None:
            raise RuntimeError(f"{arch}: transformers loads a {type(loaded).__name__}")
        loaded = None
    gguf_vs_twin = None
    if loaded is not None:
        gguf_vs_twin = loaded_vs_twin(loaded, expected, tied, ids, mask, twin_logits)
        print(f"  transformers-GGUF vs twin: max |diff| {gguf_vs_twin:.3g}")
    # Where transformers misses a key, the same load with that key given checks the twin's
    # tensors (experts included) and logits against transformers' own GGUF reading.
    overridden_vs_twin = None
    if spec.get("overrides"):
        again = AutoModelForCausalLM.from_pretrained(
            str(OUT), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager",
            **spec["overrides"]).eval()
        overridden_vs_twin = loaded_vs_twin(again, expected, tied, ids, mask, twin_logits)
        print(f"  transformers-GGUF with {spec['overrides']} vs twin: max |diff| {overridden_vs_twin:.3g}")
        if overridden_vs_twin > 1e-5:
            raise RuntimeError(f"{arch}: transformers' GGUF model with {spec['overrides']} differs from the twin")
    if spec["twin_because"] is None:
        if gguf_vs_twin is None or gguf_vs_twin > 1e-5:
            raise RuntimeError(f"{arch}: transformers' GGUF model differs from the twin by {gguf_vs_twin}")
        reference, source = loaded, "transformers from_pretrained(gguf_file=...)"
    else:
        if gguf_vs_twin is not None and gguf_vs_twin < 1e-5:
            raise RuntimeError(f"{arch}: transformers' GGUF model agrees with the twin; "
                               f"the stated reason ({spec['twin_because']}) is stale")
        reference, source = twin, "safetensors twin (transformers on the dequantized GGUF tensors)"
    logits = reference(input_ids=ids, attention_mask=mask).logits.float().contiguous()
    new = mf.generate_new(reference, prompt, mf.greedy_config(None, bos=bos))
    assert mf.manual_greedy(reference, prompt, mf.MAX_NEW) == new[0].tolist()

    answer_ids, answer = chat_answer(reference, tokref["chat_ids"], eos_list, tokref["backend"])
    print(f"  chat answer: {answer_ids} {answer!r}")

    tensors_out = {
        "input_ids": ids.contiguous(),
        "attention_mask": mask.contiguous(),
        "logits": logits,
        "generate_input_ids": prompt.contiguous(),
        "generate_output_ids": new.contiguous(),
        "chat_prompt_ids": torch.tensor([tokref["chat_ids"]], dtype=torch.int64),
        "chat_answer_ids": torch.tensor([answer_ids], dtype=torch.int64),
        "eos_token_ids": torch.tensor([eos_list], dtype=torch.int64),
    }
    for i, probe_ids in enumerate(tokref["ids"]):
        tensors_out[f"tokenizer_probe_{i}"] = torch.tensor([probe_ids], dtype=torch.int64)
    ref_path = OUT / f"{arch}_reference.safetensors"
    save_file(tensors_out, str(ref_path), metadata={"format": "pt"})

    m = mask.bool()[..., None].expand_as(logits)
    quant_vs_unquantized = float((logits - hf_logits).abs().masked_select(m).max())
    types: dict[str, int] = {}
    for t, _ in tensors.values():
        types[t] = types.get(t, 0) + 1
    meta_out = {
        "gguf_file": path.name,
        "general.architecture": meta["general.architecture"],
        "architecture": spec["cls"].__name__,
        "reference": source,
        "twin_because": spec["twin_because"],
        "max_abs_logit_diff_transformers_gguf_vs_twin": gguf_vs_twin,
        "transformers_gguf_overrides": spec.get("overrides"),
        "max_abs_logit_diff_transformers_gguf_with_overrides_vs_twin": overridden_vs_twin,
        "max_abs_logit_diff_vs_unquantized": round(quant_vs_unquantized, 6),
        "seed": seed,
        "hf_config": json.loads(spec["cfg"](vocab, bos, eos).to_json_string()),
        "tensor_types": {name: t for name, (t, _) in sorted(tensors.items())},
        "tensor_type_counts": types,
        "metadata": summary_metadata(meta),
        "tokenizer_probes": PROBES,
        "tokenizer_reference": tokref["via"],
        "chat_messages": CHAT,
        "chat_rendered": tokref["rendered"],
        "chat_answer": answer,
        "eos_token_ids": eos_list,
        "generate_no_eos_ids": new[0].tolist(),
        "pad_token_id": mf.PAD_ID,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "gguf_version": mf._dist_version("gguf"),
        "llama_cpp": f"{LLAMA_CPP_COMMIT} (vendored by {LLAMA_CPP_PYTHON})",
    }
    meta_path = OUT / f"{arch}_meta.json"
    meta_path.write_text(json.dumps(meta_out, indent=2, ensure_ascii=False) + "\n")
    stats = logits.masked_select(m)
    print(f"  {path.name}: {path.stat().st_size} bytes, types {types}, seed {seed}")
    print(f"  reference: {source}; logits std {stats.std():.3f}; |GGUF - unquantized| {quant_vs_unquantized:.4f}")
    print(f"  greedy: {new[0].tolist()}")
    if not (0.3 < float(stats.std()) < 10.0):
        raise RuntimeError(f"{arch}: logits std {float(stats.std())} out of range")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise RuntimeError(f"{arch}: {path.stat().st_size} bytes is too large")
    return [path, ref_path, meta_path]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", choices=list(FAMILIES), default=None)
    ap.add_argument("--llama-cpp", type=Path, default=None,
                    help="a llama.cpp checkout (default: the one vendored by " + LLAMA_CPP_PYTHON + ")")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    llama_cpp = llama_cpp_dir(args.llama_cpp)
    gguf = gguf_module(llama_cpp)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, gguf-py from {llama_cpp}")
    written = []
    for arch in args.only or list(FAMILIES):
        written += make_family(arch, llama_cpp, gguf)
    total = sum(p.stat().st_size for p in OUT.iterdir() if p.is_file())
    print(f"{OUT}: {total} bytes in all")
    if total > MAX_TOTAL_BYTES:
        raise RuntimeError(f"the GGUF family fixtures take {total} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
