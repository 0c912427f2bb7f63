"""The seed's form: ``parallelize(model, num_gpus=2, fp16=True, verbose="detail")`` on a
transformers model object, in place.

The model is written once to a temporary checkpoint that the ranks read their slices from;
then its own weights are released (moved to torch's ``meta`` device, which holds no data), and
its ``forward`` and ``generate`` are replaced by ones that run on the ranks and return what
transformers' would: output objects with ``logits``, and ``generate``'s tensor of prompt plus
new tokens. ``model.deparallelize()`` stops the ranks.
"""

import os
import tempfile
import types
import warnings
from typing import Any, Dict, Optional

from parallelformers._arrays import as_ids
from parallelformers._model import ParallelModel

#: Whether the "no GPU: worker processes" warning was given already.
_WARNED_NO_GPU = False

#: transformers' ``generate`` arguments that change nothing here.
_IGNORED = ("use_cache", "synced_gpus", "streamer", "return_dict_in_generate", "output_scores")


def is_transformers_model(value: Any) -> bool:
    """Whether ``value`` looks like a transformers ``PreTrainedModel``."""
    return hasattr(value, "save_pretrained") and hasattr(value, "parameters") and hasattr(value, "config")


def parallelize_in_place(
    model: Any,
    ranks: int,
    dtype: str,
    verbose: Optional[str],
    policy: Optional[str],
    backend: str,
    seed: Optional[int],
    threads: Optional[int],
    expert_split: Optional[str] = None,
) -> Any:
    """Splits ``model`` over ``ranks`` worker processes and makes it run there; returns it."""
    import torch

    global _WARNED_NO_GPU
    if getattr(model, "_parallelformers", None) is not None:
        raise ValueError("this model is parallelized already; call model.deparallelize() first")
    if not torch.cuda.is_available() and not _WARNED_NO_GPU:
        _WARNED_NO_GPU = True
        warnings.warn(
            f"no GPU here: num_gpus={ranks} means {ranks} worker processes on the CPU",
            stacklevel=3,
        )
    directory = tempfile.mkdtemp(prefix="parallelformers-")
    try:
        model.save_pretrained(directory, safe_serialization=True)
        parallel = ParallelModel(
            directory,
            ranks,
            dtype,
            verbose,
            policy,
            backend,
            seed,
            threads,
            _cleanup=directory,
            expert_split=expert_split,
        )
    except BaseException:
        import shutil

        shutil.rmtree(directory, ignore_errors=True)
        raise
    # The ranks hold the weights now; the model keeps its structure and none of its data.
    torch.nn.Module.to(model, device="meta")
    model._parallelformers = parallel
    model.forward = types.MethodType(_forward, model)
    model.generate = types.MethodType(_generate, model)
    model.deparallelize = types.MethodType(_deparallelize, model)
    return model


def _output_class(model: Any) -> Any:
    """transformers' output class for what ``model``'s own ``forward`` returns."""
    from transformers import modeling_outputs as outputs

    name = type(model).__name__
    if name.endswith("ForConditionalGeneration") or getattr(model.config, "is_encoder_decoder", False):
        return outputs.Seq2SeqLMOutput
    if name.endswith("ForMaskedLM"):
        return outputs.MaskedLMOutput
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return outputs.CausalLMOutputWithPast
    return outputs.BaseModelOutput


def _forward(
    self: Any,
    input_ids: Any = None,
    attention_mask: Any = None,
    decoder_input_ids: Any = None,
    labels: Any = None,
    return_dict: Optional[bool] = None,
    **unused: Any,
) -> Any:
    """The model's forward pass, run on the ranks."""
    import torch

    parallel: ParallelModel = self._parallelformers
    output = torch.as_tensor(
        parallel.forward(as_ids(input_ids, "input_ids"), attention_mask, decoder_input_ids)
    )
    kind = _output_class(self)
    if kind.__name__ == "BaseModelOutput":
        result = kind(last_hidden_state=output)
    else:
        result = kind(logits=output)
        if labels is not None:
            result["loss"] = _loss(output, torch.as_tensor(labels), causal=kind.__name__.startswith("Causal"))
    if return_dict is False:
        return result.to_tuple()
    return result


def _loss(logits: Any, labels: Any, causal: bool) -> Any:
    """transformers' language-modelling loss: cross-entropy, labels of -100 ignored, shifted
    by one position for causal models."""
    import torch

    if causal:
        logits, labels = logits[:, :-1, :], labels[:, 1:]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1).long(), ignore_index=-100
    )


def _generate(
    self: Any,
    input_ids: Any = None,
    attention_mask: Any = None,
    generation_config: Any = None,
    **kwargs: Any,
) -> Any:
    """transformers' ``generate``, run on the ranks: the same options over the model's
    ``generation_config``, the same tensor of prompts and new tokens."""
    import torch

    parallel: ParallelModel = self._parallelformers
    if input_ids is None:
        input_ids = kwargs.pop("inputs", None)
    options: Dict[str, Any] = {}
    config = generation_config if generation_config is not None else getattr(self, "generation_config", None)
    if config is not None:
        options.update(_known(config.to_diff_dict()))
        if config.max_new_tokens is not None:
            options["max_new_tokens"] = config.max_new_tokens
        else:
            options["max_length"] = config.max_length
    for name in _IGNORED:
        kwargs.pop(name, None)
    if "max_new_tokens" in kwargs or "max_length" in kwargs:
        options.pop("max_new_tokens", None)
        options.pop("max_length", None)
    options.update(kwargs)
    if options.get("max_new_tokens") is not None:
        options.pop("max_length", None)
    ids = torch.as_tensor(input_ids)
    return parallel.generate(ids, attention_mask=attention_mask, **options)


def _known(values: Dict[str, Any]) -> Dict[str, Any]:
    """The options of a transformers ``GenerationConfig`` that the engine takes."""
    from parallelformers._native import OPTION_NAMES

    return {k: v for k, v in values.items() if k in OPTION_NAMES and v is not None}


def _deparallelize(self: Any) -> None:
    """Stops the ranks. The model's weights were released when it was parallelized; load it
    again to use it in this process."""
    parallel: Optional[ParallelModel] = getattr(self, "_parallelformers", None)
    if parallel is not None:
        parallel.deparallelize()
        self._parallelformers = None


def policy_path(custom_policies: Any) -> Optional[str]:
    """A policy file named by ``custom_policies`` (a path); the seed's Python ``Policy``
    classes are replaced by policy files."""
    if custom_policies is None:
        return None
    if isinstance(custom_policies, (str, os.PathLike)):
        return os.fspath(custom_policies)
    raise ValueError(
        "custom_policies must be the path of a policy file (TOML or JSON; see the README's "
        "\"Policy files\"), not Python Policy classes"
    )
