"""A request's grammar runs in a process of its own, with hard bounds on time and memory.

llama.cpp's grammar code trusts its grammar: a grammar that can be read many ways multiplies its
parse stacks with every character (a handful of rules reach millions of stacks, and the
de-duplication is quadratic), its left-recursion check is exponential in chains of rules, and a
token the grammar did not expect ends the process (GGML_ABORT, or a C++ exception through the C
API). None of that can be interrupted from Python. So the grammar of each request lives in a
worker process that has only the model's vocabulary: the scheduler asks it, per generated token,
"does the grammar allow this token?" (and, when not, for the mask of the tokens it allows) and
tells it the token chosen. A worker that takes longer than the hard limit is killed; one that
runs out of its memory limit or aborts simply dies. Either way only that request ends, with a
400; the node and every other stream go on.

`python -m gguf_appliance.grammar_worker MODEL MEMORY_BYTES` is the worker; `GrammarPool` and
`Grammar` are the node's side.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import numpy as np

from .errors import InvalidRequest, QueueFull, Unavailable

# A request: op, token, payload length. A reply: status, CPU seconds, payload length.
_REQUEST = struct.Struct("<BiI")
_REPLY = struct.Struct("<BdI")
_TRIGGER = struct.Struct("<I")
LOAD, STEP, ACCEPT, FREE = 1, 2, 3, 4
OK, MASK, NONE, ERROR, SOME = 0, 1, 2, 3, 4  # SOME: the allowed tokens of a shortlist


# --- the worker process ----------------------------------------------------------------------


def _read_exact(stream: IO[bytes], size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = stream.read(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _exit_with_parent(parent: int) -> None:
    """A node killed with -9 closes the pipe, but a worker deep in llama.cpp would not read
    it until the grammar call returns: watch the parent instead (ctypes calls free the GIL)."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(0)


