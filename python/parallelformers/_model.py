"""``ParallelModel``: a model split over worker processes, driven from Python."""

import atexit
import json
import os
import shutil
import sys
import weakref
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from parallelformers import _native
from parallelformers._arrays import (
    as_ids,
    left_padded,
    like,
    padded,
    prompts_of,
    split_text_or_ids,
)

#: Seconds between two looks at a running generation (Ctrl-C is noticed between them).
POLL_SECONDS = 0.05

#: Every model still open, closed when the interpreter exits.
_OPEN: "weakref.WeakSet[ParallelModel]" = weakref.WeakSet()

VERBOSE = (None, "simple", "detail")


def worker_command() -> List[str]:
    """How a rank starts: this interpreter, importing this very package first."""
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = f"import sys; sys.path.insert(0, {package_parent!r}); import parallelformers._worker"
    return [sys.executable, "-c", code]


class ParallelModel:
    """A model split over worker processes (ranks) by :func:`parallelformers.parallelize`.

    Every method runs on the ranks with the GIL released; Ctrl-C during a generation stops it
    and leaves the model usable. Close it with :meth:`deparallelize` or a ``with`` block; the
    interpreter exiting closes it too.
    """

    def __init__(
        self,
        source: Optional[str],
        ranks: int = 2,
        dtype: str = "f32",
        verbose: Optional[str] = None,
        policy: Optional[Union[str, "os.PathLike[str]"]] = None,
        backend: str = "shm",
        seed: Optional[int] = None,
        threads: Optional[int] = None,
        _cleanup: Optional[str] = None,
        *,
        expert_split: Optional[str] = None,
    ) -> None:
        if verbose not in VERBOSE:
            raise ValueError(f'verbose must be None, "simple" or "detail", not {verbose!r}')
        if not isinstance(ranks, int) or isinstance(ranks, bool) or ranks < 1:
            raise ValueError(f"ranks must be a whole number >= 1, not {ranks!r}")
        self._cleanup = _cleanup
        self._native = _native.Model(
            None if source is None else os.fspath(source),
            ranks,
            dtype,
            None if policy is None else os.fspath(policy),
            backend,
            seed,
            threads,
            worker_command(),
            expert_split,
        )
        self.config: Dict[str, Any] = json.loads(self._native.config_json)
        """The resolved model configuration (family, sizes, output kind, ...)."""
        _OPEN.add(self)
        if verbose is not None:
            for line in self._native.load_report(verbose):
                print(line, file=sys.stderr)

    # -- what it is ------------------------------------------------------------------------

    @property
    def path(self) -> str:
        """The checkpoint directory or GGUF file the ranks loaded."""
        return self._native.path

    @property
    def worker_pids(self) -> List[int]:
        """The process ids of the ranks."""
        return self._native.worker_pids

    @property
    def closed(self) -> bool:
        """Whether :meth:`deparallelize` has run."""
        return self._native.closed

    @property
    def is_encoder_decoder(self) -> bool:
        """Whether the model is an encoder-decoder (T5, BART)."""
        return self.config.get("seq2seq") is not None

    def generation_config(self, **kwargs: Any) -> Dict[str, Any]:
        """The generation options: the model's defaults (its ``generation_config.json``),
        overridden by ``kwargs`` (transformers' names)."""
        return self._native.generation_config(**kwargs)

    def memory_report(self) -> List[Dict[str, Any]]:
        """Each rank's memory now: weights held, key/value cache, resident and peak bytes."""
        return json.loads(self._native.memory_report())

    # -- forward ---------------------------------------------------------------------------

    def forward(self, input_ids: Any, attention_mask: Any = None, decoder_input_ids: Any = None) -> Any:
        """Logits ``[batch, length, vocab]`` (the last hidden state for encoders without a
        head) as float32: a NumPy array, or a torch tensor when ``input_ids`` is one."""
        ids = as_ids(input_ids, "input_ids")
        mask = None if attention_mask is None else as_ids(attention_mask, "attention_mask")
        decoder = None if decoder_input_ids is None else as_ids(decoder_input_ids, "decoder_input_ids")
        return like(self._native.forward(ids, mask, decoder), input_ids)

    __call__ = forward

    # -- generation ------------------------------------------------------------------------

    def generate(
        self,
        inputs: Any = None,
        *,
        input_ids: Any = None,
        attention_mask: Any = None,
        **kwargs: Any,
    ) -> Any:
        """Generates after a prompt, with transformers' option names (``max_new_tokens``,
        ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``,
        ``num_beams``, ``num_return_sequences``, ``seed``, ...) over the model's defaults.

        A text (or a list of texts) gives the generated text (or texts). Token ids (a list, a
        list of lists, a 2-D NumPy array or torch tensor, with an optional ``attention_mask``
        whose zeros mark padding; lists of different lengths are padded on the left with 0)
        give what transformers' ``generate`` gives: each prompt as
        it was passed followed by its new tokens (for encoder-decoders, the decoder's start
        token and the new tokens), ``num_return_sequences`` rows per prompt, shorter rows
        padded with ``pad_token_id``; as a torch tensor when the input was one, else NumPy.
        """
        source = input_ids if inputs is None else inputs
        texts, single = split_text_or_ids(source)
        if texts is not None:
            prompts = [self._native.encode(text) for text in texts]
            rows, _, _ = self._run(prompts, self._options(kwargs, prompts))
            answers = [self._native.decode(row) for row in rows]
            return answers[0] if single and len(answers) == 1 else answers
        ragged = left_padded(source) if attention_mask is None else None
        if ragged is not None:
            ids, mask = ragged
        else:
            ids = as_ids(source, "input_ids")
            mask = None if attention_mask is None else as_ids(attention_mask, "attention_mask")
        prompts = prompts_of(ids, mask)
        options = self._options(kwargs, prompts, width=ids.shape[1])
        rows, _, _ = self._run(prompts, options)
        return like(self._with_prompts(rows, ids, options), source)

    def generate_stream(self, prompt: Any, **kwargs: Any) -> Iterator[Union[str, int]]:
        """Generates after one prompt and yields as the ranks choose: pieces of text for a
        text prompt, token ids for token ids. Leaving the loop early stops the generation."""
        texts, _ = split_text_or_ids(prompt)
        if texts is not None and len(texts) != 1:
            raise ValueError("generate_stream takes one prompt")
        ids = self._native.encode(texts[0]) if texts else as_ids(prompt, "prompt")
        if not texts and len(ids) != 1:
            raise ValueError("generate_stream takes one prompt")
        prompt_ids = list(ids) if texts else ids[0].tolist()
        options = self._options(kwargs, [prompt_ids])
        if options.get("num_beams", 1) not in (None, 1) or options.get("num_return_sequences", 1) not in (None, 1):
            raise ValueError("generate_stream streams one sequence: no beams, num_return_sequences=1")
        return self._stream(prompt_ids, options, text=bool(texts))

    def chat(self, messages: Union[str, Sequence[Dict[str, str]]], **kwargs: Any) -> str:
        """The assistant's answer to a conversation: a list of ``{"role": ..., "content":
        ...}`` messages (or one user message as a string), through the model's chat
        template; generation options as in :meth:`generate`."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        pairs = []
        for message in messages:
            try:
                pairs.append((str(message["role"]), str(message["content"])))
            except (KeyError, TypeError):
                raise ValueError(f'a message needs "role" and "content", not {message!r}') from None
        prompt = self._native.chat_prompt(pairs)
        rows, _, _ = self._run([prompt], self._options(kwargs, [prompt]))
        return self._native.decode(rows[0])

    def embed(self, texts: Union[str, Sequence[str]]) -> np.ndarray:
        """Sentence embeddings of an encoder checkpoint, pooled and normalised as its
        sentence-transformers files say: ``[len(texts), hidden]`` (one vector for one text)."""
        single = isinstance(texts, str)
        vectors = self._native.embed([texts] if single else list(texts))
        return vectors[0] if single else vectors

    # -- life ------------------------------------------------------------------------------

    def deparallelize(self) -> None:
        """Stops the ranks and frees their memory; the model cannot be used afterwards."""
        self._native.close()
        _OPEN.discard(self)
        if self._cleanup is not None:
            shutil.rmtree(self._cleanup, ignore_errors=True)
            self._cleanup = None

    def __enter__(self) -> "ParallelModel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.deparallelize()

    def __del__(self) -> None:
        native = getattr(self, "_native", None)
        if native is not None and not native.closed:
            self.deparallelize()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self.worker_pids)} ranks"
        return f"ParallelModel({self.config.get('architecture')!r} from {self.path!r}, {state})"

    # -- inside ----------------------------------------------------------------------------

    def _options(self, kwargs: Dict[str, Any], prompts: List[List[int]], width: Optional[int] = None) -> Dict[str, Any]:
        """``kwargs`` for the engine: transformers' ``max_length`` (prompt included) turned
        into ``max_new_tokens``, ``stop_strings`` kept, unknown names left for the engine to
        refuse."""
        options = dict(kwargs)
        max_length = options.pop("max_length", None)
        options.pop("use_cache", None)
        if max_length is not None and options.get("max_new_tokens") is None:
            used = 1 if self.is_encoder_decoder else (width or max(len(p) for p in prompts))
            if max_length <= used:
                raise ValueError(f"max_length={max_length} leaves no room after a prompt of {used} tokens")
            options["max_new_tokens"] = max_length - used
        return options

    def _pad_id(self, options: Dict[str, Any]) -> int:
        """What pads shorter rows: ``pad_token_id``, else the first end-of-sequence id."""
        config = self.generation_config(**options)
        if config.get("pad_token_id") is not None:
            return int(config["pad_token_id"])
        eos = config.get("eos_token_id") or self.config.get("eos_token_id") or [0]
        return int(eos[0] if isinstance(eos, list) else eos)

    def _with_prompts(self, rows: List[List[int]], ids: np.ndarray, options: Dict[str, Any]) -> np.ndarray:
        """The new tokens after what transformers puts before them."""
        repeat = max(1, len(rows) // max(1, ids.shape[0]))
        if self.is_encoder_decoder:
            start = self.config["seq2seq"]["decoder_start_token_id"]
            prefix = np.full((len(rows), 1), start, dtype=np.int64)
        else:
            prefix = np.repeat(ids, repeat, axis=0)
        return padded(rows, prefix, self._pad_id(options))

    def _run(
        self,
        prompts: List[List[int]],
        options: Dict[str, Any],
        on_token: Optional[Callable[[int, int], None]] = None,
    ) -> Tuple[List[List[int]], Optional[List[float]], Dict[str, Any]]:
        """Runs a generation to its end: each row's new tokens, beam scores, timings."""
        generation = self._native.start_generation(prompts, **options)
        try:
            while True:
                event = generation.next_event(POLL_SECONDS)
                if event is None:
                    continue
                if event[0] == "token":
                    if on_token is not None:
                        on_token(event[1], event[2])
                    continue
                return event[1], event[2], event[3]
        except KeyboardInterrupt:
            _stop(generation)
            raise

    def _stream(self, prompt: List[int], options: Dict[str, Any], text: bool) -> Iterator[Union[str, int]]:
        generation = self._native.start_generation([prompt], **options)
        pieces = self._native.text_stream() if text else None
        done = False
        try:
            while not done:
                event = generation.next_event(POLL_SECONDS)
                if event is None:
                    continue
                if event[0] == "done":
                    done = True
                    break
                if event[1] != 0:
                    continue
                if pieces is None:
                    yield event[2]
                    continue
                piece = pieces.push(event[2])
                if piece:
                    yield piece
            if pieces is not None:
                rest = pieces.finish()
                if rest:
                    yield rest
        finally:
            if not done:
                _stop(generation)


def _stop(generation: Any) -> None:
    """Cancels a generation and waits for the ranks to have stopped (a few steps at most), so
    that the model is ready for the next call."""
    generation.cancel()
    while not generation.finished:
        try:
            generation.next_event(POLL_SECONDS)
        except KeyboardInterrupt:
            continue
        except Exception:
            return


@atexit.register
def _close_all() -> None:
    """Closes every model still open when the interpreter exits (normally or on an
    exception), so that no rank outlives it."""
    for model in list(_OPEN):
        try:
            model.deparallelize()
        except Exception:
            pass
