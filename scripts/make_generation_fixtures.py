#!/usr/bin/env python3
"""Generation references from transformers for tests/fixtures/generation/.

Run by hand (not in CI) after scripts/make_fixtures.py, from anywhere:

    /root/.cache/pf-venv/bin/python scripts/make_generation_fixtures.py

It loads the committed tiny checkpoints of every family that generates and records what
`model.generate` returns for greedy decoding with `repetition_penalty` and
`no_repeat_ngram_size`, beam search (2 to 5 beams, several length penalties, with each returned
sequence's score) and a left-padded batch of prompts of different lengths. It also records the
output of transformers' logits processors and warpers on fixed logits (processors.json), which
the sampling unit tests compare against, and the log-probabilities of each returned token and of
the most likely tokens of each step (scores.json). `null` in a recorded score stands for -inf.
"""

from __future__ import annotations

import json
import sys
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, GenerationConfig  # noqa: E402
from transformers.generation.logits_process import (  # noqa: E402
    EncoderNoRepeatNGramLogitsProcessor,
    EncoderRepetitionPenaltyLogitsProcessor,
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    ExponentialDecayLengthPenalty,
    ForcedBOSTokenLogitsProcessor,
    ForcedEOSTokenLogitsProcessor,
    LogitNormalization,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    SuppressTokensAtBeginLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

transformers.logging.set_verbosity_error()

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
OUT = FIXTURES / "generation"
MODELS = ["llama", "gpt2", "mistral", "qwen2", "smollm_like"]
# Today's Llama-style families (issue 15), written with transformers 5.25.0.
TODAY_MODELS = ["llama3", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "smollm3", "olmo2", "stablelm",
                "granite", "starcoder2", "cohere"]
# Encoder-decoders: their processors see the decoder's tokens (start token and new tokens).
SEQ2SEQ_MODELS = ["t5", "bart"]
# Mixtures of experts (issue 20).
MOE_MODELS = ["mixtral", "qwen3_moe", "qwen2_moe", "olmoe"]
# The logits processors of issue 21 in generate, written to logits_processors.json.
PROCESSOR_MODELS = ["llama", "gpt2", "bart"]
# Log-probabilities of the chosen tokens and the most likely ones (issue 21), written to scores.json.
SCORE_MODELS = ["llama", "gpt2", "bart"]
PAD = 0


def listed(t: torch.Tensor):
    """A tensor as nested lists, -inf as None."""
    return [[None if math.isinf(v) and v < 0 else v for v in row] for row in t.tolist()]


def base_config(model, **options) -> GenerationConfig:
    eos = model.generation_config.eos_token_id
    config = GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=10, temperature=1.0, top_k=None, top_p=None,
        repetition_penalty=1.0, no_repeat_ngram_size=0, length_penalty=1.0, eos_token_id=eos,
        pad_token_id=PAD,
    )
    if model.config.is_encoder_decoder:
        config.decoder_start_token_id = model.config.decoder_start_token_id
    for key, value in options.items():
        setattr(config, key, value)
    return config


def model_and_prompts(name: str, seed: int):
    """The fixture `name` in f32, ready to generate, and a function that draws a random prompt of
    n ids (never the pad id 0) from a generator seeded with `seed`."""
    kind = AutoModelForSeq2SeqLM if name in SEQ2SEQ_MODELS else AutoModelForCausalLM
    model = kind.from_pretrained(FIXTURES / name, dtype=torch.float32)
    model.eval()
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    return model, lambda n: torch.randint(1, vocab, (n,), generator=gen).tolist()


def padded(model, prompts: list[list[int]]):
    """The prompts as `input_ids` and `attention_mask`, padded to one width, and that width: on
    the left for a decoder, on the right for an encoder, as their tokenizers pad them (BART's
    learned positions count from the first column, so left padding would shift them)."""
    width = max(len(p) for p in prompts)
    if model.config.is_encoder_decoder:
        ids = torch.tensor([p + [PAD] * (width - len(p)) for p in prompts])
        mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts])
    else:
        ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask, width


