"""The engine: a model, a wait queue and a worker thread that decodes the running requests.

The HTTP layer sees only `Engine.submit()` and the `Generation` it returns: iterate its events,
`cancel()` it. Every step of the worker decodes one token for each running request (and a chunk
of prompt for a new one), so a cancel, a deadline or a stop string takes effect within a token.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import (
    ApplianceError,
    Draining,
    InvalidRequest,
    NotReady,
    PromptTooLong,
    QueueFull,
    Unavailable,
)
from .llama import Batch, LlamaModel, SamplingParams
from .textstream import TextStream

log = logging.getLogger("gguf_appliance.engine")


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class TokenEvent:
    text: str


@dataclass(frozen=True)
class DoneEvent:
    finish_reason: str  # stop | length | cancelled | timeout
    prompt_tokens: int
    completion_tokens: int
    queue_seconds: float
    time_to_first_token: float | None
    tokens_per_second: float | None
    duration: float


@dataclass(frozen=True)
class ErrorEvent:
    error: ApplianceError


Event = TokenEvent | DoneEvent | ErrorEvent


@dataclass(frozen=True)
class EngineConfig:
    n_ctx: int
    n_slots: int
    n_batch: int
    threads: int
    queue_size: int
    max_tokens_cap: int
    retry_after: int


@dataclass
class _Job:
    id: int
    prompt: list[int]
    params: GenerationParams
    deadline: float
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Event]
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    abort: ApplianceError | None = None  # set with `cancelled` when the node ends the job


class Generation:
    """A submitted request: iterate its events; cancel it when the client goes away."""

    def __init__(self, engine: Engine, job: _Job) -> None:
        self._engine = engine
        self._job = job
        self.prompt_tokens = len(job.prompt)

    async def events(self) -> AsyncIterator[Event]:
        while True:
            event = await self._job.events.get()
            yield event
            if not isinstance(event, TokenEvent):
                return

    def cancel(self) -> None:
        self._engine._cancel(self._job)


@dataclass
class _Slot:
    seq: int
    job: _Job | None = None
    sampler: Any = None
    text: TextStream | None = None
    n_past: int = 0  # tokens of this sequence in the KV cache
    prompt_done: int = 0  # prompt tokens already decoded
    last_token: int = -1
    generated: int = 0
    started: float = 0.0
    first_token_at: float | None = None
    batch_index: int = -1  # where this slot's logits are in the current batch

    @property
    def prefilling(self) -> bool:
        return self.job is not None and self.prompt_done < len(self.job.prompt)


class Engine:
    """Owns the model; runs generation off the event loop on one worker thread."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model: LlamaModel | None = None
        self.model_path: Path | None = None
        self.load_seconds: float | None = None
        self.load_error: str | None = None
        self.draining = False
        # Called on the worker thread with every finished generation (the metrics use it).
        self.on_done: Callable[[DoneEvent], None] | None = None
        self.prompt_tokens_total = 0
        self.completion_tokens_total = 0
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._waiting: deque[_Job] = deque()
        self._slots = [_Slot(seq=i) for i in range(config.n_slots)]
        self._stop = False
        self._thread: threading.Thread | None = None

    # --- life cycle ---

    def load(self, model_path: Path) -> None:
        """Load the model and start the worker (blocking: run it in a thread)."""
        started = time.monotonic()
        self.model_path = model_path
        self.model = LlamaModel(
            model_path,
            n_ctx=self.config.n_ctx,
            n_seq=self.config.n_slots,
            n_batch=self.config.n_batch,
            threads=self.config.threads,
        )
        self.load_seconds = time.monotonic() - started
        self._thread = threading.Thread(target=self._run, name="gguf-engine", daemon=True)
        self._thread.start()
        log.info(
            "model loaded in %.2f s: %s, %d slots of %d tokens, %d threads",
            self.load_seconds,
            model_path.name,
            self.config.n_slots,
            self.model.n_ctx_seq,
            self.config.threads,
        )

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.model is not None:
            self.model.close()
            self.model = None

    @property
    def ready(self) -> bool:
        return self.model is not None and self._thread is not None

    @property
    def slot_context(self) -> int:
        assert self.model is not None
        return self.model.n_ctx_seq

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def busy_slots(self) -> int:
        return sum(1 for s in self._slots if s.job is not None)

    @property
    def in_flight(self) -> int:
        return self.queue_depth + self.busy_slots

    # --- the async interface ---

    def tokenize_messages(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        return self._require_model().chat_prompt(messages)

    def tokenize_prompt(self, prompt: str) -> list[int]:
        return self._require_model().text_prompt(prompt)

    def submit(self, prompt: list[int], params: GenerationParams, timeout: float) -> Generation:
        """Queue a tokenized prompt. Raises at once for what can be known before decoding."""
        self._require_model()
        if self.draining:
            raise Draining("the node is shutting down; retry on another node")
        if not prompt:
            raise InvalidRequest("the prompt is empty", param="prompt")
        if params.max_tokens > self.config.max_tokens_cap:
            raise InvalidRequest(
                f"max_tokens is {params.max_tokens}; this node allows at most "
                f"{self.config.max_tokens_cap}",
                param="max_tokens",
            )
        room = self.slot_context
        if len(prompt) >= room:
            raise PromptTooLong(
                f"the prompt has {len(prompt)} tokens; the context holds {room} tokens per "
                f"request, and at least one must be left for the answer",
                param="messages",
            )
        job = _Job(
            id=next(self._ids),
            prompt=prompt,
            params=params,
            deadline=time.monotonic() + timeout,
            loop=asyncio.get_running_loop(),
            events=asyncio.Queue(),
        )
        with self._cond:
            free = sum(1 for s in self._slots if s.job is None)
            if len(self._waiting) - free >= self.config.queue_size:
                raise QueueFull(
                    "the node is busy: every slot is taken and the queue is full",
                    retry_after=self.config.retry_after,
                )
            self._waiting.append(job)
            self._cond.notify()
        return Generation(self, job)

    def _require_model(self) -> LlamaModel:
        if self.model is None:
            raise NotReady(
                self.load_error or "the model is still loading", retry_after=self.config.retry_after
            )
        return self.model

    def abort_all(self, error: ApplianceError) -> None:
        """End every queued and running request with `error` (the drain's last resort)."""
        with self._cond:
            jobs = [*self._waiting, *(s.job for s in self._slots if s.job is not None)]
            for job in jobs:
                job.abort = error
                job.cancelled = True
            self._cond.notify()

    def _cancel(self, job: _Job) -> None:
        with self._cond:
            job.cancelled = True
            self._cond.notify()

    # --- the worker thread ---

    def _emit(self, job: _Job, event: Event) -> None:
        if isinstance(event, DoneEvent) and self.on_done is not None:
            self.on_done(event)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
            job.loop.call_soon_threadsafe(job.events.put_nowait, event)

    def _run(self) -> None:
        assert self.model is not None
        batch = Batch(self.model.n_batch + len(self._slots))
        try:
            while True:
                with self._cond:
                    self._admit()
                    while not self._stop and not any(s.job for s in self._slots):
                        self._cond.wait()
                        self._admit()
                    if self._stop:
                        break
                try:
                    self._step(batch)
                except Exception as exc:  # a failed decode must not kill the worker
                    log.exception("decode step failed")
                    for slot in self._slots:
                        if slot.job is not None:
                            self._fail(slot, Unavailable(f"generation failed: {exc}"))
        finally:
            for slot in self._slots:
                if slot.job is not None:
                    self._fail(slot, Unavailable("the engine stopped"))
            with self._cond:
                while self._waiting:
                    job = self._waiting.popleft()
                    self._emit(job, ErrorEvent(Unavailable("the engine stopped")))
            batch.free()

    def _admit(self) -> None:
        """Move waiting jobs into free slots, FIFO; drop those cancelled or expired meanwhile."""
        now = time.monotonic()
        for job in list(self._waiting):
            if job.abort is not None:
                self._waiting.remove(job)
                self._emit(job, ErrorEvent(job.abort))
            elif job.cancelled or now >= job.deadline:
                self._waiting.remove(job)
                reason = "cancelled" if job.cancelled else "timeout"
                self._emit(
                    job,
                    DoneEvent(
                        reason,
                        len(job.prompt),
                        0,
                        now - job.submitted,
                        None,
                        None,
                        now - job.submitted,
                    ),
                )
        for slot in self._slots:
            if not self._waiting:
                return
            if slot.job is None:
                self._start(slot, self._waiting.popleft(), now)

    def _start(self, slot: _Slot, job: _Job, now: float) -> None:
        assert self.model is not None
        self.model.forget(slot.seq)
        slot.job = job
        slot.sampler = self.model.new_sampler(job.params.sampling)
        slot.text = TextStream(job.params.stop)
        slot.n_past = 0
        slot.prompt_done = 0
        slot.generated = 0
        slot.started = now
        slot.first_token_at = None

    def _step(self, batch: Batch) -> None:
        model = self.model
        assert model is not None
        now = time.monotonic()
        batch.clear()
        budget = model.n_batch
        for slot in self._slots:
            job = slot.job
            slot.batch_index = -1
            if job is None:
                continue
            if job.abort is not None:
                self._fail(slot, job.abort)
            elif job.cancelled:
                self._finish(slot, "cancelled", now)
            elif now >= job.deadline:
                self._finish(slot, "timeout", now)
            elif not slot.prefilling:
                slot.batch_index = batch.add(slot.last_token, slot.n_past, slot.seq, True)
                slot.n_past += 1
                budget -= 1
        for slot in self._slots:
            if slot.job is None or not slot.prefilling or budget <= 0:
                continue
            prompt = slot.job.prompt
            chunk = prompt[slot.prompt_done : slot.prompt_done + budget]
            for j, token in enumerate(chunk):
                last = slot.prompt_done + j == len(prompt) - 1
                index = batch.add(token, slot.n_past, slot.seq, last)
                slot.n_past += 1
                if last:
                    slot.batch_index = index
            slot.prompt_done += len(chunk)
            self.prompt_tokens_total += len(chunk)
            budget -= len(chunk)
        if batch.n == 0:
            return
        status = model.decode(batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")
        for slot in self._slots:
            if slot.job is not None and slot.batch_index >= 0:
                self._accept(slot, model.sample(slot.sampler, slot.batch_index))

    def _accept(self, slot: _Slot, token: int) -> None:
        model = self.model
        job = slot.job
        assert model is not None and job is not None and slot.text is not None
        now = time.monotonic()
        if slot.first_token_at is None:
            slot.first_token_at = now
        if model.is_eog(token):
            self._finish(slot, "stop", now)
            return
        slot.generated += 1
        self.completion_tokens_total += 1
        slot.last_token = token
        text = slot.text.push(model.piece(token))
        if text:
            self._emit(job, TokenEvent(text))
        if slot.text.stopped:
            self._finish(slot, "stop", now)
        elif slot.generated >= job.params.max_tokens or slot.n_past >= model.n_ctx_seq:
            self._finish(slot, "length", now)

    def _finish(self, slot: _Slot, reason: str, now: float) -> None:
        job = slot.job
        assert job is not None and slot.text is not None
        if reason in ("stop", "length"):
            rest = slot.text.flush()
            if rest:
                self._emit(job, TokenEvent(rest))
        first = slot.first_token_at
        decode_seconds = now - first if first is not None else 0.0
        rate = (
            (slot.generated - 1) / decode_seconds
            if slot.generated > 1 and decode_seconds > 0
            else None
        )
        self._emit(
            job,
            DoneEvent(
                finish_reason=reason,
                prompt_tokens=len(job.prompt),
                completion_tokens=slot.generated,
                queue_seconds=slot.started - job.submitted,
                time_to_first_token=None if first is None else first - job.submitted,
                tokens_per_second=rate,
                duration=now - job.submitted,
            ),
        )
        self._release(slot)

    def _fail(self, slot: _Slot, error: ApplianceError) -> None:
        assert slot.job is not None
        self._emit(slot.job, ErrorEvent(error))
        self._release(slot)

    def _release(self, slot: _Slot) -> None:
        if slot.sampler is not None:
            LlamaModel.free_sampler(slot.sampler)
        slot.job = None
        slot.sampler = None
        slot.text = None
