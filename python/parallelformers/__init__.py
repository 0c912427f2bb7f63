"""parallelformers: split a Hugging Face transformer across worker processes with one call.

Two ways in::

    import parallelformers

    # A checkpoint directory, a .gguf file, a Hub id, or None for the default model.
    with parallelformers.parallelize(None, ranks=2) as model:
        print(model.chat("What is the capital of France?", max_new_tokens=20))

    # The seed's form, on a transformers model object, in place.
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("gpt2")
    parallelformers.parallelize(model, num_gpus=2, fp16=False, verbose="detail")
    model.generate(**tokenizer("Hello", return_tensors="pt"), max_new_tokens=10)
"""

import os
from typing import Any, Optional, Union

from parallelformers._native import OPTION_NAMES, ParallelformersError, RankError
from parallelformers._inplace import is_transformers_model, parallelize_in_place, policy_path
from parallelformers._model import ParallelModel

__all__ = [
    "parallelize",
    "ParallelModel",
    "ParallelformersError",
    "RankError",
    "OPTION_NAMES",
]
__version__ = "0.1.0"

DTYPES = ("f32", "f16", "bf16", "quantized")


def parallelize(
    source: Any = None,
    ranks: Optional[int] = None,
    dtype: Optional[str] = None,
    verbose: Optional[str] = None,
    policy: Optional[Union[str, "os.PathLike[str]"]] = None,
    backend: str = "shm",
    seed: Optional[int] = None,
    threads: Optional[int] = None,
    *,
    num_gpus: Optional[int] = None,
    fp16: Optional[bool] = None,
    custom_policies: Any = None,
    expert_split: Optional[str] = None,
) -> Any:
    """Splits a model over worker processes (ranks) and returns it ready to run.

    ``source`` is a checkpoint directory, a ``.gguf`` file, a Hugging Face Hub id, or ``None``
    for the default model (SmolLM2-135M-Instruct): the result is a :class:`ParallelModel`.
    ``source`` may also be a transformers model object (the seed's form): it is parallelized
    in place and returned, its weights released from this process, its ``forward`` and
    ``generate`` running on the ranks.

    ``ranks`` (the seed's ``num_gpus``; default 2) worker processes; ``dtype`` ``"f32"``,
    ``"f16"``, ``"bf16"`` or ``"quantized"`` (GGUF kept quantized; ``fp16=True`` means
    ``"f16"``; default f32, as the command line's); ``verbose`` ``None``, ``"simple"``
    or ``"detail"`` prints each rank's memory; ``policy`` (the seed's ``custom_policies``) a
    policy file for a model type the engine does not know; ``backend`` ``"shm"`` (one host)
    or ``"mpi"``; ``seed`` the sampler's seed; ``threads`` compute threads per rank;
    ``expert_split`` how a mixture of experts is divided: ``"tensor"`` (each rank a slice of
    every expert) or ``"expert"`` (each rank whole experts; default: the policy file's choice,
    else ``"tensor"``).
    """
    if num_gpus is not None and ranks is not None and num_gpus != ranks:
        raise ValueError(f"ranks={ranks} and num_gpus={num_gpus} disagree; give one")
    ranks = num_gpus if ranks is None else ranks
    ranks = 2 if ranks is None else ranks
    if fp16 is not None and dtype is not None:
        raise ValueError("give dtype or fp16, not both")
    if fp16:
        dtype = "f16"
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if policy is not None and custom_policies is not None:
        raise ValueError("give policy or custom_policies, not both")
    policy = policy_path(custom_policies) if policy is None else os.fspath(policy)
    if is_transformers_model(source):
        return parallelize_in_place(
            source, ranks, dtype or "f32", verbose, policy, backend, seed, threads, expert_split
        )
    if source is not None and not isinstance(source, (str, os.PathLike)):
        raise ValueError(
            "source must be a checkpoint directory, a .gguf file, a Hub id, None or a "
            f"transformers model, not {type(source).__name__}"
        )
    return ParallelModel(
        source,
        ranks,
        dtype or "f32",
        verbose,
        policy,
        backend,
        seed,
        threads,
        expert_split=expert_split,
    )
