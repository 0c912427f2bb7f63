#!/usr/bin/env python3
"""Generate the Hugging Face reference fixtures under tests/fixtures/.

Run from anywhere:

    /root/.cache/pf-venv/bin/python scripts/make_fixtures.py [--out DIR] [--only NAME ...]

Everything is built locally (configs, tokenizer); nothing is downloaded. The
output is deterministic for a given torch / transformers / tokenizers version.
See scripts/README.md and tests/fixtures/README.md.

The GGUF fixtures (tests/fixtures/gguf/, `--only gguf_quant_types
gguf_tiny_llama`) additionally need the `gguf` package (gguf-py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF loading progress bar

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForMaskedLM,
    BertModel,
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    RobertaConfig,
    RobertaModel,
    DistilBertConfig,
    DistilBertModel,
    ElectraConfig,
    ElectraModel,
    AlbertConfig,
    AlbertModel,
    BartConfig,
    BartForConditionalGeneration,
    T5Config,
    T5ForConditionalGeneration,
    GPTBigCodeConfig,
    GPTBigCodeForCausalLM,
    GPTNeoConfig,
    GPTNeoForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    GPTJConfig,
    GPTJForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    BloomConfig,
    BloomForCausalLM,
    FalconConfig,
    FalconForCausalLM,
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
    StableLmConfig,
    StableLmForCausalLM,
    Starcoder2Config,
    Starcoder2ForCausalLM,
)

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "tests" / "fixtures"

SEQ_LEN = 10          # reference batch: [2, SEQ_LEN]
ROW1_REAL = 6         # row 1 has 6 real tokens, then right padding
PAD_ID = 0            # padding token id used in input_ids and for generate
PROMPT_LEN = 5        # greedy-generation prompt length
MAX_NEW = 12          # max_new_tokens for generation
BATCH_ROW1_REAL = 3   # encoder-decoders' generation batch: row 1 has 3 real tokens
DEC_LEN = 7           # encoder-decoder reference batch: decoder_input_ids [2, DEC_LEN]
WEIGHT_STD = 0.15     # std of re-randomized weight matrices / embeddings
MAX_FIXTURE_BYTES = 1_000_000

# --------------------------------------------------------------------------
# Tokenizer for the gpt2 fixture
# --------------------------------------------------------------------------

TOKENIZER_CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the sun, "
    "and the fox runs back into the forest where the other foxes are waiting.",
    "Tensor parallel inference splits every large matrix of a transformer "
    "across several devices. Each device holds a slice of the attention heads "
    "and a slice of the feed forward layer, and the partial results are "
    "summed with an all-reduce after the output projection.",
    "In the beginning there was a small village by the river. The people of "
    "the village were farmers and fishers; they worked in the fields during "
    "the day and told stories by the fire in the evening.",
    "A language model predicts the next token given all of the previous "
    "tokens. Greedy decoding always picks the token with the highest score, "
    "and generation stops when the end of sequence token is produced or when "
    "the maximum number of new tokens has been reached.",
    "Numbers like 12, 345 and 6789 appear in text too, as do symbols such as "
    "#, $, %, & and the occasional emoji or accented letter: cafe, naive, "
    "resume. Whitespace   matters\tfor byte-level tokenizers.\n",
    "She sells sea shells by the sea shore. The shells she sells are surely "
    "sea shells. So if she sells shells on the sea shore, I am sure she sells "
    "sea shore shells.",
]

ROUNDTRIP_SENTENCE = "The fox said: tensor parallel inference is 100% fun!\n  Ünïcødé too."
GPT2_BATCH_TEXTS = [
    "The quick brown fox jumps over the lazy dog and runs into the forest.",
    "Greedy decoding picks the best token.",
]
GPT2_PROMPT_TEXT = "In the beginning there was"


def build_byte_level_bpe(vocab_size: int = 300) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TOKENIZER_CORPUS, trainer=trainer)
    return tok


def encode_exact(tok: Tokenizer, text: str, n: int) -> list[int]:
    ids = tok.encode(text).ids
    if len(ids) < n:
        raise RuntimeError(f"text {text!r} encodes to {len(ids)} < {n} tokens")
    return ids[:n]


# --------------------------------------------------------------------------
# Model helpers
# --------------------------------------------------------------------------


def is_norm_weight(model: torch.nn.Module, name: str) -> bool:
    mod_name, _, pname = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    cls = type(mod).__name__.lower()
    return pname == "weight" and ("norm" in cls or isinstance(mod, torch.nn.LayerNorm))


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int, std: float = WEIGHT_STD) -> None:
    """Re-randomize every (unique) parameter so the outputs are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():  # shared (tied) params appear once
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if name.endswith("bias"):
            p.copy_(0.1 * noise)
        elif is_norm_weight(model, name):
            p.copy_(1.0 + 0.1 * noise)
        else:
            p.copy_(std * noise)


def check_ties(model: torch.nn.Module, tied: bool, pairs: list[tuple[str, str]]) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    for a, b in pairs:
        same = params[a].data_ptr() == params[b].data_ptr()
        if same != tied:
            raise RuntimeError(f"tie mismatch {a} vs {b}: tied={same}, expected {tied}")


def make_batch(gen: torch.Generator, vocab: int, seq_len: int = SEQ_LEN, row1_real: int = ROW1_REAL,
               pad: int = PAD_ID, low: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """[2, seq_len] ids in [low, vocab), row 1 right-padded with `pad` after `row1_real` tokens."""
    ids = torch.randint(low, vocab, (2, seq_len), generator=gen, dtype=torch.int64)
    mask = torch.ones(2, seq_len, dtype=torch.int64)
    ids[1, row1_real:] = pad
    mask[1, row1_real:] = 0
    return ids, mask


def greedy_config(eos, min_new_tokens=None, bos=None, pad=PAD_ID, decoder_start=None) -> GenerationConfig:
    return GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=MAX_NEW,
        min_new_tokens=min_new_tokens,
        temperature=1.0,
        top_k=None,
        top_p=None,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        length_penalty=1.0,
        eos_token_id=eos,
        bos_token_id=bos,
        pad_token_id=pad,
        decoder_start_token_id=decoder_start,
    )


@torch.no_grad()
def generate_new(model, prompt: torch.Tensor, gc: GenerationConfig) -> torch.Tensor:
    # Replace the model's own generation_config so that no default (e.g. a
    # config-derived eos_token_id) is merged into ours.
    model.generation_config = gc
    out = model.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        generation_config=gc,
    )
    if isinstance(out, torch.Tensor):
        seq = out
    else:
        seq = out.sequences
    # An encoder-decoder returns the decoder sequence, which starts with the decoder start token.
    if model.config.is_encoder_decoder:
        head = torch.full((prompt.shape[0], 1), gc.decoder_start_token_id, dtype=torch.int64)
    else:
        head = prompt
    assert torch.equal(seq[:, : head.shape[1]], head)
    return seq[:, head.shape[1]:].clone()


@torch.no_grad()
def manual_greedy(model, prompt: torch.Tensor, n: int, eos=None, min_new=0) -> list[int]:
    """Cache-free greedy loop: independent check of model.generate.

    An encoder-decoder runs its encoder once on the prompt, then its decoder on the whole
    decoder prefix (the decoder start token first) at every step.
    """
    if model.config.is_encoder_decoder:
        mask = torch.ones_like(prompt)
        enc = model.get_encoder()(input_ids=prompt, attention_mask=mask)
        ids = torch.tensor([[model.config.decoder_start_token_id]])

        def step_logits(ids):
            return model(encoder_outputs=enc, attention_mask=mask, decoder_input_ids=ids).logits
    else:
        ids = prompt.clone()

        def step_logits(ids):
            return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    new = []
    for step in range(n):
        logits = step_logits(ids)[0, -1]
        if eos is not None and step < min_new:
            logits = logits.clone()
            logits[eos] = -float("inf")
        t = int(logits.argmax())
        new.append(t)
        ids = torch.cat([ids, torch.tensor([[t]])], dim=1)
        if eos is not None and t == eos:
            break
    return new