@torch.no_grad()
def run(model, prompts: list[list[int]], **options):
    """`generate` on padded prompts (on the left; an encoder's on the right); the new tokens of each returned sequence, cut after
    its first end-of-sequence, and the beam scores when beams are used."""
    config = base_config(model, **options)
    ids, mask, width = padded(model, prompts)
    model.generation_config = config
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                         return_dict_in_generate=True, output_scores=config.num_beams > 1)
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    # An encoder-decoder's sequences are the decoder's: its start token, then the new tokens.
    start = 1 if model.config.is_encoder_decoder else width
    sequences = []
    for row in out.sequences[:, start:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        sequences.append(row[:cut])
    case = {"prompts": prompts, "options": options, "sequences": sequences}
    if config.num_beams > 1:
        case["sequence_scores"] = out.sequences_scores.tolist()
    return case


@torch.no_grad()
def run_with_logprobs(model, prompts: list[list[int]], top: int, **options):
    """`run`, plus each returned sequence's log-probabilities under the model's distribution
    (the log-softmax of the raw logits, before any processor): transformers'
    `compute_transition_scores(sequences, outputs.logits, beam_indices, normalize_logits=True)`
    for the chosen tokens, and the `top` most likely tokens of the same step and row, as
    `[id, log-probability]` pairs, most likely first."""
    config = base_config(model, **options)
    ids, mask, width = padded(model, prompts)
    model.generation_config = config
    torch.manual_seed(0)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                         return_dict_in_generate=True, output_scores=True, output_logits=True)
    beam_indices = out.beam_indices if config.num_beams > 1 else None
    chosen = model.compute_transition_scores(out.sequences, out.logits, beam_indices, normalize_logits=True)
    steps = len(out.logits)
    logprobs = torch.stack([torch.log_softmax(step, dim=-1) for step in out.logits])  # [steps, rows, vocab]
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    new = out.sequences[:, out.sequences.shape[1] - steps:]
    case = {"prompts": prompts, "options": options, "top_logprobs": top, "sequences": [], "logprobs": []}
    for row, tokens in enumerate(new.tolist()):
        cut = next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))
        entries = []
        for step in range(cut):
            source = row if beam_indices is None else int(beam_indices[row, step])
            values, indices = torch.topk(logprobs[step, source], top)
            entries.append({
                "token": tokens[step],
                "logprob": float(chosen[row, step]),
                "top_logprobs": [[int(i), float(v)] for v, i in zip(values, indices)],
            })
        case["sequences"].append(tokens[:cut])
        case["logprobs"].append(entries)
    if config.num_beams > 1:
        case["sequence_scores"] = out.sequences_scores.tolist()
    return case


def score_model_cases(name: str) -> dict:
    """Log-probabilities with greedy decoding (alone, with a repetition penalty, which changes the
    choice but not the model's distribution, and a left-padded batch), sampling whose draw is certain
    (top-k 1 at temperature 0.7, seeded), and beams."""
    model, prompt = model_and_prompts(name, seed=33)
    one = [prompt(6)]
    cases = {
        "greedy": run_with_logprobs(model, one, 5),
        "greedy_repetition_penalty": run_with_logprobs(model, one, 3, repetition_penalty=1.5),
        "batched_greedy": run_with_logprobs(model, [prompt(3), prompt(7)], 2),
        "sampled_top_k_1": run_with_logprobs(model, one, 4, do_sample=True, temperature=0.7, top_k=1),
        "beams": run_with_logprobs(model, one, 3, num_beams=3, num_return_sequences=2, max_new_tokens=8),
        "beams_batched_length_penalty": run_with_logprobs(
            model, [prompt(4), prompt(5)], 1, num_beams=2, length_penalty=0.5, max_new_tokens=6),
    }
    return {"model": name, "eos_token_id": model.generation_config.eos_token_id, "pad_token_id": PAD,
            "cases": cases}


def score_cases() -> dict:
    return {
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "families": {name: score_model_cases(name) for name in SCORE_MODELS},
    }


def model_cases(name: str) -> dict:
    model, prompt = model_and_prompts(name, seed=7)
    one = [prompt(6)]
    cases = {
        "greedy": run(model, one),
        "repetition_penalty": run(model, one, repetition_penalty=1.5),
        "repetition_penalty_below_one": run(model, one, repetition_penalty=0.7),
        "no_repeat_ngram": run(model, one, no_repeat_ngram_size=2),
        "penalty_and_ngram": run(model, one, repetition_penalty=1.2, no_repeat_ngram_size=3),
        "min_new_tokens": run(model, one, min_new_tokens=8),
        "batched_greedy": run(model, [prompt(3), prompt(7), prompt(5)]),
        "batched_penalty": run(model, [prompt(4), prompt(6)], repetition_penalty=1.3, no_repeat_ngram_size=2),
    }
    for beams, penalty, early in [(2, 1.0, False), (3, 0.8, True), (4, 1.5, False), (5, 2.0, "never"), (4, 1.0, True)]:
        cases[f"beams_{beams}_lp_{penalty}_early_{early}"] = run(
            model, one, num_beams=beams, length_penalty=penalty, early_stopping=early,
            num_return_sequences=min(beams, 3), max_new_tokens=8)
    cases["beams_batched"] = run(model, [prompt(4), prompt(6)], num_beams=3, num_return_sequences=2,
                                 max_new_tokens=6)
    return {
        "model": name,
        "eos_token_id": model.generation_config.eos_token_id,
        "pad_token_id": PAD,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "cases": cases,
    }


