"""The engine through the Python API: forward passes and generation against transformers'
outputs (the repository's fixtures) at several rank counts, streaming, embeddings, and bad
arguments refused with ValueError before any rank works."""

import json

import numpy as np
import pytest
from conftest import FIXTURES, fixture, generation_cases
from safetensors.numpy import load_file

import parallelformers as pf

FORWARD = ["gpt2", "llama", "bert", "qwen3", "gemma2", "t5"]


@pytest.mark.parametrize("name", FORWARD)
@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_forward_matches_transformers(name, ranks, no_leftover_ranks):
    meta = json.loads((FIXTURES / name / "meta.json").read_text())
    if ranks > meta.get("max_ranks", 4):
        pytest.skip(f"{name} splits over at most {meta['max_ranks']} ranks")
    reference = load_file(str(FIXTURES / name / "reference.safetensors"))
    with pf.parallelize(fixture(name), ranks=ranks, threads=1) as model:
        no_leftover_ranks.extend(model.worker_pids)
        output = model.forward(
            reference["input_ids"],
            attention_mask=reference.get("attention_mask"),
            decoder_input_ids=reference.get("decoder_input_ids"),
        )
    expected = reference[meta["output"]]
    assert isinstance(output, np.ndarray) and output.dtype == np.float32
    assert output.shape == expected.shape
    mask = reference.get("attention_mask")
    if mask is not None and "decoder_input_ids" not in reference:
        # transformers computes padded positions too; only real ones are compared.
        output, expected = output[mask == 1], expected[mask == 1]
    np.testing.assert_allclose(output, expected, atol=1e-4, rtol=0)


def test_a_mixture_of_experts_split_by_expert_matches_transformers(no_leftover_ranks):
    reference = load_file(str(FIXTURES / "qwen3_moe" / "reference.safetensors"))
    with pf.parallelize(fixture("qwen3_moe"), ranks=3, threads=1, expert_split="expert") as model:
        no_leftover_ranks.extend(model.worker_pids)
        output = model.forward(reference["input_ids"], attention_mask=reference["attention_mask"])
        held = [(rank["experts"]["first"], rank["experts"]["count"]) for rank in model.memory_report()]
    mask = reference["attention_mask"] == 1
    np.testing.assert_allclose(output[mask], reference["logits"][mask], atol=1e-4, rtol=0)
    assert held == [(0, 3), (3, 3), (6, 2)]


def new_tokens(out: np.ndarray, width: int, expected: list, pad: int) -> list:
    """A generated row's new tokens, the padding after the expected ones checked."""
    row = out[width:].tolist()
    assert all(token == pad for token in row[len(expected) :]), row
    return row[: len(expected)]


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen3"])
@pytest.mark.parametrize("ranks", [1, 2])
def test_generation_matches_transformers(name, ranks, no_leftover_ranks):
    cases = generation_cases(name)
    with pf.parallelize(fixture(name), ranks=ranks, threads=1) as model:
        no_leftover_ranks.extend(model.worker_pids)
        for case_name, case in cases["cases"].items():
            options = dict(case["options"])
            if options.get("do_sample"):
                continue
            options.setdefault("max_new_tokens", 10)
            prompts = case["prompts"]
            out = model.generate(prompts, **options)
            width = max(len(p) for p in prompts)
            rows = [new_tokens(row, width, expected, cases["pad_token_id"]) for row, expected in zip(out, case["sequences"])]
            assert rows == case["sequences"], f"{name} {case_name}"
            assert out.shape[0] == len(case["sequences"])


def test_sampling_is_reproducible_with_a_seed(no_leftover_ranks):
    with pf.parallelize(fixture("llama"), ranks=2, threads=1) as model:
        no_leftover_ranks.extend(model.worker_pids)
        options = dict(do_sample=True, temperature=1.3, top_k=0, max_new_tokens=12)
        first = model.generate([[10, 23, 26]], seed=7, **options)
        again = model.generate([[10, 23, 26]], seed=7, **options)
        others = [model.generate([[10, 23, 26]], seed=s, **options) for s in range(8, 12)]
    np.testing.assert_array_equal(first, again)
    assert any(not np.array_equal(first, other) for other in others), "the seed changed nothing"


