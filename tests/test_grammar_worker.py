"""grammar_worker.py: a request's grammar in a process of its own, bounded in time and memory."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gguf_appliance.errors import InvalidRequest, QueueFull
from gguf_appliance.grammar_worker import Grammar, GrammarPool

from .conftest import wait_until


@pytest.fixture
def pool(model_path: Path) -> Iterator[GrammarPool]:
    grammars = GrammarPool(model_path, limit=2, memory=1 << 30, retry_after=1)
    yield grammars
    grammars.close()


def load(pool: GrammarPool, text: str) -> Grammar:
    return Grammar(pool, text, param="grammar", step_limit=0.25, hard_limit=1.0)


def test_a_grammar_accepts_what_it_allows_and_masks_what_it_does_not(
    pool: GrammarPool, model_path: Path
) -> None:
    from gguf_appliance.llama import LlamaModel

    model = LlamaModel(model_path, n_ctx=256, n_seq=1, n_batch=32, threads=1)
    try:
        (yes,) = model.tokenize("yes", add_special=False, parse_special=False)
        (no,) = model.tokenize("no", add_special=False, parse_special=False)
        (hello,) = model.tokenize("hello", add_special=False, parse_special=False)
        grammar = load(pool, 'root ::= "yes" | "no"')
        allowed = grammar.step(hello, model.n_vocab)
        assert allowed is not True and allowed[yes] and allowed[no] and not allowed[hello]
        grammar.accept(yes)
        # Only the end of the answer is left.
        after = grammar.step(hello, model.n_vocab)
        assert after is not True and all(model.is_eog(int(t)) for t in after.nonzero()[0])
        grammar.close()
    finally:
        model.close()


def test_a_worker_goes_back_to_the_pool_and_serves_the_next_grammar(pool: GrammarPool) -> None:
    first = load(pool, 'root ::= "a"')
    worker = first.worker
    first.close()
    second = load(pool, 'root ::= "b"')
    assert second.worker is worker  # no new process for the next request
    second.close()
    assert pool.workers == 1


def test_more_grammars_than_the_limit_get_503(pool: GrammarPool) -> None:
    held = [load(pool, 'root ::= "a"') for _ in range(2)]
    with pytest.raises(QueueFull):
        load(pool, 'root ::= "a"')
    for grammar in held:
        grammar.close()
    load(pool, 'root ::= "a"').close()


def test_a_worker_that_takes_too_long_is_killed_and_replaced(pool: GrammarPool) -> None:
    # 2**40 ways to start: llama.cpp's left-recursion check would run for hours.
    text = "root ::= a1 | a1\n" + "".join(f"a{i} ::= a{i + 1} | a{i + 1}\n" for i in range(1, 40))
    with pytest.raises(InvalidRequest, match="took more than 3 s") as caught:
        load(pool, text + 'a40 ::= "x"')
    assert caught.value.param == "grammar"
    assert pool.workers == 0  # killed, not kept
    load(pool, 'root ::= "a"').close()  # a new worker serves the next one


def test_a_worker_that_runs_out_of_memory_only_fails_its_request(model_path: Path) -> None:
    small = GrammarPool(model_path, limit=1, memory=400 << 20, retry_after=1)
    try:
        # 2,000 rules each copying a 90 kB name: 180 MB of strings over a 400 MB address space.
        text = "r" * 90_000 + ' ::= "a"{0,1000} "a"{0,1000}\nroot ::= "a"'
        with pytest.raises(InvalidRequest) as caught:
            load(small, text)
        assert caught.value.param == "grammar"
        load(small, 'root ::= "a"').close()
    finally:
        small.close()


def test_a_worker_ends_with_its_node_even_one_killed_with_9(model_path: Path) -> None:
    node = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from pathlib import Path\n"
            "from gguf_appliance.grammar_worker import GrammarPool\n"
            "pool = GrammarPool(Path(sys.argv[1]), limit=1, memory=1 << 30, retry_after=1)\n"
            "worker = pool.acquire()\n"
            "import threading\n"
            # Busy in llama.cpp for hours: the left-recursion check of 2**40 ways to start.
            "text = 'root ::= a1 | a1\\n' + ''.join("
            "f'a{i} ::= a{i + 1} | a{i + 1}\\n' for i in range(1, 40)) + 'a40 ::= \"x\"'\n"
            "threading.Thread(target=worker.call, args=(1, 0, text.encode(), 3600)).start()\n"
            "print(worker.process.pid, flush=True)\n"
            "time.sleep(600)\n",
            str(model_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert node.stdout is not None
    worker = int(node.stdout.readline())
    stat = Path(f"/proc/{worker}/stat")

    def cpu_ticks() -> int:
        return sum(int(x) for x in stat.read_text().rsplit(")", 1)[1].split()[11:13])

    # Busy in llama.cpp (its CPU time grows) before the node goes.
    wait_until(lambda: cpu_ticks() > 20, 30, "the worker never got busy")
    node.kill()
    node.wait()

    def gone() -> bool:  # not our child: reaped by init, or a zombie until then
        return not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"

    wait_until(gone, 10, "the worker outlived its node")


def test_an_idle_worker_that_died_is_not_handed_out(pool: GrammarPool) -> None:
    first = load(pool, 'root ::= "a"')
    worker = first.worker
    assert worker is not None
    first.close()
    worker.process.kill()  # as the OOM killer would
    worker.process.wait()
    load(pool, 'root ::= "b"').close()  # a new worker, not an error