def processor_model_cases(name: str) -> dict:
    """Cases of forced BOS/EOS tokens, suppressed tokens, min-p, epsilon cutoff, sequence biases,
    bad words, the exponential decay length penalty, renormalised beam scores, the encoder
    processors and max_time for one model; the suppressed tokens are those greedy decoding would choose, so that suppressing
    them changes the output."""
    model, prompt = model_and_prompts(name, seed=21)
    one = [prompt(6)]
    eos = model.generation_config.eos_token_id
    greedy = run(model, one)["sequences"][0]
    echo = [one[0][:3] + greedy[:3]]
    cases = {
        "suppress_tokens": run(model, one, suppress_tokens=greedy[:2]),
        "begin_suppress_tokens": run(model, one, begin_suppress_tokens=greedy[:1]),
        "forced_eos_two_ids": run(model, one, forced_eos_token_id=[9, 5]),
        # Sampling that keeps only the most likely token: transformers' draw is then certain.
        "sampled_min_p_1": run(model, one, do_sample=True, min_p=1.0, top_k=0),
        "batched_suppressions_and_forced_eos": run(
            model, [prompt(3), prompt(6)], suppress_tokens=greedy[1:2], begin_suppress_tokens=greedy[:1],
            forced_eos_token_id=7),
        "renormalized_beams": run(model, one, num_beams=3, repetition_penalty=1.3, renormalize_logits=True,
                                  num_return_sequences=2, max_new_tokens=8),
        "suppressed_beams": run(model, one, num_beams=2, suppress_tokens=greedy[:1],
                                begin_suppress_tokens=greedy[1:2], max_new_tokens=8),
        "sequence_bias": run(model, one, sequence_bias=[[greedy[:1], -4.0], [greedy[2:4], -30.0], [[5], 2.0]]),
        # The lone end-of-sequence ban is dropped.
        "bad_words_ids": run(model, one, bad_words_ids=[greedy[1:2], greedy[2:4], [eos]]),
        "exponential_decay_length_penalty": run(model, one, exponential_decay_length_penalty=(2, 4.0)),
        "sampled_epsilon_0.5": run(model, one, do_sample=True, epsilon_cutoff=0.5, top_k=0),
        "biased_beams": run(model, one, num_beams=3, bad_words_ids=[greedy[1:2]],
                            sequence_bias=[[greedy[:1], 1.5], [greedy[2:4], -2.0]], num_return_sequences=2,
                            max_new_tokens=8),
        # The encoder processors read the prompt (a decoder-only model's input_ids, as padded), here
        # one with greedy decoding's first tokens in it, so that they change the output.
        "encoder_repetition_penalty": run(model, echo, encoder_repetition_penalty=1.5),
        "encoder_repetition_penalty_below_one": run(model, echo, encoder_repetition_penalty=0.5),
        "encoder_no_repeat_ngram_1": run(model, echo, encoder_no_repeat_ngram_size=1),
        "encoder_no_repeat_ngram_2": run(model, echo, encoder_no_repeat_ngram_size=2),
        "batched_encoder_processors": run(model, [greedy[:3], echo[0]], encoder_repetition_penalty=0.5,
                                          encoder_no_repeat_ngram_size=2),
        "encoder_processors_beams": run(model, echo, num_beams=3, encoder_repetition_penalty=0.5,
                                        encoder_no_repeat_ngram_size=2, num_return_sequences=2, max_new_tokens=8),
        # Past its limit after the first token: one token.
        "max_time": run(model, one, max_time=1e-6),
    }
    if model.config.is_encoder_decoder:
        # A BART summariser's generation_config.json (facebook/bart-large-cnn's keys).
        summariser = dict(forced_bos_token_id=0, forced_eos_token_id=eos)
        cases["summariser"] = run(model, one, **summariser)
        cases["summariser_beams"] = run(model, one, num_beams=4, length_penalty=2.0, no_repeat_ngram_size=3,
                                        early_stopping=True, num_return_sequences=2, max_new_tokens=8,
                                        **summariser)
        forced_first = cases["summariser"]["sequences"][0]
        cases["begin_suppress_after_forced_bos"] = run(model, one, begin_suppress_tokens=forced_first[1:2],
                                                       **summariser)
    else:
        # A one-token prompt is where a decoder-only model's forced BOS applies.
        cases["forced_bos_one_token_prompt"] = run(model, [prompt(1)], forced_bos_token_id=5)
        cases["forced_eos_beams"] = run(model, one, num_beams=3, forced_eos_token_id=eos, max_new_tokens=8)
    return {"model": name, "eos_token_id": eos, "pad_token_id": PAD, "cases": cases}