def _worker(model: str, memory: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # an abort is a lost request, not a dump
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    import llama_cpp as C

    @C.llama_log_callback  # type: ignore[untyped-decorator]
    def quiet(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        pass  # the vocabulary's load lines; a grammar llama.cpp refuses is not logged

    C.llama_log_set(quiet, ctypes.c_void_p(0))
    C.llama_backend_init()
    params = C.llama_model_default_params()
    params.vocab_only = True
    params.use_mmap = False
    loaded = C.llama_model_load_from_file(model.encode(), params)
    if not loaded:
        sys.exit(3)
    vocab = C.llama_model_get_vocab(loaded)
    n_vocab = int(C.llama_vocab_n_tokens(vocab))
    dtype = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
    every = np.zeros(n_vocab, dtype=dtype)
    one = np.zeros(1, dtype=dtype)

    def array_of(data: Any) -> Any:
        return C.llama_token_data_array(
            data=data.ctypes.data_as(C.llama_token_data_p),
            size=len(data),
            selected=-1,
            sorted=False,
        )

    every_array, one_array = array_of(every), array_of(one)
    ids = np.arange(n_vocab, dtype=np.int32)
    sampler: Any = None

    def allowed_tokens() -> Any:
        every["id"] = ids
        every["logit"] = 0.0
        every["p"] = 0.0
        every_array.size = n_vocab
        C.llama_sampler_apply(sampler, ctypes.byref(every_array))
        return np.isfinite(every["logit"])

    def allows(token: int) -> bool:
        one[0] = (token, 0.0, 0.0)
        one_array.size = 1
        C.llama_sampler_apply(sampler, ctypes.byref(one_array))
        return bool(np.isfinite(one["logit"][0]))

    def shortlist_reply(shortlist: Any) -> tuple[int, bytes] | None:
        n = len(shortlist)
        every["id"][:n] = shortlist
        every["logit"][:n] = 0.0
        every["p"][:n] = 0.0
        every_array.size = n
        C.llama_sampler_apply(sampler, ctypes.byref(every_array))
        allowed = every["id"][:n][np.isfinite(every["logit"][:n])]
        return (SOME, allowed.astype(np.int32).tobytes()) if len(allowed) else None

    def mask_reply() -> tuple[int, bytes]:
        allowed = allowed_tokens()
        if not allowed.any():
            return NONE, b""
        return MASK, np.packbits(allowed).tobytes()

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        header = _read_exact(stdin, _REQUEST.size)
        if header is None:
            return
        op, token, size = _REQUEST.unpack(header)
        payload = _read_exact(stdin, size) if size else b""
        if payload is None:
            return
        started = time.thread_time()
        status, reply = OK, b""
        if op == LOAD:
            if sampler is not None:
                C.llama_sampler_free(sampler)
            # The payload: the trigger's length (0: none), the trigger, the grammar.
            (size,) = _TRIGGER.unpack_from(payload)
            trigger = payload[_TRIGGER.size : _TRIGGER.size + size]
            grammar = payload[_TRIGGER.size + size :]
            if trigger:  # lazy: free text until the trigger, held by the grammar from it on
                patterns = (ctypes.c_char_p * 1)(trigger)
                sampler = C.llama_sampler_init_grammar_lazy_patterns(
                    vocab, grammar, b"root", patterns, 1, None, 0
                )
            else:
                sampler = C.llama_sampler_init_grammar(vocab, grammar, b"root")
            sampler = sampler or None
            if sampler is None:
                status = ERROR
            else:
                status, reply = mask_reply()
        elif op == STEP:
            if allows(token):
                C.llama_sampler_accept(sampler, token)
            else:
                shortlist = np.frombuffer(payload, dtype=np.int32)
                found = shortlist_reply(shortlist) if len(shortlist) else None
                status, reply = found or mask_reply()
        elif op == ACCEPT:
            C.llama_sampler_accept(sampler, token)
        elif op == FREE and sampler is not None:
            C.llama_sampler_free(sampler)
            sampler = None
        stdout.write(_REPLY.pack(status, time.thread_time() - started, len(reply)) + reply)
        stdout.flush()


# --- the node's side -------------------------------------------------------------------------


class GrammarWorker:
    """One worker process and its pipes. `call` waits at most `timeout` seconds."""

    def __init__(self, model: Path, memory: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gguf_appliance.grammar_worker", str(model), str(memory)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,  # each request is one write; nothing is left in a buffer
            stderr=subprocess.DEVNULL,  # llama.cpp prints a grammar it refuses: user data
            start_new_session=True,  # a Ctrl-C meant for the node is the node's to handle
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        self._in = self.process.stdin
        self._out = self.process.stdout.fileno()
        self.alive = True

    def call(self, op: int, token: int, payload: bytes, timeout: float) -> tuple[int, float, bytes]:
        """The worker's answer; raises TimeoutError (the worker is then killed) or EOFError
        (it died: out of memory, or an abort in llama.cpp)."""
        deadline = time.monotonic() + timeout
        data = memoryview(_REQUEST.pack(op, token, len(payload)) + payload)
        while data:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([], [self._in], [], left)[1]:
                self.kill()
                raise TimeoutError
            try:
                data = data[self._in.write(data) or 0 :]
            except OSError:
                self.kill()
                raise EOFError from None
        header = self._read(_REPLY.size, deadline)
        status, cpu, size = _REPLY.unpack(header)
        return status, cpu, self._read(size, deadline) if size else b""

    def _read(self, size: int, deadline: float) -> bytes:
        data = b""
        while len(data) < size:
            left = deadline - time.monotonic()
            ready = left > 0 and select.select([self._out], [], [], left)[0]
            if not ready:
                self.kill()
                raise TimeoutError
            chunk = os.read(self._out, size - len(data))
            if not chunk:
                self.kill()
                raise EOFError
            data += chunk
        return data

    def kill(self) -> None:
        if self.alive:
            self.alive = False
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGKILL)
            self.process.wait()
            with contextlib.suppress(OSError):  # a pipe to a dead process: nothing to flush to
                self._in.close()
            if self.process.stdout is not None:
                self.process.stdout.close()


class GrammarPool:
    """Worker processes for the requests that have a grammar: one per request, at most
    `limit` at once. A worker whose request ended waits for the next one (starting one takes
    about half a second); past `idle_seconds` unused, all but one are stopped."""

    def __init__(
        self, model: Path, limit: int, memory: int, retry_after: int, idle_seconds: float = 60.0
    ) -> None:
        self.idle_seconds = idle_seconds
        self.model = model
        self.limit = limit
        self.memory = memory
        self.retry_after = retry_after
        self._lock = threading.Lock()
        self._idle: list[tuple[float, GrammarWorker]] = []  # (since, worker), newest last
        self._busy = 0
        self._closed = False

    @property
    def workers(self) -> int:
        return self._busy + len(self._idle)

    def acquire(self) -> GrammarWorker:
        """A worker for one request (blocking: starting one takes about half a second)."""
        with self._lock:
            if self._busy >= self.limit:
                raise QueueFull(
                    f"{self.limit} requests with a grammar are running or waiting; retry",
                    retry_after=self.retry_after,
                )
            self._busy += 1
            worker = None
            while self._idle and worker is None:
                worker = self._idle.pop()[1]
                if worker.process.poll() is not None:  # died while idle (the OOM killer...)
                    worker.kill()
                    worker = None
        if worker is None:
            try:
                worker = GrammarWorker(self.model, self.memory)
            except BaseException as exc:
                with self._lock:
                    self._busy -= 1
                if isinstance(exc, OSError):  # no process to be had (memory, process limit)
                    raise Unavailable(
                        f"cannot start a grammar worker: {exc.strerror or exc}",
                        retry_after=self.retry_after,
                    ) from None
                raise
        return worker

    def release(self, worker: GrammarWorker) -> None:
        now = time.monotonic()
        with self._lock:
            self._busy -= 1
            keep = worker.alive and not self._closed
            if keep:
                self._idle.append((now, worker))
            # The oldest idle workers, unused too long, but one.
            stale = [w for since, w in self._idle[:-1] if now - since > self.idle_seconds]
            self._idle = [(since, w) for since, w in self._idle if w not in stale]
        for old in stale if keep else [*stale, worker]:
            old.kill()

    def warm(self) -> None:
        """Start the idle worker ahead of the first request (run it in a thread)."""
        worker = GrammarWorker(self.model, self.memory)
        with self._lock:
            keep = not self._closed and not self._idle
            if keep:
                self._idle.append((time.monotonic(), worker))
        if not keep:
            worker.kill()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for _, worker in idle:
            worker.kill()


class Grammar:
    """A request's grammar, loaded in a worker of the pool; `close()` gives the worker back.

    `step_limit` is the CPU a step may take (past it the request ends, the worker is kept);
    `hard_limit` the wall-clock time (past it the worker is killed). `trigger`: see
    grammar.Constraint.
    """

    def __init__(
        self,
        pool: GrammarPool,
        text: str,
        *,
        param: str,
        step_limit: float,
        hard_limit: float,
        trigger: str | None = None,
    ) -> None:
        self.pool = pool
        self.param = param
        self.step_limit = step_limit
        self.hard_limit = hard_limit
        self.n_tokens = 0
        self.worker: GrammarWorker | None = pool.acquire()
        try:
            # Trying the grammar on its first token masks the whole vocabulary, off the
            # scheduler's thread: it may take longer than a step.
            pattern = (trigger or "").encode()
            payload = _TRIGGER.pack(len(pattern)) + pattern + text.encode()
            status, _ = self._call(LOAD, 0, payload, "start", max(hard_limit, 3.0), 4 * step_limit)
        except BaseException:
            self.close()
            raise
        if status == ERROR:
            self.close()
            raise InvalidRequest(
                "llama.cpp could not use the grammar (a rule is left-recursive, a <token> is "
                "not one token of this model, or it needs more memory than a grammar may have)",
                param=param,
            )
        if status == NONE:
            self.close()
            raise InvalidRequest(
                "the grammar allows no token of this model at its start", param=param
            )

    def _call(
        self,
        op: int,
        token: int,
        payload: bytes,
        where: str,
        timeout: float | None = None,
        cpu_limit: float | None = None,
    ) -> tuple[int, bytes]:
        timeout = self.hard_limit if timeout is None else timeout
        cpu_limit = self.step_limit if cpu_limit is None else cpu_limit
        worker = self.worker
        assert worker is not None
        try:
            status, cpu, reply = worker.call(op, token, payload, timeout)
        except TimeoutError:
            raise InvalidRequest(
                f"the grammar took more than {timeout:g} s to check one token ({where}); it is "
                "too ambiguous for this node",
                param=self.param,
            ) from None
        except EOFError:
            raise InvalidRequest(
                f"the grammar's checker failed ({where}): it ran out of its memory, or "
                "llama.cpp's grammar code gave up on this grammar",
                param=self.param,
            ) from None
        if cpu > cpu_limit:
            raise InvalidRequest(
                f"the grammar takes {cpu * 1000:.0f} ms of CPU to check one token ({where}; at "
                f"most {cpu_limit * 1000:.0f} ms); use fewer alternatives",
                param=self.param,
            )
        return status, reply

    def _where(self) -> str:
        n = self.n_tokens
        return f"after {n} token{'' if n == 1 else 's'} of the answer"

    def step(self, token: int, n_vocab: int, shortlist: Any = None) -> Any:
        """True if the grammar allows `token` (then it is accepted); else the boolean mask of
        the tokens it allows (only among `shortlist`, token ids, when some of those are
        allowed); None if it allows none."""
        payload = b"" if shortlist is None else shortlist.astype(np.int32).tobytes()
        status, reply = self._call(STEP, token, payload, self._where())
        if status == OK:
            self.n_tokens += 1
            return True
        if status == NONE:
            return None
        if status == SOME:
            allowed = np.zeros(n_vocab, dtype=bool)
            allowed[np.frombuffer(reply, dtype=np.int32)] = True
            return allowed
        return np.unpackbits(np.frombuffer(reply, dtype=np.uint8), count=n_vocab).astype(bool)

    def accept(self, token: int) -> None:
        self._call(ACCEPT, token, b"", self._where())
        self.n_tokens += 1

    def close(self) -> None:
        worker, self.worker = self.worker, None
        if worker is None:
            return
        if worker.alive:
            with contextlib.suppress(TimeoutError, EOFError):
                worker.call(FREE, 0, b"", self.hard_limit)
        self.pool.release(worker)


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]))
