"""Type stubs of the extension module (the Rust engine); see ``parallelformers`` for the API."""

from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

OPTION_NAMES: List[str]

class ParallelformersError(Exception):
    """An error of the parallel model that is not a bad argument."""

class RankError(ParallelformersError):
    """A rank (worker process) failed or stopped answering."""

def worker_main() -> None:
    """Runs this process as a rank when started as one; returns at once otherwise."""

class Generation:
    """A running generation: its tokens as they are chosen, then its result."""

    @property
    def finished(self) -> bool: ...
    def next_event(
        self, timeout: float
    ) -> Optional[
        Union[
            Tuple[str, int, int],
            Tuple[str, List[List[int]], Optional[List[float]], Dict[str, Any]],
        ]
    ]: ...
    def cancel(self) -> None: ...

class TextPieces:
    """Text pieces of a generation, as its ids arrive."""

    def push(self, id: int) -> Optional[str]: ...
    def finish(self) -> Optional[str]: ...

class Model:
    """A model split over worker processes."""

    def __init__(
        self,
        source: Optional[str],
        ranks: int,
        dtype_name: str,
        policy: Optional[str],
        backend_name: str,
        seed: Optional[int],
        threads: Optional[int],
        worker_command: List[str],
        expert_split_name: Optional[str] = None,
    ) -> None: ...
    @property
    def config_json(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def worker_pids(self) -> List[int]: ...
    @property
    def closed(self) -> bool: ...
    def load_report(self, verbose: str) -> List[str]: ...
    def generation_config(self, **kwargs: Any) -> Dict[str, Any]: ...
    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: Optional[np.ndarray] = None,
        decoder_input_ids: Optional[np.ndarray] = None,
    ) -> np.ndarray: ...
    def start_generation(self, prompts: List[List[int]], **kwargs: Any) -> Generation: ...
    def encode(self, text: str) -> List[int]: ...
    def decode(self, ids: List[int]) -> str: ...
    def chat_prompt(self, messages: List[Tuple[str, str]]) -> List[int]: ...
    def text_stream(self) -> TextPieces: ...
    def embed(self, texts: List[str]) -> np.ndarray: ...
    def memory_report(self) -> str: ...
    def close(self) -> None: ...