def processor_generate_cases() -> dict:
    return {
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "families": {name: processor_model_cases(name) for name in PROCESSOR_MODELS},
    }


def processor_cases() -> dict:
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(3, 40, generator=gen) * 3.0
    logits[2, 5] = logits[2, 6] = logits[2].max() + 1.0  # a tie at the top
    input_ids = torch.randint(0, 40, (3, 9), generator=gen)
    input_ids[:, -3:] = input_ids[:, 2:5]  # repeated n-grams
    last = input_ids[:, -2:].tolist()
    # Biases of one token, and of sequences whose beginning ends a row (so they apply there).
    specs = {
        "sequence_bias": [[[3], 2.5], [[7], -1.0], [[last[0][1], 12], 4.0], [[*last[1], 20], -3.0],
                          [[last[0][1], 3], 1.5]],
        "bad_words_ids": [[5], [last[0][1], 12], [30, 31], [*last[2], 17]],
        # The encoder processors' input: the first ids of each row.
        "encoder_len": 7,
    }
    encoder_ids = input_ids[:, :specs["encoder_len"]]
    processors = {
        "repetition_penalty_1.3": RepetitionPenaltyLogitsProcessor(1.3),
        "repetition_penalty_0.8": RepetitionPenaltyLogitsProcessor(0.8),
        "no_repeat_ngram_2": NoRepeatNGramLogitsProcessor(2),
        "no_repeat_ngram_3": NoRepeatNGramLogitsProcessor(3),
        "min_new_tokens_eos_3_7": MinNewTokensLengthLogitsProcessor(6, 5, [3, 7]),
        "temperature_0.7": TemperatureLogitsWarper(0.7),
        "temperature_1.8": TemperatureLogitsWarper(1.8),
        "top_k_5": TopKLogitsWarper(5),
        "top_k_1": TopKLogitsWarper(1),
        "top_p_0.8": TopPLogitsWarper(0.8),
        "top_p_0.3": TopPLogitsWarper(0.3),
        "typical_p_0.9": TypicalLogitsWarper(0.9),
        "typical_p_0.4": TypicalLogitsWarper(0.4),
        "min_p_0.1": MinPLogitsWarper(0.1),
        "min_p_0.6": MinPLogitsWarper(0.6),
        "suppress_tokens_3_7_11": SuppressTokensLogitsProcessor([3, 7, 11]),
        # Both apply at this length of input_ids (9).
        "begin_suppress_tokens_4_5": SuppressTokensAtBeginLogitsProcessor([4, 5], 9),
        "forced_eos_2_8": ForcedEOSTokenLogitsProcessor(10, [2, 8]),
        "renormalize": LogitNormalization(),
        "sequence_bias": SequenceBiasLogitsProcessor(specs["sequence_bias"]),
        # End-of-sequence id 5: its lone ban is dropped.
        "bad_words_ids": NoBadWordsLogitsProcessor(specs["bad_words_ids"], eos_token_id=[5]),
        # The input's 9 ids are 3 past the start (2 after an input of 4).
        "exponential_decay_2_1.5_step_3": ExponentialDecayLengthPenalty((2, 1.5), [2, 9], 4),
        "epsilon_0.02": EpsilonLogitsWarper(0.02),
        "epsilon_0.1": EpsilonLogitsWarper(0.1),
        "eta_0.02": EtaLogitsWarper(0.02),
        "eta_0.5": EtaLogitsWarper(0.5),
        "encoder_repetition_penalty_1.5": EncoderRepetitionPenaltyLogitsProcessor(1.5, encoder_ids),
        "encoder_repetition_penalty_0.5": EncoderRepetitionPenaltyLogitsProcessor(0.5, encoder_ids),
        "encoder_no_repeat_ngram_1": EncoderNoRepeatNGramLogitsProcessor(1, encoder_ids),
        "encoder_no_repeat_ngram_2": EncoderNoRepeatNGramLogitsProcessor(2, encoder_ids),
        "encoder_no_repeat_ngram_3": EncoderNoRepeatNGramLogitsProcessor(3, encoder_ids),
    }
    cases = {name: listed(p(input_ids, logits.clone())) for name, p in processors.items()}
    cases["forced_bos_6"] = listed(ForcedBOSTokenLogitsProcessor(6)(input_ids[:, :1], logits.clone()))
    # The whole sampling pipeline in transformers' order.
    chain = [RepetitionPenaltyLogitsProcessor(1.2), NoRepeatNGramLogitsProcessor(2), TemperatureLogitsWarper(0.8),
             TopKLogitsWarper(12), TopPLogitsWarper(0.9), TypicalLogitsWarper(0.95)]
    scores = logits.clone()
    for p in chain:
        scores = p(input_ids, scores)
    cases["pipeline"] = listed(scores)
    # The processors of issue 21 in transformers' order with the sampling warpers.
    chain = [RepetitionPenaltyLogitsProcessor(1.2), SuppressTokensLogitsProcessor([3, 7]),
             SuppressTokensAtBeginLogitsProcessor([4], 9), TemperatureLogitsWarper(0.8), TopKLogitsWarper(12),
             MinPLogitsWarper(0.1), LogitNormalization()]
    scores = logits.clone()
    for p in chain:
        scores = p(input_ids, scores)
    cases["pipeline_suppress_min_p_renormalize"] = listed(scores)
    return {
        "transformers_version": transformers.__version__,
        "logits": logits.tolist(),
        "input_ids": input_ids.tolist(),
        "prompt_len": 5,
        "specs": specs,
        "outputs": cases,
    }


