"""Token-id inputs as the engine takes them, and outputs in the caller's array type.

Inputs may be lists, NumPy arrays or torch tensors; outputs are NumPy arrays, or torch tensors
when the input was torch (made from the NumPy array without copying).
"""

from typing import Any, List, Optional, Sequence, Tuple

import numpy as np


def is_torch(value: Any) -> bool:
    """Whether ``value`` is a torch tensor (without importing torch when it is not loaded)."""
    return type(value).__module__.startswith("torch") and hasattr(value, "numpy")


def as_ids(value: Any, name: str) -> np.ndarray:
    """``value`` as a 2-D int64 array ``[batch, length]`` (a 1-D sequence is one row)."""
    if value is None:
        raise ValueError(f"{name} is required")
    if is_torch(value):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.dtype == object or array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integer token ids, not {array.dtype}")
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] == 0:
        raise ValueError(f"{name} must be [batch, length] with length >= 1, not {list(array.shape)}")
    return np.ascontiguousarray(array, dtype=np.int64)


def left_padded(value: Any) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """Prompts of different lengths (a list of lists of ids) as one array padded on the left
    with 0, and the attention mask that marks the padding; ``None`` for anything else."""
    if not isinstance(value, (list, tuple)) or not value:
        return None
    if not all(isinstance(row, (list, tuple)) for row in value):
        return None
    lengths = {len(row) for row in value}
    if len(lengths) == 1:
        return None
    width = max(lengths)
    ids = np.zeros((len(value), width), dtype=np.int64)
    mask = np.zeros((len(value), width), dtype=np.int64)
    for index, row in enumerate(value):
        if row:
            ids[index, width - len(row) :] = as_ids(row, "input_ids")[0]
            mask[index, width - len(row) :] = 1
    return ids, mask


def prompts_of(input_ids: np.ndarray, attention_mask: Optional[np.ndarray]) -> List[List[int]]:
    """Each row's prompt: its tokens where ``attention_mask`` is 1 (padding left out)."""
    if attention_mask is None:
        return input_ids.tolist()
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {list(attention_mask.shape)}, "
            f"input_ids {list(input_ids.shape)}"
        )
    prompts = [row[mask != 0].tolist() for row, mask in zip(input_ids, attention_mask)]
    if any(not prompt for prompt in prompts):
        raise ValueError("a row of attention_mask hides every token of its prompt")
    return prompts


def like(array: np.ndarray, template: Any) -> Any:
    """``array`` as a torch tensor when ``template`` is one, else as it is."""
    if is_torch(template):
        import torch

        return torch.from_numpy(array)
    return array


def padded(
    rows: Sequence[Sequence[int]], prefix: Optional[np.ndarray], pad: int
) -> np.ndarray:
    """Rows of new tokens after their prompts (``prefix[i]``, or nothing) as one int64 array,
    shorter rows padded on the right with ``pad``, as transformers' ``generate`` returns them."""
    width = max((len(row) for row in rows), default=0)
    start = 0 if prefix is None else prefix.shape[1]
    out = np.full((len(rows), start + width), pad, dtype=np.int64)
    if prefix is not None:
        out[:, :start] = prefix
    for index, row in enumerate(rows):
        out[index, start : start + len(row)] = row
    return out


def split_text_or_ids(value: Any) -> Tuple[Optional[List[str]], bool]:
    """``(texts, single)`` when ``value`` is a text or a list of texts, else ``(None, False)``."""
    if isinstance(value, str):
        return [value], True
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value), False
    return None, False