def checked_greedy(model, prompt: torch.Tensor, chosen: dict, config) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy generation stopping at the chosen eos, and with min_new_tokens = MAX_NEW
    (`config(min_new_tokens)` gives the generation config), each checked against the
    free-running tokens and a cache-free manual loop."""
    eos = chosen["eos"]
    stop = generate_new(model, prompt, config(None))
    mn = generate_new(model, prompt, config(MAX_NEW))
    exp_stop = chosen["free"][: chosen["eos_pos"] + 1]
    assert stop[0].tolist() == exp_stop, (stop, exp_stop)
    assert mn.shape == (1, MAX_NEW), mn.shape
    assert eos not in mn[0].tolist()
    assert manual_greedy(model, prompt, MAX_NEW) == chosen["free"], "generate != manual greedy"
    assert manual_greedy(model, prompt, MAX_NEW, eos=eos) == exp_stop
    assert manual_greedy(model, prompt, MAX_NEW, eos=eos, min_new=MAX_NEW) == mn[0].tolist()
    return stop, mn


def pick_eos(new_tokens: list[int], avoid: set[int]) -> int | None:
    """Index of the token used as eos: prefer position 3, it must first appear there.

    Tokens in `avoid` (the padding id, the bos id) are never used as eos.
    """
    for pos in (3, 4, 2, 5, 6, 7, 8, 1):
        if new_tokens[pos] not in new_tokens[:pos] and new_tokens[pos] not in avoid:
            return pos
    return None


def dir_size(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


# --------------------------------------------------------------------------
# Fixture specs
# --------------------------------------------------------------------------


def gpt2_spec(out: Path):
    tok = build_byte_level_bpe(300)
    # Round trip check.
    enc = tok.encode(ROUNDTRIP_SENTENCE)
    dec = tok.decode(enc.ids)
    if dec != ROUNDTRIP_SENTENCE:
        raise RuntimeError(f"tokenizer round trip failed: {ROUNDTRIP_SENTENCE!r} -> {dec!r}")
    eot = tok.token_to_id("<|endoftext|>")
    vocab = tok.get_vocab_size()
    print(f"  tokenizer: vocab {vocab}, <|endoftext|> = {eot}, round trip OK "
          f"({len(enc.ids)} tokens for {len(ROUNDTRIP_SENTENCE)} chars)")
    cfg = GPT2Config(
        vocab_size=vocab,
        n_embd=64,
        n_head=4,
        n_layer=2,
        n_positions=64,
        n_inner=None,
        tie_word_embeddings=True,
        bos_token_id=eot,
        eos_token_id=eot,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )

    def inputs(gen):
        row0 = encode_exact(tok, GPT2_BATCH_TEXTS[0], SEQ_LEN)
        row1 = encode_exact(tok, GPT2_BATCH_TEXTS[1], ROW1_REAL) + [PAD_ID] * (SEQ_LEN - ROW1_REAL)
        ids = torch.tensor([row0, row1], dtype=torch.int64)
        mask = torch.ones_like(ids)
        mask[1, ROW1_REAL:] = 0
        prompt = torch.tensor([encode_exact(tok, GPT2_PROMPT_TEXT, PROMPT_LEN)], dtype=torch.int64)
        return ids, mask, prompt

    def extra(d: Path):
        tok.save(str(d / "tokenizer.json"))
        # Reload and re-check the round trip from the saved file.
        t2 = Tokenizer.from_file(str(d / "tokenizer.json"))
        assert t2.decode(t2.encode(ROUNDTRIP_SENTENCE).ids) == ROUNDTRIP_SENTENCE
        return {
            "tokenizer": "tokenizer.json",
            "endoftext_id": eot,
            "roundtrip_text": ROUNDTRIP_SENTENCE,
            "roundtrip_ids": enc.ids,
            "batch_texts": GPT2_BATCH_TEXTS,
            "prompt_text": GPT2_PROMPT_TEXT,
        }

    return dict(
        cls=GPT2LMHeadModel, cfg=cfg, causal=True, output="logits",
        max_ranks=4, tied=True, tie_pairs=[("lm_head.weight", "transformer.wte.weight")],
        inputs=inputs, extra=extra, bos=eot,
    )


def llama_spec(out: Path):
    cfg = LlamaConfig(
        vocab_size=103, hidden_size=64, num_attention_heads=8, num_key_value_heads=4,
        intermediate_size=100, num_hidden_layers=2, max_position_embeddings=128,
        tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-5,
    )
    return dict(
        cls=LlamaForCausalLM, cfg=cfg, causal=True, output="logits", max_ranks=4,
        tied=False, tie_pairs=[("lm_head.weight", "model.embed_tokens.weight")],
        shards=(2, 3),
    )


def smollm_spec(out: Path):
    cfg = LlamaConfig(
        vocab_size=97, hidden_size=72, num_attention_heads=9, num_key_value_heads=3,
        head_dim=8, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=128,
        tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5,
    )
    return dict(
        cls=LlamaForCausalLM, cfg=cfg, causal=True, output="logits", max_ranks=3,
        tied=True, tie_pairs=[("lm_head.weight", "model.embed_tokens.weight")],
    )


def mistral_spec(out: Path):
    cfg = MistralConfig(
        vocab_size=101, hidden_size=64, num_attention_heads=8, num_key_value_heads=4,
        head_dim=8, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=128,
        tie_word_embeddings=False, sliding_window=4, rope_theta=10000.0, rms_norm_eps=1e-5,
    )
    return dict(
        cls=MistralForCausalLM, cfg=cfg, causal=True, output="logits", max_ranks=4,
        tied=False, tie_pairs=[("lm_head.weight", "model.embed_tokens.weight")],
        sliding_window=4,
    )


def qwen2_spec(out: Path):
    cfg = Qwen2Config(
        vocab_size=107, hidden_size=64, num_attention_heads=8, num_key_value_heads=4,
        intermediate_size=80, num_hidden_layers=2, max_position_embeddings=128,
        tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-6,
        use_sliding_window=False,
    )
    return dict(
        cls=Qwen2ForCausalLM, cfg=cfg, causal=True, output="logits", max_ranks=4,
        tied=True, tie_pairs=[("lm_head.weight", "model.embed_tokens.weight")],
    )


def bert_cfg() -> BertConfig:
    return BertConfig(
        vocab_size=99, hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
        intermediate_size=96, max_position_embeddings=64, type_vocab_size=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )


def bert_spec(out: Path):
    return dict(cls=BertModel, cfg=bert_cfg(), causal=False, output="last_hidden_state",
                max_ranks=4, tied=None, tie_pairs=[])


def bert_mlm_spec(out: Path):
    return dict(
        cls=BertForMaskedLM, cfg=bert_cfg(), causal=False, output="logits", max_ranks=4,
        tied=True, tie_pairs=[("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight")],
    )


def roberta_spec(out: Path):
    # Positions start after the padding id and skip padding tokens (found by id, not by mask).
    cfg = RobertaConfig(
        vocab_size=99, hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
        intermediate_size=96, max_position_embeddings=64 + PAD_ID + 1, type_vocab_size=1,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=PAD_ID,
    )
    return dict(cls=RobertaModel, cfg=cfg, causal=False, output="last_hidden_state",
                max_ranks=4, tied=None, tie_pairs=[])


def distilbert_spec(out: Path):
    cfg = DistilBertConfig(
        vocab_size=99, dim=64, n_heads=4, n_layers=2, hidden_dim=96, max_position_embeddings=64,
        dropout=0.0, attention_dropout=0.0, pad_token_id=PAD_ID,
    )
    return dict(cls=DistilBertModel, cfg=cfg, causal=False, output="last_hidden_state",
                max_ranks=4, tied=None, tie_pairs=[])


def electra_spec(out: Path):
    # Factorized embeddings: 32 wide, projected to the 64-wide encoder.
    cfg = ElectraConfig(
        vocab_size=99, embedding_size=32, hidden_size=64, num_attention_heads=4,
        num_hidden_layers=2, intermediate_size=96, max_position_embeddings=64, type_vocab_size=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=PAD_ID,
    )
    return dict(cls=ElectraModel, cfg=cfg, causal=False, output="last_hidden_state",
                max_ranks=4, tied=None, tie_pairs=[])


def albert_spec(out: Path):
    # Factorized embeddings and one layer shared by every block.
    cfg = AlbertConfig(
        vocab_size=99, embedding_size=32, hidden_size=64, num_attention_heads=4,
        num_hidden_layers=3, intermediate_size=96, max_position_embeddings=64, type_vocab_size=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0,
        pad_token_id=PAD_ID,
    )
    return dict(cls=AlbertModel, cfg=cfg, causal=False, output="last_hidden_state",
                max_ranks=4, tied=None, tie_pairs=[])

def gpt_bigcode_spec(out: Path):
    # Multi-query attention: one key/value head that every rank holds.
    cfg = GPTBigCodeConfig(
        vocab_size=101, n_embd=64, n_head=4, n_layer=2, n_positions=64, n_inner=96,
        multi_query=True, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=1, eos_token_id=2,
    )
    return dict(cls=GPTBigCodeForCausalLM, cfg=cfg, causal=True, output="logits", max_ranks=4,
                tied=True, tie_pairs=[("lm_head.weight", "transformer.wte.weight")])


def opt_spec(out: Path):
    # Learned positions offset by 2, pre-LayerNorm blocks, ReLU.
    cfg = OPTConfig(
        vocab_size=97, hidden_size=64, num_attention_heads=4, num_hidden_layers=2, ffn_dim=96,
        max_position_embeddings=64, word_embed_proj_dim=64, do_layer_norm_before=True,
        dropout=0.0, attention_dropout=0.0, pad_token_id=PAD_ID, bos_token_id=2, eos_token_id=2,
    )
    return dict(cls=OPTForCausalLM, cfg=cfg, causal=True, output="logits", max_ranks=4,
                tied=True, tie_pairs=[("lm_head.weight", "model.decoder.embed_tokens.weight")])


def gpt_neo_spec(out: Path):
    # Global and local (window 4) attention layers, unscaled attention scores.
    cfg = GPTNeoConfig(
        vocab_size=97, hidden_size=64, num_heads=4, num_layers=2, intermediate_size=96,
        max_position_embeddings=64, attention_types=[[["global", "local"], 1]], window_size=4,
        resid_dropout=0.0, embed_dropout=0.0, attention_dropout=0.0, bos_token_id=1,
        eos_token_id=2,
    )
    return dict(cls=GPTNeoForCausalLM, cfg=cfg, causal=True, output="logits", max_ranks=4,
                tied=True, tie_pairs=[("lm_head.weight", "transformer.wte.weight")])

def phi_spec(out: Path):
    # Attention and MLP in parallel on one LayerNorm, rotary on half of each head.
    cfg = PhiConfig(
        vocab_size=97, hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
        intermediate_size=96, max_position_embeddings=64, partial_rotary_factor=0.5,
        resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2,
    )
    return dict(cls=PhiForCausalLM, cfg=cfg, causal=True, output="logits", max_ranks=4,
                tied=False, tie_pairs=[("lm_head.weight", "model.embed_tokens.weight")])


def gptj_spec(out: Path):
    # Parallel attention and MLP, interleaved rotary on the first 8 of 16 dims per head.
    cfg = GPTJConfig(
        vocab_size=97, n_embd=64, n_head=4, n_layer=2, n_inner=96, n_positions=64,
        rotary_dim=8, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    return dict(cls=GPTJForCausalLM, cfg=cfg, causal=True, output="logits", max_ranks=4,
                tied=False, tie_pairs=[("lm_head.weight", "transformer.wte.weight")])

def gpt_neox_spec(out: Path):
    # q/k/v fused head by head, rotary on a quarter of each head, parallel residual.
    cfg = GPTNeoXConfig(
        vocab_size=97, hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
        intermediate_size=96, max_position_embeddings=64, rotary_pct=0.25,
        use_parallel_residual=True, hidden_dropout=0.0, attention_dropout=0.0,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    return dict(cls=GPTNeoXForCausalLM, cfg=cfg, causal=True, output="logits", max_ranks=4,
                tied=False, tie_pairs=[])


def bloom_spec(out: Path):
    # ALiBi instead of positions, q/k/v fused head by head, a LayerNorm on the embeddings.
    cfg = BloomConfig(
        vocab_size=97, hidden_size=64, n_head=4, n_layer=2, hidden_dropout=0.0,
        attention_dropout=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=PAD_ID,
        layer_norm_epsilon=1e-5, tie_word_embeddings=False,
    )
    # (A head tied to random embeddings behind a LayerNorm only repeats the last token.)
    return dict(cls=BloomForCausalLM, cfg=cfg, causal=True, output="logits", max_ranks=4,
                tied=False, tie_pairs=[])

def falcon_spec_of(**architecture):
    """A tiny rotary Falcon (4 heads of 16, 2 layers, MLP 96, vocabulary 97) of the given
    architecture flags."""
    cfg = FalconConfig(
        vocab_size=97, hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
        alibi=False, ffn_hidden_size=96, max_position_embeddings=64, hidden_dropout=0.0,
        attention_dropout=0.0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        **architecture,
    )
    return dict(cls=FalconForCausalLM, cfg=cfg, causal=True, output="logits", max_ranks=4,
                tied=False, tie_pairs=[])


def falcon_spec(out: Path):
    # The new decoder architecture: q/k/v fused by key/value group (2 groups of 2 query heads),
    # attention and MLP in parallel on LayerNorms of their own, rotary, no biases.
    return falcon_spec_of(num_kv_heads=2, new_decoder_architecture=True, parallel_attn=True,
                          bias=False)


def falcon_mq_spec(out: Path):
    # Falcon-7B's architecture: multi-query attention (q heads, then the one key and value),
    # attention and MLP in parallel on one shared LayerNorm, no biases.
    return falcon_spec_of(new_decoder_architecture=False, multi_query=True, parallel_attn=True,
                          bias=False)


def falcon_sequential_spec(out: Path):
    # The original architecture without multi-query attention (q/k/v fused head by head) and
    # without parallel_attn: the MLP follows the attention on post_attention_layernorm.
    return falcon_spec_of(new_decoder_architecture=False, multi_query=False, parallel_attn=False,
                          bias=True)


# Encoder-decoder specs (make_seq2seq_fixture): `low` is the first token id that is not
# special (padding, bos, decoder start); reference inputs and prompts use ids >= low.

def bart_spec(out: Path):
    # Post-LayerNorm blocks, learned positions offset by 2, a LayerNorm on the embeddings
    # (layernorm_embedding), GELU, a tied LM head plus the final_logits_bias buffer.
    # eos_token_id is replaced by the one picked from the greedy continuation.
    # (With random weights behind these LayerNorms a tied head mostly repeats the last
    # token (small weights) or one token picked by the encoder output (larger ones);
    # few seeds give a varied continuation, hence the base seed in SEQ2SEQ_FIXTURES.)
    cfg = BartConfig(
        vocab_size=103, d_model=64, encoder_attention_heads=8, decoder_attention_heads=8,
        encoder_ffn_dim=96, decoder_ffn_dim=96, encoder_layers=2, decoder_layers=2,
        max_position_embeddings=64, activation_function="gelu", scale_embedding=False,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
        forced_eos_token_id=None,
    )
    return dict(
        cls=BartForConditionalGeneration, cfg=cfg, max_ranks=4, tied=True,
        tie_pairs=[("lm_head.weight", "model.shared.weight"),
                   ("model.encoder.embed_tokens.weight", "model.shared.weight"),
                   ("model.decoder.embed_tokens.weight", "model.shared.weight")],
        bias_buffers=["final_logits_bias"], std=0.25, low=3,
    )


def t5_cfg(feed_forward_proj: str, tie_word_embeddings: bool) -> T5Config:
    # Relative position buckets: 16 per direction in the encoder (8 exact, then
    # logarithmic up to relative_attention_max_distance), 32 one-way in the decoder
    # (16 exact: the decoder sequences here stay within those).
    return T5Config(
        vocab_size=103, d_model=64, d_kv=8, num_heads=8, d_ff=96, num_layers=2,
        num_decoder_layers=2, relative_attention_num_buckets=32, relative_attention_max_distance=20,
        feed_forward_proj=feed_forward_proj, tie_word_embeddings=tie_word_embeddings,
        dropout_rate=0.0, layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0,
    )


# 24 encoder tokens: distances up to 23 pass relative_attention_max_distance (20).
T5_SEQ_LEN = 24
T5_ROW1_REAL = 15
T5_TIE_PAIRS = [("lm_head.weight", "shared.weight"),
                ("encoder.embed_tokens.weight", "shared.weight"),
                ("decoder.embed_tokens.weight", "shared.weight")]


def t5_spec(out: Path):
    # Original T5: RMSNorm without mean or bias, ReLU, unscaled attention scores, and a
    # head tied to the embeddings whose input is scaled by d_model**-0.5, so that the
    # logits std is about the weight std: a larger one keeps it in range (and makes
    # much of the unscaled attention nearly one-hot).
    return dict(cls=T5ForConditionalGeneration, cfg=t5_cfg("relu", True), max_ranks=4,
                tied=True, tie_pairs=T5_TIE_PAIRS, std=0.35, low=2,
                seq_len=T5_SEQ_LEN, row1_real=T5_ROW1_REAL)


def t5_gated_spec(out: Path):
    # T5 v1.1: gated GELU (tanh approximation), an untied head and no output scaling.
    return dict(cls=T5ForConditionalGeneration, cfg=t5_cfg("gated-gelu", False), max_ranks=4,
                tied=False, tie_pairs=T5_TIE_PAIRS[:1], low=2,
                seq_len=T5_SEQ_LEN, row1_real=T5_ROW1_REAL)


FIXTURES = {
    # name: (spec builder, base seed)
    "gpt2": (gpt2_spec, 1000),
    "llama": (llama_spec, 2000),
    "smollm_like": (smollm_spec, 3000),
    "mistral": (mistral_spec, 4000),
    "qwen2": (qwen2_spec, 5000),
    "bert": (bert_spec, 6000),
    "bert_mlm": (bert_mlm_spec, 7000),
    "roberta": (roberta_spec, 8000),
    "distilbert": (distilbert_spec, 9000),
    "electra": (electra_spec, 10000),
    "albert": (albert_spec, 11000),
    "gpt_bigcode": (gpt_bigcode_spec, 12000),
    "opt": (opt_spec, 13000),
    "gpt_neo": (gpt_neo_spec, 14000),
    "phi": (phi_spec, 15000),
    "gptj": (gptj_spec, 16000),
    "gpt_neox": (gpt_neox_spec, 17000),
    "bloom": (bloom_spec, 18000),
    "falcon": (falcon_spec, 19000),
    "falcon_mq": (falcon_mq_spec, 23000),
    "falcon_sequential": (falcon_sequential_spec, 24000),
}


# --------------------------------------------------------------------------
# Today's Llama-style families (issue 15), written with transformers 5.25.0.
# Each is 4 query heads over 2 key/value heads (4 ranks go beyond the key/value
# heads) unless noted, 64 wide, vocabulary 97-107; each turns the switches its
# family is known for, with values small enough to matter in 10 positions.
# --------------------------------------------------------------------------

TODAY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
             num_hidden_layers=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
             eos_token_id=2)


def today_spec(cls, cfg, tied, **extra):
    return dict(cls=cls, cfg=cfg, causal=True, output="logits", max_ranks=4, tied=tied,
                tie_pairs=[("lm_head.weight", "model.embed_tokens.weight")], **extra)


def llama3_spec(out: Path):
    # Llama 3.2's llama3 rotary scaling with an original context of 16 positions, so that
    # head_dim 8's four frequencies fall in each of its three bands; tied embeddings.
    cfg = LlamaConfig(**{**TODAY, "num_attention_heads": 8}, vocab_size=103, tie_word_embeddings=True,
                      rms_norm_eps=1e-5,
                      rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                           low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=16))
    return today_spec(LlamaForCausalLM, cfg, True)


def qwen3_spec(out: Path):
    # q/k RMSNorm per head, head_dim 24 independent of 64 / 4, the last two of three layers
    # sliding (window 4), YaRN scaling.
    cfg = Qwen3Config(**{**TODAY, "num_hidden_layers": 3}, vocab_size=107, head_dim=24,
                      tie_word_embeddings=True, rms_norm_eps=1e-6, use_sliding_window=True,
                      sliding_window=4, max_window_layers=1,
                      rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                           original_max_position_embeddings=32))
    return today_spec(Qwen3ForCausalLM, cfg, True)


def gemma_spec(out: Path):
    # (1 + w) RMSNorm, embeddings times sqrt(64), tanh GELU, one key/value head of 32.
    cfg = GemmaConfig(**{**TODAY, "num_key_value_heads": 1}, vocab_size=101, head_dim=32,
                      tie_word_embeddings=True, rms_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")
    return today_spec(GemmaForCausalLM, cfg, True)


def gemma2_spec(out: Path):
    # Sandwich norms, attention and final soft-capping low enough to bite, query_pre_attn_scalar
    # 24, alternating sliding (window 4) and global layers.
    cfg = Gemma2Config(**{**TODAY, "num_hidden_layers": 3}, vocab_size=97, head_dim=16,
                       tie_word_embeddings=True, rms_norm_eps=1e-6, sliding_window=4,
                       query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
                       final_logit_softcapping=5.0)
    return today_spec(Gemma2ForCausalLM, cfg, True)


def gemma3_spec(out: Path):
    # q/k norms, sliding layers on their own rotary base, global layers with linear scaling.
    cfg = Gemma3TextConfig(**{**TODAY, "num_hidden_layers": 3}, vocab_size=97, head_dim=16,
                           tie_word_embeddings=True, rms_norm_eps=1e-6, sliding_window=4,
                           query_pre_attn_scalar=16,
                           layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                           rope_parameters={
                               "full_attention": dict(rope_type="linear", factor=8.0, rope_theta=1000000.0),
                               "sliding_attention": dict(rope_type="default", rope_theta=10000.0),
                           })
    return today_spec(Gemma3ForCausalLM, cfg, True)


def phi3_spec(out: Path):
    # Fused qkv_proj and gate_up_proj, Phi-4-mini's partial rotary (0.75 of 16 = 12 dims)
    # with longrope; an original context of 4 so every reference input uses the long factors.
    g = torch.Generator().manual_seed(15)
    factors = lambda: [round(1.0 + 3.0 * x, 4) for x in torch.rand(6, generator=g).tolist()]  # noqa: E731
    cfg = Phi3Config(**TODAY, vocab_size=101, tie_word_embeddings=True, rms_norm_eps=1e-5,
                     original_max_position_embeddings=4, sliding_window=None,
                     rope_parameters=dict(rope_type="longrope", rope_theta=10000.0,
                                          partial_rotary_factor=0.75, short_factor=factors(),
                                          long_factor=factors()))
    return today_spec(Phi3ForCausalLM, cfg, True)


def smollm3_spec(out: Path):
    # Every second layer without rotary positions (NoPE).
    cfg = SmolLM3Config(**{**TODAY, "num_hidden_layers": 4}, vocab_size=97, tie_word_embeddings=True,
                        rms_norm_eps=1e-6, no_rope_layer_interval=2, rope_theta=100000.0)
    return today_spec(SmolLM3ForCausalLM, cfg, True)


def olmo2_spec(out: Path):
    # Norms after attention and MLP, q/k RMSNorm over the whole projection.
    cfg = Olmo2Config(**TODAY, vocab_size=97, tie_word_embeddings=False, rms_norm_eps=1e-6)
    return today_spec(Olmo2ForCausalLM, cfg, False)


def stablelm_spec(out: Path):
    # LayerNorm, rotary on a quarter of each head, q/k/v biases, per-head q/k LayerNorms,
    # attention and MLP in parallel.
    cfg = StableLmConfig(**TODAY, vocab_size=97, tie_word_embeddings=False, layer_norm_eps=1e-5,
                         partial_rotary_factor=0.25, use_qkv_bias=True, qk_layernorm=True,
                         use_parallel_residual=True)
    return today_spec(StableLmForCausalLM, cfg, False)


def granite_spec(out: Path):
    # Embedding, attention, residual and logit multipliers; dynamic NTK scaling past a context
    # of 8 (the reference batch has 10 positions, generation reaches 17).
    cfg = GraniteConfig(**{**TODAY, "max_position_embeddings": 8}, vocab_size=97,
                        tie_word_embeddings=True, rms_norm_eps=1e-6, embedding_multiplier=0.5,
                        attention_multiplier=0.2, residual_multiplier=1.5, logits_scaling=2.0,
                        rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0))
    return today_spec(GraniteForCausalLM, cfg, True)


def starcoder2_spec(out: Path):
    # LayerNorm with biases, biased projections, plain tanh-GELU MLP (c_fc, c_proj), window 4.
    cfg = Starcoder2Config(**TODAY, vocab_size=97, tie_word_embeddings=True, norm_epsilon=1e-5,
                           use_bias=True, sliding_window=4, hidden_act="gelu_pytorch_tanh")
    return today_spec(Starcoder2ForCausalLM, cfg, True, sliding_window=4)


def cohere_spec(out: Path):
    # Parallel block on one bias-free LayerNorm, interleaved rotary, per-head q/k LayerNorms,
    # logit scale.
    cfg = CohereConfig(**TODAY, vocab_size=97, tie_word_embeddings=True, layer_norm_eps=1e-5,
                       use_qk_norm=True, logit_scale=0.5)
    return today_spec(CohereForCausalLM, cfg, True)


# Mixtures of experts (issue 20): tiny expert widths that 3 ranks split unevenly; routers drawn
# wider than the other weights so that each token's top-k experts stand clear of the rest.
ROUTER_STD = 1.0


def moe_spec(cls, cfg, tied):
    return today_spec(cls, cfg, tied, router_std=ROUTER_STD)


def mixtral_spec(out: Path):
    # 6 experts of width 40, top 2, renormalised (always, in Mixtral); untied head.
    cfg = MixtralConfig(**TODAY, vocab_size=101, num_local_experts=6, num_experts_per_tok=2,
                        rms_norm_eps=1e-5, tie_word_embeddings=False,
                        rope_parameters=dict(rope_type="default", rope_theta=10000.0))
    cfg.intermediate_size = 40
    return moe_spec(MixtralForCausalLM, cfg, False)


def qwen3_moe_spec(out: Path):
    # q/k norms as Qwen3's, 8 experts of width 24, top 2 without renormalisation
    # (norm_topk_prob false), three layers of which the middle one is dense (mlp_only_layers,
    # its MLP 96 wide); tied embeddings.
    cfg = Qwen3MoeConfig(**{**TODAY, "num_hidden_layers": 3}, vocab_size=103, num_experts=8,
                         num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=False,
                         mlp_only_layers=[1], decoder_sparse_step=1, tie_word_embeddings=True,
                         rms_norm_eps=1e-6, use_sliding_window=False,
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0))
    return moe_spec(Qwen3MoeForCausalLM, cfg, True)


def qwen2_moe_spec(out: Path):
    # Qwen2's q/k/v biases, 8 experts of width 20, top 2 without renormalisation (norm_topk_prob
    # false, the default), a shared expert of width 40 (neither the experts' nor the dense
    # MLP's) behind its sigmoid gate; three layers of which the middle one is dense
    # (mlp_only_layers, its MLP 96 wide); untied head.
    cfg = Qwen2MoeConfig(**{**TODAY, "num_hidden_layers": 3}, vocab_size=99, num_experts=8,
                         num_experts_per_tok=2, moe_intermediate_size=20,
                         shared_expert_intermediate_size=40, norm_topk_prob=False,
                         mlp_only_layers=[1], decoder_sparse_step=1, qkv_bias=True,
                         tie_word_embeddings=False, rms_norm_eps=1e-6, use_sliding_window=False,
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0))
    return moe_spec(Qwen2MoeForCausalLM, cfg, False)


def olmoe_spec(out: Path):
    # OLMo 2's q/k RMSNorm over the whole projection (pre-norm blocks, though), q/k/v clipped
    # to [-0.5, 0.5] after it (clip_qkv), 8 experts of width 28 (uneven at 3 ranks), top 2
    # renormalised (norm_topk_prob true) on all three layers; untied head.
    cfg = OlmoeConfig(**{**TODAY, "num_hidden_layers": 3, "intermediate_size": 28},
                      vocab_size=105, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                      clip_qkv=0.5, tie_word_embeddings=False, rms_norm_eps=1e-5,
                      rope_parameters=dict(rope_type="default", rope_theta=10000.0))
    return moe_spec(OlmoeForCausalLM, cfg, False)


TODAY_FIXTURES = {
    "llama3": (llama3_spec, 30000),
    "qwen3": (qwen3_spec, 31000),
    "gemma": (gemma_spec, 32000),
    "gemma2": (gemma2_spec, 33000),
    "gemma3": (gemma3_spec, 34000),
    "phi3": (phi3_spec, 35000),
    "smollm3": (smollm3_spec, 36000),
    "olmo2": (olmo2_spec, 37000),
    "stablelm": (stablelm_spec, 38000),
    "granite": (granite_spec, 39000),
    "starcoder2": (starcoder2_spec, 40000),
    "cohere": (cohere_spec, 41000),
    "mixtral": (mixtral_spec, 42000),
    "qwen3_moe": (qwen3_moe_spec, 43000),
    "qwen2_moe": (qwen2_moe_spec, 44000),
    "olmoe": (olmoe_spec, 45000),
}
FIXTURES.update(TODAY_FIXTURES)

SEQ2SEQ_FIXTURES = {
    # name: (spec builder, base seed)
    "bart": (bart_spec, 20810),  # the first varied continuation from 20000 on (see bart_spec)
    "t5": (t5_spec, 21000),
    "t5_gated": (t5_gated_spec, 22000),
}

MAX_SEED_TRIES = 20


# --------------------------------------------------------------------------
# Main per-fixture routine
# --------------------------------------------------------------------------


def build_model(spec, seed: int):
    torch.manual_seed(seed)
    cfg = spec["cfg"]
    # The config object carries the attention implementation.
    cfg._attn_implementation = "eager"
    model = spec["cls"](cfg)
    model.to(torch.float32)
    if spec["tied"] is False:
        # transformers 5 builds T5 with lm_head tied to shared.weight whatever
        # tie_word_embeddings says; loading unties them when the checkpoint holds both.
        params = dict(model.named_parameters(remove_duplicate=False))
        for a, b in spec["tie_pairs"]:
            if params[a].data_ptr() == params[b].data_ptr():
                mod_name, _, pname = a.rpartition(".")
                setattr(model.get_submodule(mod_name), pname, torch.nn.Parameter(params[a].detach().clone()))
    randomize_(model, seed + 1, spec.get("std", WEIGHT_STD))
    if "router_std" in spec:
        with torch.no_grad():
            gr = torch.Generator().manual_seed(seed + 4)
            for name, p in model.named_parameters():
                if name.endswith(".gate.weight"):  # a mixture of experts' router
                    p.copy_(spec["router_std"] * torch.randn(p.shape, generator=gr))
    g = torch.Generator().manual_seed(seed + 3)
    for bname in spec.get("bias_buffers", ()):  # buffers randomize_ does not reach
        buf = model.get_buffer(bname)
        buf.copy_(0.1 * torch.randn(buf.shape, generator=g, dtype=torch.float32))
    if spec["tied"]:
        model.tie_weights()
    if spec["tie_pairs"]:
        check_ties(model, bool(spec["tied"]), spec["tie_pairs"])
    model.eval()
    assert model.config._attn_implementation == "eager", model.config._attn_implementation
    return model


@torch.no_grad()
def sliding_window_check(model, ids: torch.Tensor, window: int, n_layers: int) -> None:
    """Changing token 0 must only influence positions < 1 + n_layers*(window-1)."""
    a = ids[:1].clone()
    b = a.clone()
    b[0, 0] = (b[0, 0] % (model.config.vocab_size - 1)) + 1
    if b[0, 0] == a[0, 0]:
        b[0, 0] = 1 if a[0, 0] != 1 else 2
    la = model(input_ids=a).logits[0]
    lb = model(input_ids=b).logits[0]
    reach = n_layers * (window - 1)  # positions 0..reach are affected
    diff = (la - lb).abs().amax(-1)
    assert (diff[: reach + 1] > 1e-6).all(), diff
    assert (diff[reach + 1:] == 0).all(), diff
    print(f"  sliding window check OK (token 0 affects positions 0..{reach} only)")


def fresh_dir(out_root: Path, name: str) -> Path:
    d = out_root / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    return d


def seeded_attempts(spec, base_seed: int):
    """Fresh models for successive seeds, each with its vocabulary size and the generator its
    inputs are drawn from."""
    for attempt in range(MAX_SEED_TRIES):
        seed = base_seed + 10 * attempt
        model = build_model(spec, seed)
        yield seed, model, model.config.vocab_size, torch.Generator().manual_seed(seed + 2)


def make_fixture(name: str, out_root: Path) -> Path:
    builder, base_seed = FIXTURES[name]
    d = fresh_dir(out_root, name)
    spec = builder(d)
    print(f"[{name}] {spec['cls'].__name__}")

    chosen = None
    for seed, model, vocab, gen in seeded_attempts(spec, base_seed):
        if "inputs" in spec:
            ids, mask, prompt = spec["inputs"](gen)
        else:
            ids, mask = make_batch(gen, vocab)
            prompt = torch.randint(1, vocab, (1, PROMPT_LEN), generator=gen, dtype=torch.int64)

        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask)
        ref = getattr(out, spec["output"]).detach().clone().float()
        pooled = getattr(out, "pooler_output", None)
        if not torch.isfinite(ref).all():
            raise RuntimeError("non-finite outputs")

        if not spec["causal"]:
            chosen = dict(seed=seed, model=model, ids=ids, mask=mask, ref=ref, pooled=pooled)
            break

        free = generate_new(model, prompt, greedy_config(None, bos=spec.get("bos")))[0].tolist()
        assert len(free) == MAX_NEW, free
        if len(set(free)) < 5:
            print(f"  seed {seed}: generation too repetitive {free}, retrying")
            continue
        avoid = {PAD_ID, model.config.bos_token_id, spec.get("bos")} - {None}
        pos = pick_eos(free, avoid)
        if pos is None:
            print(f"  seed {seed}: no suitable eos position in {free}, retrying")
            continue
        chosen = dict(seed=seed, model=model, ids=ids, mask=mask, ref=ref, prompt=prompt,
                      free=free, eos_pos=pos, eos=free[pos])
        break
    if chosen is None:
        raise RuntimeError(f"{name}: no suitable seed found")

    model = chosen["model"]
    ref = chosen["ref"]
    tensors = {
        "input_ids": chosen["ids"].contiguous(),
        "attention_mask": chosen["mask"].contiguous(),
        spec["output"]: ref.contiguous(),
    }
    meta_extra = {}
    if chosen.get("pooled") is not None:  # BertModel: extra, optional check
        tensors["pooler_output"] = chosen["pooled"].detach().clone().float().contiguous()

    if spec.get("sliding_window"):
        sliding_window_check(model, chosen["ids"], spec["sliding_window"], model.config.num_hidden_layers)

    if spec["causal"]:
        eos = chosen["eos"]
        prompt = chosen["prompt"]
        model.config.eos_token_id = eos
        if spec.get("bos") is not None:
            model.config.bos_token_id = spec["bos"]
        stop, mn = checked_greedy(model, prompt, chosen,
                                   lambda min_new: greedy_config(eos, min_new, bos=spec.get("bos")))
        tensors["generate_input_ids"] = prompt.contiguous()
        tensors["generate_output_ids"] = stop.contiguous()
        tensors["generate_min_output_ids"] = mn.contiguous()
        # The generation config that will be saved alongside the checkpoint.
        model.generation_config = greedy_config(eos, bos=spec.get("bos"))
        model.generation_config.max_new_tokens = None  # not part of the checkpoint default
        meta_extra.update(
            eos_token_id=eos,
            eos_position=chosen["eos_pos"],
            generate_no_eos_ids=chosen["free"],
        )
        print(f"  greedy (no eos): {chosen['free']}")
        print(f"  eos = {eos} (position {chosen['eos_pos']}), stop: {stop[0].tolist()}")
        print(f"  min_new_tokens=12: {mn[0].tolist()}")

    # ---- save checkpoint
    save_kwargs = {}
    if spec.get("shards"):
        lo, hi = spec["shards"]
        total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        for div in (2.5, 2.2, 2.8, 2.0, 3.0, 1.8):
            cand = int(total / div)
            tmp = d / "_shard_probe"
            model.save_pretrained(tmp, max_shard_size=cand)
            n = len(list(tmp.glob("model-*.safetensors")))
            shutil.rmtree(tmp)
            if lo <= n <= hi:
                save_kwargs["max_shard_size"] = cand
                break
        else:
            raise RuntimeError("could not find a max_shard_size giving the wanted shard count")
    model.save_pretrained(d, **save_kwargs)
    meta_extra["seed"] = chosen["seed"]
    if save_kwargs:
        meta_extra["max_shard_size"] = save_kwargs["max_shard_size"]

    # ---- extra files (tokenizer)
    if "extra" in spec:
        meta_extra.update(spec["extra"](d))

    save_file(tensors, str(d / "reference.safetensors"), metadata={"format": "pt"})

    # ---- checks on what was written
    cfg_json = json.loads((d / "config.json").read_text())
    if spec["causal"]:
        assert cfg_json.get("eos_token_id") == chosen["eos"], cfg_json.get("eos_token_id")
        gcj = json.loads((d / "generation_config.json").read_text())
        assert gcj.get("eos_token_id") == chosen["eos"] and not gcj.get("do_sample", False), gcj
    shard_files = sorted(p.name for p in d.glob("*.safetensors") if p.name != "reference.safetensors")
    if spec.get("shards"):
        assert (d / "model.safetensors.index.json").exists()
    keys = set()
    for f in shard_files:
        keys |= set(load_file(str(d / f)).keys())
    reloaded = spec["cls"].from_pretrained(d, attn_implementation="eager", torch_dtype=torch.float32).eval()
    if spec["tie_pairs"]:
        check_ties(reloaded, bool(spec["tied"]), spec["tie_pairs"])
    with torch.no_grad():
        r2 = getattr(reloaded(input_ids=chosen["ids"], attention_mask=chosen["mask"]), spec["output"])
    if not torch.equal(r2, ref):
        raise RuntimeError(f"reloaded model output differs: max {float((r2 - ref).abs().max())}")
    if spec["causal"]:
        # Reloaded model with its saved generation_config must reproduce the stopping run.
        with torch.no_grad():
            seq = reloaded.generate(input_ids=chosen["prompt"], attention_mask=torch.ones_like(chosen["prompt"]),
                                    max_new_tokens=MAX_NEW)
        assert torch.equal(seq[:, PROMPT_LEN:], tensors["generate_output_ids"]), seq

    ref_stats = ref.masked_select(chosen["mask"].bool()[..., None].expand_as(ref))
    print(f"  {spec['output']} {tuple(ref.shape)}: std {ref_stats.std():.3f}, "
          f"absmax {ref_stats.abs().max():.3f}; shards/weights: {shard_files}; "
          f"{len(keys)} tensors saved")
    if not (0.3 < float(ref_stats.std()) < 10.0):
        raise RuntimeError(f"{name}: reference output std {float(ref_stats.std())} out of range")

    meta = {
        "architecture": spec["cls"].__name__,
        "output": spec["output"],
        "max_ranks": spec["max_ranks"],
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "tokenizers_version": __import__("tokenizers").__version__,
        "pad_token_id": PAD_ID,
        "output_std": round(float(ref_stats.std()), 4),
        **meta_extra,
    }
    (d / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return d


def make_seq2seq_fixture(name: str, out_root: Path) -> Path:
    """Encoder-decoder fixture: logits for given decoder inputs, the encoder output and
    greedy generation (its tokens after the decoder start token)."""
    builder, base_seed = SEQ2SEQ_FIXTURES[name]
    d = fresh_dir(out_root, name)
    spec = builder(d)
    print(f"[{name}] {spec['cls'].__name__}")
    cfg = spec["cfg"]
    pad, start, low = cfg.pad_token_id, cfg.decoder_start_token_id, spec["low"]
    bos = getattr(cfg, "bos_token_id", None)  # T5Config has none

    def gconf(eos, min_new_tokens=None) -> GenerationConfig:
        return greedy_config(eos, min_new_tokens, bos=bos, pad=pad, decoder_start=start)

    chosen = None
    for seed, model, vocab, gen in seeded_attempts(spec, base_seed):
        ids, mask = make_batch(gen, vocab, spec.get("seq_len", SEQ_LEN), spec.get("row1_real", ROW1_REAL),
                               pad, low)
        dec = torch.randint(low, vocab, (2, DEC_LEN), generator=gen, dtype=torch.int64)
        dec[:, 0] = start
        prompt = torch.randint(low, vocab, (1, PROMPT_LEN), generator=gen, dtype=torch.int64)

        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
        ref = out.logits.detach().clone().float()
        enc = out.encoder_last_hidden_state.detach().clone().float()
        if not (torch.isfinite(ref).all() and torch.isfinite(enc).all()):
            raise RuntimeError("non-finite outputs")

        free = generate_new(model, prompt, gconf(None))[0].tolist()
        assert len(free) == MAX_NEW, free
        if len(set(free)) < 5:
            print(f"  seed {seed}: generation too repetitive {free}, retrying")
            continue
        pos = pick_eos(free, {pad, bos, start} - {None})
        if pos is None:
            print(f"  seed {seed}: no suitable eos position in {free}, retrying")
            continue
        chosen = dict(seed=seed, model=model, ids=ids, mask=mask, dec=dec, ref=ref, enc=enc,
                      prompt=prompt, free=free, eos_pos=pos, eos=free[pos])
        break
    if chosen is None:
        raise RuntimeError(f"{name}: no suitable seed found")

    model, prompt, eos = chosen["model"], chosen["prompt"], chosen["eos"]
    model.config.eos_token_id = eos
    stop, mn = checked_greedy(model, prompt, chosen, lambda min_new: gconf(eos, min_new))
    # Beam search (3 beams), and a greedy batch of two prompts, the second right-padded.
    beam_config = gconf(eos)
    beam_config.num_beams = 3
    beam = generate_new(model, prompt, beam_config)
    batch = torch.cat([prompt, prompt.flip(1)])
    batch_mask = torch.ones_like(batch)
    batch[1, BATCH_ROW1_REAL:], batch_mask[1, BATCH_ROW1_REAL:] = pad, 0
    with torch.no_grad():
        batch_out = model.generate(input_ids=batch, attention_mask=batch_mask,
                                   generation_config=gconf(eos))[:, 1:].clone()
    ref = chosen["ref"]
    tensors = {
        "input_ids": chosen["ids"].contiguous(),
        "attention_mask": chosen["mask"].contiguous(),
        "decoder_input_ids": chosen["dec"].contiguous(),
        "logits": ref.contiguous(),
        "encoder_last_hidden_state": chosen["enc"].contiguous(),
        "generate_input_ids": prompt.contiguous(),
        "generate_output_ids": stop.contiguous(),
        "generate_min_output_ids": mn.contiguous(),
        "generate_beam_output_ids": beam.contiguous(),
        "generate_batch_input_ids": batch.contiguous(),
        "generate_batch_attention_mask": batch_mask.contiguous(),
        "generate_batch_output_ids": batch_out.contiguous(),
    }
    print(f"  greedy (no eos): {chosen['free']}")
    print(f"  eos = {eos} (position {chosen['eos_pos']}), stop: {stop[0].tolist()}")
    print(f"  min_new_tokens=12: {mn[0].tolist()}")
    print(f"  3 beams: {beam[0].tolist()}; batch: {batch_out.tolist()}")

    # ---- save checkpoint (its generation config: greedy, without a max_new_tokens default)
    model.generation_config = gconf(eos)
    model.generation_config.max_new_tokens = None
    model.save_pretrained(d)
    save_file(tensors, str(d / "reference.safetensors"), metadata={"format": "pt"})

    # ---- checks on what was written
    cfg_json = json.loads((d / "config.json").read_text())
    assert (cfg_json.get("eos_token_id"), cfg_json.get("decoder_start_token_id")) == (eos, start), cfg_json
    gcj = json.loads((d / "generation_config.json").read_text())
    assert (gcj.get("eos_token_id"), gcj.get("decoder_start_token_id")) == (eos, start), gcj
    assert not gcj.get("do_sample", False), gcj
    keys = set(load_file(str(d / "model.safetensors")).keys())
    reloaded = spec["cls"].from_pretrained(d, attn_implementation="eager", dtype=torch.float32).eval()
    check_ties(reloaded, bool(spec["tied"]), spec["tie_pairs"])
    with torch.no_grad():
        r2 = reloaded(input_ids=chosen["ids"], attention_mask=chosen["mask"], decoder_input_ids=chosen["dec"])
    if not (torch.equal(r2.logits, ref) and torch.equal(r2.encoder_last_hidden_state, chosen["enc"])):
        raise RuntimeError(f"reloaded model output differs: max {float((r2.logits - ref).abs().max())}")
    # Reloaded model with its saved generation_config must reproduce the stopping run.
    with torch.no_grad():
        seq = reloaded.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=MAX_NEW)
    assert seq[0, 0] == start and torch.equal(seq[:, 1:], stop), seq

    std = float(ref.std())
    print(f"  logits {tuple(ref.shape)}: std {std:.3f}, absmax {ref.abs().max():.3f}; "
          f"encoder_last_hidden_state {tuple(chosen['enc'].shape)}; {len(keys)} tensors saved")
    if not (0.3 < std < 10.0):
        raise RuntimeError(f"{name}: reference output std {std} out of range")

    meta = {
        "architecture": spec["cls"].__name__,
        "output": "logits",
        "max_ranks": spec["max_ranks"],
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "tokenizers_version": __import__("tokenizers").__version__,
        "pad_token_id": pad,
        "decoder_start_token_id": start,
        "output_std": round(std, 4),
        "eos_token_id": eos,
        "eos_position": chosen["eos_pos"],
        "generate_no_eos_ids": chosen["free"],
        "seed": chosen["seed"],
    }
    (d / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return d


# --------------------------------------------------------------------------
# GGUF fixtures (tests/fixtures/gguf/): `--only gguf_quant_types gguf_tiny_llama`
# --------------------------------------------------------------------------
#
# Needs the `gguf` package (gguf-py, llama.cpp's Python library), imported only
# here so that the Hugging Face fixtures above do not depend on it. Both parts
# write into the same directory and touch only their own files.

GGUF_DIR_NAME = "gguf"
GGUF_QUANT_SHAPE = (4, 512)   # rows, cols: two 256-element super-blocks per row
GGUF_QUANT_SEED = 8000
GGUF_LLAMA_SEED = 9000

# Byte offsets of the f16 scale fields inside one block of each ggml type; the
# rest of a random raw block is arbitrary bytes, which are all valid.
GGUF_F16_FIELDS = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
}
# Types gguf-py can quantize (the others only dequantize): written both from
# quantized random data and as random raw blocks (`<name>_raw`).
GGUF_QUANTIZABLE = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
GGUF_K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHAT_MESSAGES = [
    {"role": "system", "content": "You are a fox."},
    {"role": "user", "content": "Say hi."},
]


def _gguf():
    try:
        import gguf  # noqa: PLC0415
    except ImportError as e:  # pragma: no cover
        raise SystemExit("the GGUF fixtures need the `gguf` package: pip install gguf") from e
    return gguf


def gguf_special_floats() -> np.ndarray:
    """Edge values put at the start of the float tensors (exact in f32)."""
    return np.array(
        [0.0, -0.0, 1.0, -2.5, 65504.0, -65504.0, 6e-8, -3e-5, 1e-40, 3.0e38, np.inf, -np.inf],
        dtype=np.float32,
    )


def gguf_raw_blocks(qtype, rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """Random but valid blocks of `qtype` as uint8 [rows, cols/bs*ts]: random bytes
    everywhere except the f16 scales, which are finite (a few special ones first)."""
    gguf = _gguf()
    bs, ts = gguf.GGML_QUANT_SIZES[qtype]
    nb = cols // bs
    blocks = rng.integers(0, 256, size=(rows, nb, ts), dtype=np.uint8)
    for off in GGUF_F16_FIELDS[qtype.name]:
        scales = rng.uniform(-0.05, 0.05, size=(rows, nb)).astype(np.float16)
        # zero, a subnormal, a negative and the largest f16 in the first row
        specials = np.array([0.0, 2.0 ** -20, -0.75, 65504.0], dtype=np.float16)
        k = min(nb, len(specials))
        scales[0, :k] = specials[:k]
        blocks[:, :, off:off + 2] = scales.view(np.uint8).reshape(rows, nb, 2)
    return blocks.reshape(rows, nb * ts)


def gguf_quant_types(out: Path) -> list[Path]:
    """quant_types.gguf + quant_types_reference.safetensors (gguf-py's dequantization)."""
    gguf = _gguf()
    T = gguf.GGMLQuantizationType
    rng = np.random.default_rng(GGUF_QUANT_SEED)
    rows, cols = GGUF_QUANT_SHAPE
    path = out / "quant_types.gguf"
    w = gguf.GGUFWriter(str(path), arch="quanttest")
    w.add_custom_alignment(64)  # not the default 32: the reader must honour the key
    # One key of every metadata value type, for the reader's tests.
    w.add_uint8("test.u8", 200)
    w.add_int8("test.i8", -100)
    w.add_uint16("test.u16", 60000)
    w.add_int16("test.i16", -30000)
    w.add_uint32("test.u32", 4_000_000_000)
    w.add_int32("test.i32", -2_000_000_000)
    w.add_uint64("test.u64", 2**63 + 5)
    w.add_int64("test.i64", -(2**62))
    w.add_float32("test.f32", 0.1)
    w.add_float64("test.f64", 0.1)
    w.add_bool("test.bool", True)
    w.add_string("test.string", "h\u00e9llo \u2713")
    w.add_array("test.array_i32", [1, -2, 3])
    w.add_array("test.array_str", ["a", "bc", ""])
    w.add_array("test.array_nested", [[1, 2], [3]])

    refs: dict[str, np.ndarray] = {}

    def add(name: str, data: np.ndarray, qtype, ref: np.ndarray) -> None:
        if qtype in (T.F32, T.F16):
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_dtype=qtype)
        refs[name] = np.ascontiguousarray(ref, dtype=np.float32)

    def normal(shape) -> np.ndarray:
        x = rng.standard_normal(shape).astype(np.float32)
        x.reshape(-1, x.shape[-1])[0, : min(32, x.shape[-1])] = 0.0  # an all-zero block
        x.reshape(-1)[40] = 7.5                                      # an outlier
        return x

    # Plain float types, with edge values in row 0.
    x = normal((rows, cols))
    x[0, 64:64 + len(gguf_special_floats())] = gguf_special_floats()
    add("f32", x, T.F32, gguf.quants.dequantize(x, T.F32))
    with np.errstate(over="ignore"):  # 3e38 becomes inf in f16, on purpose
        x16 = x.astype(np.float16)
    add("f16", x16, T.F16, gguf.quants.dequantize(x16, T.F16))
    xb = gguf.quants.quantize(x, T.BF16)
    add("bf16", xb, T.BF16, gguf.quants.dequantize(xb, T.BF16))
    # Other ranks: a 1-D tensor (one row) and a 3-D one.
    x1 = normal((64,))
    add("f32_1d", x1, T.F32, x1)
    x3 = normal((2, 3, 64))
    q3 = gguf.quants.quantize(x3, T.Q8_0)
    add("q8_0_3d", q3, T.Q8_0, gguf.quants.dequantize(q3, T.Q8_0))

    for tname in GGUF_QUANTIZABLE:
        qt = T[tname]
        q = gguf.quants.quantize(normal((rows, cols)), qt)
        add(tname.lower(), q, qt, gguf.quants.dequantize(q, qt))
        raw = gguf_raw_blocks(qt, rng, rows, cols)
        add(tname.lower() + "_raw", raw, qt, gguf.quants.dequantize(raw, qt))
    for tname in GGUF_K_QUANTS:  # gguf-py cannot quantize these: random raw blocks
        qt = T[tname]
        raw = gguf_raw_blocks(qt, rng, rows, cols)
        add(tname.lower(), raw, qt, gguf.quants.dequantize(raw, qt))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    # Check: gguf-py's reader sees the same tensors and bytes.
    reader = gguf.GGUFReader(str(path))
    assert len(reader.tensors) == len(refs), (len(reader.tensors), len(refs))
    for t in reader.tensors:
        got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(refs[t.name].shape)
        assert np.array_equal(got.view(np.uint32), refs[t.name].view(np.uint32)), t.name
    for name, ref in refs.items():
        if not np.isfinite(ref).all() and name not in ("f32", "f16", "bf16"):
            raise RuntimeError(f"{name}: non-finite reference values")

    ref_path = out / "quant_types_reference.safetensors"
    save_file({k: torch.from_numpy(v.copy()) for k, v in refs.items()}, str(ref_path),
              metadata={"format": "pt"})
    print(f"  {path.name}: {len(refs)} tensors ({', '.join(refs)}), alignment 64")
    return [path, ref_path]