def test_streaming_yields_the_tokens_generate_returns(no_leftover_ranks):
    with pf.parallelize(fixture("gpt2"), ranks=2, threads=1) as model:
        no_leftover_ranks.extend(model.worker_pids)
        whole = model.generate([[5, 6, 7, 8]], max_new_tokens=9)[0, 4:].tolist()
        streamed = list(model.generate_stream([5, 6, 7, 8], max_new_tokens=9))
        text = "".join(model.generate_stream("hello there", max_new_tokens=6))
        assert text == model.generate("hello there", max_new_tokens=6)
        # Leaving a stream early stops its generation; the model goes on.
        for _ in model.generate_stream([5, 6, 7, 8], max_new_tokens=50, eos_token_id=[]):
            break
        assert model.generate([[5, 6, 7, 8]], max_new_tokens=9)[0, 4:].tolist() == whole
    pad = 0
    assert streamed == [t for t in whole if t != pad][: len(streamed)]
    assert len(streamed) >= 1


def test_torch_in_torch_out_and_lists_of_any_lengths():
    torch = pytest.importorskip("torch")
    with pf.parallelize(fixture("gpt2"), ranks=2, threads=1) as model:
        logits = model.forward(torch.tensor([[1, 2, 3]]))
        assert isinstance(logits, torch.Tensor) and logits.shape == (1, 3, 300)
        out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2)
        assert isinstance(out, torch.Tensor) and out.dtype == torch.int64
        ragged = model.generate([[1, 2, 3], [4]], max_new_tokens=2)
        assert ragged.shape[0] == 2 and ragged[1, :2].tolist() == [0, 0]


def test_embeddings_match_sentence_transformers(no_leftover_ranks):
    expected = json.loads((FIXTURES / "embedding" / "embeddings.json").read_text())
    with pf.parallelize(fixture("embedding"), ranks=2, threads=1) as model:
        no_leftover_ranks.extend(model.worker_pids)
        vectors = model.embed(expected["texts"])
        one = model.embed(expected["texts"][0])
    np.testing.assert_allclose(vectors, np.array(expected["embeddings"]), atol=1e-4, rtol=0)
    np.testing.assert_allclose(one, vectors[0], atol=1e-6)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(dtype="f8"), "dtype must be one of"),
        (dict(ranks=0), "ranks must be a whole number"),
        (dict(verbose="loud"), "verbose must be"),
        (dict(backend="nccl"), "backend must be"),
        (dict(ranks=2, num_gpus=3), "disagree"),
        (dict(custom_policies=[object]), "custom_policies must be the path"),
        (dict(ranks=64), "cannot split"),
        (dict(expert_split="experts"), "expert_split must be"),
        (dict(expert_split="expert"), "no mixture of experts"),
    ],
)
def test_bad_parallelize_arguments_raise_value_error(arguments, message):
    with pytest.raises(ValueError, match=message):
        pf.parallelize(fixture("gpt2"), **arguments)


def test_a_missing_checkpoint_names_the_path():
    with pytest.raises((OSError, ValueError), match="no-such-checkpoint"):
        pf.parallelize("/tmp/no-such-checkpoint", ranks=2)


def test_bad_call_arguments_raise_value_error_and_leave_the_model_usable():
    with pf.parallelize(fixture("gpt2"), ranks=2, threads=1) as model:
        with pytest.raises(ValueError, match='unknown generation option "temprature"'):
            model.generate([[1, 2]], temprature=0.5)
        with pytest.raises(ValueError, match="max_new_tokens"):
            model.generate([[1, 2]], max_new_tokens="many")
        with pytest.raises(ValueError, match="not a token id"):
            model.forward([[1, -5]])
        with pytest.raises(ValueError, match="integer token ids"):
            model.forward([[1.5, 2.0]])
        with pytest.raises(ValueError):
            model.generate([[1, 2]], top_p=3.0)
        with pytest.raises(ValueError):
            model.forward([[1, 100000]])
        with pytest.raises(ValueError, match="role"):
            model.chat([{"text": "hi"}])
        assert model.generate([[1, 2]], max_new_tokens=2).shape == (1, 4)
    with pytest.raises(pf.ParallelformersError, match="deparallelized"):
        model.generate([[1, 2]])
