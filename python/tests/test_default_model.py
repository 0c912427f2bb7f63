"""The README's Python example: the default model answers through 2 ranks."""

import pytest
from conftest import required

import parallelformers as pf


def test_the_default_model_answers_the_readme_question(no_leftover_ranks):
    try:
        model = pf.parallelize(None, ranks=2)
    except pf.ParallelformersError as e:
        if "cannot fetch" in str(e) and not required("PARALLELFORMERS_REQUIRE_DEFAULT_MODEL"):
            pytest.skip(f"the default model cannot be fetched here: {e}")
        raise
    with model:
        no_leftover_ranks.extend(model.worker_pids)
        answer = model.chat("What is the capital of France?", max_new_tokens=20)
        assert "Paris" in answer, answer
        pieces = list(model.generate_stream("The capital of France is", max_new_tokens=8))
        assert pieces and all(isinstance(p, str) for p in pieces)