# llama.cpp tensor names for the llama architecture (see gguf.rs: hf_tensor_name).
GGUF_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
GGUF_GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_name_of(hf_name: str) -> str:
    stem, suffix = hf_name.rsplit(".", 1)
    if stem.startswith("model.layers."):
        layer, part = stem[len("model.layers."):].split(".", 1)
        return f"blk.{layer}.{GGUF_LAYER_NAMES[part]}.{suffix}"
    return f"{GGUF_GLOBAL_NAMES[stem]}.{suffix}"


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (q_proj / k_proj rows, rotary layout)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def gguf_tiny_llama(out: Path) -> list[Path]:
    """tiny_llama_q8_0.gguf + tiny_llama_q8_0_reference.safetensors."""
    gguf = _gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    T = gguf.GGMLQuantizationType
    tok = build_byte_level_bpe(300)  # the gpt2 fixture's tokenizer
    tj = json.loads(tok.to_str())
    vocab = tj["model"]["vocab"]
    tokens = [""] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    assert all(tokens), "token ids are not contiguous"
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    special = {a["id"] for a in tj["added_tokens"] if a.get("special")}
    token_types = [3 if i in special else 1 for i in range(len(tokens))]  # 3 = CONTROL, 1 = NORMAL
    eot = tok.token_to_id("<|endoftext|>")

    # The smollm_like config (9 heads / 3 KV heads, head_dim 8, tied), with the tokenizer's vocab.
    cfg = LlamaConfig(
        vocab_size=len(tokens), hidden_size=72, num_attention_heads=9, num_key_value_heads=3,
        head_dim=8, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=128,
        tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5,
        bos_token_id=eot, eos_token_id=eot,
    )
    spec = dict(cls=LlamaForCausalLM, cfg=cfg, tied=True,
                tie_pairs=[("lm_head.weight", "model.embed_tokens.weight")])
    n_head, n_kv, head_dim = 9, 3, 8
    name = "tiny_llama_q8_0"
    path = out / f"{name}.gguf"

    for attempt in range(MAX_SEED_TRIES):
        seed = GGUF_LLAMA_SEED + 10 * attempt
        model = build_model(spec, seed)

        # ---- write the GGUF as llama.cpp's convert_hf_to_gguf.py --outtype q8_0 does
        w = gguf.GGUFWriter(str(path), arch="llama")
        w.add_name("tiny-llama")
        w.add_custom_alignment(32)  # the default, stated explicitly
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_rope_dimension_count(head_dim)
        w.add_head_count(n_head)
        w.add_head_count_kv(n_kv)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_rope_freq_base(100000.0)
        w.add_vocab_size(len(tokens))
        w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt2")  # GPT-2's split regex, which is what this BPE was trained with
        w.add_token_list(tokens)
        w.add_token_types(token_types)
        w.add_token_merges(merges)
        w.add_bos_token_id(eot)
        w.add_eos_token_id(eot)
        w.add_add_bos_token(False)
        w.add_chat_template(CHATML_TEMPLATE)

        expected: dict[str, torch.Tensor] = {}  # HF name -> weight as transformers should load it
        types: dict[str, str] = {}
        for hf_name, p in model.state_dict().items():
            if hf_name == "lm_head.weight":
                continue  # tied: llama.cpp writes no output.weight
            data = p.detach().numpy().astype(np.float32)
            if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                stored = llama_cpp_permute(data, n_head, n_head)
            elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                stored = llama_cpp_permute(data, n_head, n_kv)
            else:
                stored = data
            if stored.ndim == 1:
                qt, q = T.F32, stored
            elif stored.shape[-1] % 32 == 0:
                qt, q = T.Q8_0, gguf.quants.quantize(stored, T.Q8_0)
            else:  # llama.cpp's fallback when a row is not whole Q8_0 blocks
                qt, q = T.F16, stored.astype(np.float16)
            gname = gguf_name_of(hf_name)
            if qt in (T.F32, T.F16):
                w.add_tensor(gname, q)
            else:
                w.add_tensor(gname, q, raw_dtype=qt)
            types[gname] = qt.name
            deq = gguf.quants.dequantize(q, qt).reshape(stored.shape).astype(np.float32)
            # undo the permutation the way transformers does (reverse_permute)
            if hf_name.endswith("q_proj.weight") or hf_name.endswith("k_proj.weight"):
                nh = n_head if "q_proj" in hf_name else n_kv
                deq = deq.reshape(nh, head_dim // 2, 2, *deq.shape[1:]).swapaxes(2, 1).reshape(deq.shape)
            expected[hf_name] = torch.from_numpy(np.ascontiguousarray(deq))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

        # ---- reference: transformers loads (and dequantizes) the GGUF itself
        loaded = AutoModelForCausalLM.from_pretrained(
            str(out), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager",
        ).eval()
        assert type(loaded) is LlamaForCausalLM, type(loaded)
        lc = loaded.config
        got_cfg = (lc.hidden_size, lc.num_attention_heads, lc.num_key_value_heads,
                   getattr(lc, "head_dim", None), lc.intermediate_size, lc.num_hidden_layers,
                   lc.vocab_size, bool(lc.tie_word_embeddings))
        assert got_cfg == (72, 9, 3, 8, 96, 2, len(tokens), True), got_cfg
        check_ties(loaded, True, spec["tie_pairs"])
        sd = loaded.state_dict()
        for hf_name, exp in expected.items():
            if not torch.equal(sd[hf_name].float(), exp):
                raise RuntimeError(f"{hf_name}: transformers loaded different values than written "
                                   f"(max diff {float((sd[hf_name] - exp).abs().max())})")
        gen = torch.Generator().manual_seed(seed + 2)
        ids, mask = make_batch(gen, cfg.vocab_size)
        prompt = torch.randint(1, cfg.vocab_size, (1, PROMPT_LEN), generator=gen, dtype=torch.int64)
        with torch.no_grad():
            logits = loaded(input_ids=ids, attention_mask=mask).logits.detach().clone().float()
            hf_logits = model(input_ids=ids, attention_mask=mask).logits.float()
        if not torch.isfinite(logits).all():
            raise RuntimeError("non-finite logits")
        new = generate_new(loaded, prompt, greedy_config(None, bos=eot))
        free = new[0].tolist()
        assert len(free) == MAX_NEW, free
        assert manual_greedy(loaded, prompt, MAX_NEW) == free, "generate != manual greedy"
        if len(set(free)) < 5:
            print(f"  seed {seed}: generation too repetitive {free}, retrying")
            continue
        break
    else:
        raise RuntimeError(f"{name}: no suitable seed found")

    # ---- tokenizer and chat template as transformers reads them from the GGUF
    gtok = AutoTokenizer.from_pretrained(str(out), gguf_file=path.name)
    text_ids = gtok.encode(ROUNDTRIP_SENTENCE, add_special_tokens=False)
    assert text_ids == tok.encode(ROUNDTRIP_SENTENCE).ids, (text_ids, tok.encode(ROUNDTRIP_SENTENCE).ids)
    assert gtok.decode(text_ids) == ROUNDTRIP_SENTENCE
    rendered = gtok.apply_chat_template(CHAT_MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>system\nYou are a fox.<|im_end|>\n"), rendered

    diff = float((logits - hf_logits).abs().max())
    tensors = {
        "input_ids": ids.contiguous(),
        "attention_mask": mask.contiguous(),
        "logits": logits.contiguous(),
        "generate_input_ids": prompt.contiguous(),
        "generate_output_ids": new.contiguous(),
        "tokenizer_input_ids": torch.tensor([text_ids], dtype=torch.int64),
    }
    ref_path = out / f"{name}_reference.safetensors"
    save_file(tensors, str(ref_path), metadata={"format": "pt"})
    meta = {
        "gguf_file": path.name,
        "architecture": "LlamaForCausalLM",
        "seed": seed,
        "tensor_types": types,
        "eos_token_id": eot,
        "bos_token_id": eot,
        "pad_token_id": PAD_ID,
        "max_abs_logit_diff_vs_unquantized": round(diff, 6),
        "tokenizer_text": ROUNDTRIP_SENTENCE,
        "chat_messages": CHAT_MESSAGES,
        "chat_rendered": rendered,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "gguf_version": _dist_version("gguf"),
    }
    meta_path = out / f"{name}_meta.json"
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    ref_stats = logits.masked_select(mask.bool()[..., None].expand_as(logits))
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    print(f"  {path.name}: seed {seed}, tensor types {counts}")
    print(f"  logits {tuple(logits.shape)}: std {ref_stats.std():.3f}; max |GGUF - unquantized HF| = {diff:.4f}")
    print(f"  greedy (no eos): {free}")
    if not (0.3 < float(ref_stats.std()) < 10.0):
        raise RuntimeError(f"{name}: logits std {float(ref_stats.std())} out of range")
    return [path, ref_path, meta_path]


def _dist_version(dist: str) -> str:
    from importlib.metadata import version  # noqa: PLC0415
    return version(dist)


GGUF_FIXTURES = {
    "gguf_quant_types": gguf_quant_types,
    "gguf_tiny_llama": gguf_tiny_llama,
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--only", nargs="*", choices=list(FIXTURES) + list(SEQ2SEQ_FIXTURES) + list(GGUF_FIXTURES),
                    default=None)
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    np.random.seed(0)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")

    names = args.only or list(FIXTURES) + list(SEQ2SEQ_FIXTURES) + list(GGUF_FIXTURES)
    dirs = [make_fixture(n, args.out) for n in names if n in FIXTURES]
    dirs += [make_seq2seq_fixture(n, args.out) for n in names if n in SEQ2SEQ_FIXTURES]
    gguf_parts = [n for n in names if n in GGUF_FIXTURES]
    if gguf_parts:
        gguf_dir = args.out / GGUF_DIR_NAME
        gguf_dir.mkdir(parents=True, exist_ok=True)
        for n in gguf_parts:
            print(f"[{n}]")
            for f in GGUF_FIXTURES[n](gguf_dir):
                print(f"    {f.name}: {f.stat().st_size} bytes")
        dirs.append(gguf_dir)

    print("\nFixture sizes:")
    ok = True
    for d in dirs:
        size = dir_size(d)
        flag = "OK" if size < MAX_FIXTURE_BYTES else "TOO BIG"
        ok &= size < MAX_FIXTURE_BYTES
        print(f"  {d.name:12s} {size:9d} bytes ({size / 1024:.1f} KiB)  {flag}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