def embedding_fixture() -> None:
    """tests/fixtures/embedding/: the bert fixture's weights with a small WordPiece tokenizer and
    sentence-transformers' pooling configuration (mean pooling, then normalisation), and the
    embeddings sentence-transformers computes that way, for the server's /v1/embeddings."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertModel

    out = FIXTURES / "embedding"
    (out / "1_Pooling").mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(FIXTURES / "bert" / name, out / name)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    words = "the a model of cat dog runs fast slow red blue is on under house tree".split()
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {t: i for i, t in enumerate(specials + words + letters + ["##" + l for l in letters])}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ], indent=1) + "\n")
    (out / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False}, indent=1) + "\n")
    texts = ["the cat runs fast", "a red house under the tree", "dog"]
    model = BertModel.from_pretrained(out, dtype=torch.float32)
    model.eval()
    encoded = [tokenizer.encode(t).ids for t in texts]
    width = max(len(e) for e in encoded)
    ids = torch.tensor([e + [0] * (width - len(e)) for e in encoded])
    mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in encoded])
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    # sentence-transformers' mean pooling and Normalize module.
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1e-9)
    embeddings = torch.nn.functional.normalize(pooled, p=2, dim=1)
    (out / "embeddings.json").write_text(json.dumps({"texts": texts, "embeddings": embeddings.tolist()}) + "\n")


def main() -> None:
    """All fixtures, or with model names as arguments only those models' cases
    (`logits_processors` for logits_processors.json, `scores` for scores.json)."""
    OUT.mkdir(parents=True, exist_ok=True)
    names = sys.argv[1:]
    if names == ["scores"]:
        (OUT / "scores.json").write_text(json.dumps(score_cases(), indent=1) + "\n")
        return
    if names == ["logits_processors"]:
        (OUT / "logits_processors.json").write_text(json.dumps(processor_generate_cases(), indent=1) + "\n")
        (OUT / "processors.json").write_text(json.dumps(processor_cases()) + "\n")
        return
    if not names:
        embedding_fixture()
        (OUT / "processors.json").write_text(json.dumps(processor_cases()) + "\n")
        (OUT / "logits_processors.json").write_text(json.dumps(processor_generate_cases(), indent=1) + "\n")
        (OUT / "scores.json").write_text(json.dumps(score_cases(), indent=1) + "\n")
    for name in names or MODELS + TODAY_MODELS + SEQ2SEQ_MODELS + MOE_MODELS:
        (OUT / f"{name}.json").write_text(json.dumps(model_cases(name), indent=1) + "\n")
        print(f"wrote {OUT / name}.json")


if __name__ == "__main__":
    main()
