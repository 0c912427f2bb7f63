"""The seed's form on transformers model objects: ``parallelize(model, num_gpus=2, ...)`` in
place, then ``model(...)`` and ``model.generate(...)`` answer as transformers' own do, from the
ranks, with the model's weights released. Runs where torch and transformers are importable."""

import os

import pytest
from conftest import fixture

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import parallelformers as pf  # noqa: E402


def load(name):
    if name in ("t5", "bart"):
        return transformers.AutoModelForSeq2SeqLM.from_pretrained(fixture(name))
    return transformers.AutoModelForCausalLM.from_pretrained(fixture(name))


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen3", "t5", "bart"])
def test_in_place_generate_and_forward_equal_transformers(name, no_leftover_ranks, monkeypatch):
    # The warning is said once per process; each case here wants to hear it.
    monkeypatch.setattr("parallelformers._inplace._WARNED_NO_GPU", False)
    model = load(name).eval()
    if model.config.is_encoder_decoder:
        # An encoder's batch padded on the right, as its tokenizer pads it.
        ids = torch.tensor([[10, 23, 26, 27, 32, 64], [5, 9, 7, 3, 0, 0]])
        mask = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0]])
    else:
        ids = torch.tensor([[10, 23, 26, 27, 32, 64], [0, 0, 5, 9, 7, 3]])
        mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    calls = {
        "greedy": dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, pad_token_id=0),
        "penalty": dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, repetition_penalty=1.4, no_repeat_ngram_size=2, pad_token_id=0),
        "beams": dict(input_ids=ids[:1], max_new_tokens=6, num_beams=3, num_return_sequences=2, pad_token_id=0),
        "defaults": dict(input_ids=ids[:1]),
    }
    with torch.no_grad():
        expected = {call: model.generate(**kwargs) for call, kwargs in calls.items()}
        seq2seq = model.config.is_encoder_decoder
        start = getattr(model.config, "decoder_start_token_id", None)
        decoder = torch.tensor([[start, 5, 6], [start, 7, 8]]) if seq2seq else None
        logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder).logits
    with pytest.warns(UserWarning, match="worker processes"):
        returned = pf.parallelize(model, num_gpus=2, fp16=False, verbose="simple")
    assert returned is model
    no_leftover_ranks.extend(model._parallelformers.worker_pids)
    assert all(p.is_meta for p in model.parameters()), "the weights stayed in this process"
    try:
        for call, kwargs in calls.items():
            got = model.generate(**kwargs)
            assert isinstance(got, torch.Tensor) and got.dtype == expected[call].dtype
            assert torch.equal(got, expected[call]), (name, call, got.tolist(), expected[call].tolist())
        output = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder)
        assert type(output).__name__ in ("CausalLMOutputWithPast", "Seq2SeqLMOutput")
        real = (mask == 1) if decoder is None else torch.ones(decoder.shape, dtype=torch.bool)
        assert (output.logits[real] - logits[real]).abs().max().item() < 1e-4
    finally:
        model.deparallelize()


def test_sampled_generate_is_reproducible_and_fp16_runs(no_leftover_ranks):
    model = load("llama")
    pf.parallelize(model, num_gpus=2, fp16=True, seed=5)
    no_leftover_ranks.extend(model._parallelformers.worker_pids)
    ids = torch.tensor([[10, 23, 26]])
    first = model.generate(input_ids=ids, do_sample=True, max_new_tokens=10, seed=3)
    again = model.generate(input_ids=ids, do_sample=True, max_new_tokens=10, seed=3)
    assert torch.equal(first, again) and first.shape == (1, 13)
    model.deparallelize()
    assert not any(os.path.exists(p) for p in [model.__dict__.get("_cleanup", "/nonexistent")])


def test_a_model_parallelized_twice_is_refused():
    model = load("gpt2")
    pf.parallelize(model, num_gpus=2)
    try:
        with pytest.raises(ValueError, match="parallelized already"):
            pf.parallelize(model, num_gpus=2)
    finally:
        model.deparallelize()
