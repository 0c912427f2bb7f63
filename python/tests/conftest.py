"""Shared helpers of the Python package's tests: the repository's fixtures (tiny checkpoints
written by transformers, with its outputs) and a check that no rank outlives a test."""

import json
import os
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures"


def fixture(name: str) -> str:
    """The directory of fixture ``name``."""
    return str(FIXTURES / name)


def generation_cases(name: str) -> dict:
    """transformers' generation outputs for fixture ``name``."""
    return json.loads((FIXTURES / "generation" / f"{name}.json").read_text())


def alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def no_leftover_ranks():
    """Collects rank pids a test reports, and fails if any still runs after it."""
    pids = []
    yield pids
    import time

    deadline = time.time() + 5
    while any(alive(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in pids if alive(pid)], "ranks outlived the test"


def required(name: str) -> bool:
    """Whether the environment variable ``name`` is 1: CI requires what it names."""
    return os.environ.get(name) == "1"
