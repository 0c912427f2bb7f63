"""The package as a Python library: the GIL is released while the ranks work, Ctrl-C stops a
generation and leaves the model usable, a killed rank raises RankError quickly, and the
interpreter exiting (normally or on an exception) leaves no rank behind."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from conftest import alive, fixture

import parallelformers as pf


def busy(model, seconds: float) -> int:
    """Generates again and again for about ``seconds``; returns how many generations ran."""
    runs = 0
    started = time.time()
    while time.time() - started < seconds:
        model.generate([[1, 2, 3]], max_new_tokens=120, eos_token_id=[])
        runs += 1
    return runs


def test_other_threads_run_while_the_ranks_work(no_leftover_ranks):
    with pf.parallelize(fixture("llama"), ranks=2, threads=1) as model:
        no_leftover_ranks.extend(model.worker_pids)
        ticks = []
        stop = threading.Event()

        def count():
            while not stop.is_set():
                ticks.append(1)
                time.sleep(0.001)

        counter = threading.Thread(target=count, daemon=True)
        counter.start()
        try:
            busy(model, 1.0)
        finally:
            stop.set()
            counter.join()
    # A thread blocked on the GIL would tick a handful of times per switch interval; this
    # one ticked freely (at most 1000 times a second).
    assert len(ticks) > 200, len(ticks)


def run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh interpreter; returns what it printed and its exit status."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def pids_of(output: str) -> list:
    """The pids a child printed on its ``PIDS`` line."""
    line = next(line for line in output.splitlines() if line.startswith("PIDS"))
    return [int(pid) for pid in line.split()[1:]]


def test_ctrl_c_stops_a_generation_and_the_model_goes_on():
    result = run_python(
        f"""
        import os, signal, threading, time
        import parallelformers as pf
        model = pf.parallelize({fixture("llama")!r}, ranks=2, threads=1)
        expected = model.generate([[1, 2, 3]], max_new_tokens=5).tolist()
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
        started = time.time()
        try:
            while True:
                model.generate([[1, 2, 3]], max_new_tokens=120, eos_token_id=[])
        except KeyboardInterrupt:
            print("INTERRUPTED after", round(time.time() - started, 2))
        assert model.generate([[1, 2, 3]], max_new_tokens=5).tolist() == expected
        print("USABLE")
        """
    )
    assert result.returncode == 0, result.stderr
    assert "INTERRUPTED" in result.stdout and "USABLE" in result.stdout, result.stdout
    seconds = float(result.stdout.split("INTERRUPTED after")[1].split()[0])
    assert seconds < 3, seconds


def test_a_killed_rank_raises_rank_error_within_two_seconds(no_leftover_ranks):
    with pf.parallelize(fixture("llama"), ranks=2, threads=1) as model:
        no_leftover_ranks.extend(model.worker_pids)
        victim = model.worker_pids[1]
        killed = []

        def kill():
            time.sleep(0.5)
            killed.append(time.time())
            os.kill(victim, signal.SIGKILL)

        threading.Thread(target=kill, daemon=True).start()
        with pytest.raises(pf.RankError):
            busy(model, 30.0)
        assert killed and time.time() - killed[0] < 2.0
        with pytest.raises(pf.ParallelformersError):
            model.generate([[1, 2, 3]], max_new_tokens=2)


@pytest.mark.parametrize("ending", ["print('DONE')", "raise RuntimeError('boom')", "import sys; sys.exit(3)"])
def test_the_interpreter_exiting_leaves_no_rank_behind(ending):
    before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    result = run_python(
        f"""
        import parallelformers as pf
        model = pf.parallelize({fixture("gpt2")!r}, ranks=2, threads=1)
        model.generate([[1, 2]], max_new_tokens=2)
        print("PIDS", *model.worker_pids, flush=True)
        {ending}
        """
    )
    pids = pids_of(result.stdout)
    assert len(pids) == 2, result.stderr
    deadline = time.time() + 5
    while any(alive(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in pids if alive(pid)], "ranks outlived the interpreter"
    after = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    assert not [name for name in after - before if "parallelformers" in name]


def test_ranks_start_from_a_thread_that_ends(no_leftover_ranks):
    box = []
    thread = threading.Thread(target=lambda: box.append(pf.parallelize(fixture("gpt2"), ranks=2, threads=1)))
    thread.start()
    thread.join()
    model = box[0]
    no_leftover_ranks.extend(model.worker_pids)
    assert model.generate([[1, 2]], max_new_tokens=2).shape == (1, 4)
    model.deparallelize()
