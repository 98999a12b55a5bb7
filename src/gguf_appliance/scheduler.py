"""The slot scheduler: continuous batching of many requests over one llama.cpp context.

Each of N slots is one sequence of the context with its own KV range and sampler chain. Every
step builds one batch: the last sampled token of every generating slot, plus prompt tokens of
slots still reading their prompt (at most `prefill_chunk` of them while others generate, so a
long prompt never stalls the streams in flight). One `llama_decode`, then one sample per slot
that asked for logits. The batch holds its tokens in sequence order, and a new request takes a
free slot that keeps the busy slots' sequence ids together: with a KV cache per sequence,
llama.cpp makes one pass over the weights for each run of consecutive ids (0, 2, 4, 6 take four
passes, 0-3 one). A slot keeps its KV when its request ends; the next request that starts with
at least REUSE_MIN of the same tokens (a chat's next turn) takes that slot and evaluates only what
is new.

A request of several choices (`GenerationParams.n`, and several prompts) takes one slot per
choice, all at once: it waits at the head of the queue until that many are free (FIFO: later
requests wait behind it, so it is never starved). Each prompt is read once, by its first
choice's slot; the step that reads its last token copies its KV to its sibling choices' slots
(`llama_memory_seq_cp`) and every choice samples its first token from those logits, then goes
its own way.

Two traffic classes share the slots. Waiting interactive jobs start first (FIFO among them);
a batch job (`Job.batch`: a batch key's) starts only when no interactive job waits, and batch
jobs together hold at most n_slots - 1 slots, so one is always free for the next interactive
request (a batch request of more choices than that runs only when no other batch job does).
Interactive requests come first within a step too, because a chat's first token waits for the
step in flight and then for the step that reads its prompt:
- a step that reads an interactive prompt reads no batch prompt and leaves the batch streams'
  next tokens out (they wait one step);
- while interactive requests are about (one held a slot in the last CHAT_RECENT seconds), batch
  prompts are read at most BATCH_PREFILL (4) tokens a step, so every step stays short; with none
  about, a chunk a step like any prompt;
- a batch job takes a slot that holds an interactive request's cache only if no other is free.

Log probabilities are computed only for requests that ask (`GenerationParams.logprobs`), from
the logits of the step, on this thread. A request that scores its prompt asks llama.cpp for
the logits of every prompt position, so it reads its whole prompt (no cached prefix), at most
`SCORE_ROWS` positions a step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import ApplianceError, InvalidRequest, QueueFull, Unavailable
from .generation import DoneEvent, ErrorEvent, Event, Job, Logprob, TokenEvent
from .llama import Batch, LlamaModel
from .textstream import TextStream

log = logging.getLogger("gguf_appliance.scheduler")

# Prompt positions scored per step: each takes a row of n_vocab floats in llama.cpp's output
# buffer (64 rows of a 49,152-token vocabulary: 12.6 MB), and a log-softmax here.
SCORE_ROWS = 64


# Most batch prompt tokens read in a step while interactive requests are about (one ran in the
# last CHAT_RECENT seconds): a chat that comes waits for the step in flight, and a step of 4
# prompt tokens and the streams' next tokens is short (about 45 ms here, 60 ms with 8 tokens).
# With no interactive request about, batch prompts are read like any (`prefill_chunk`).
BATCH_PREFILL = 4
CHAT_RECENT = 10.0
# Fewest cached prompt tokens that make a slot's cache worth taking over packing the busy slots
# together: reading 32 tokens costs about as much as a few steps of an extra decode pass.
REUSE_MIN = 32


def _runs(seqs: set[int]) -> int:
    """How many runs of consecutive numbers `seqs` makes ({0, 1, 3} makes 2)."""
    return sum(1 for s in seqs if s - 1 not in seqs)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class Slot:
    seq: int
    cache: list[int] = field(default_factory=list)  # the tokens in this sequence's KV range
    last_used: float = 0.0
    batch_cache: bool = False  # its cache is a batch job's (else an interactive one's, or empty)
    job: Job | None = None
    choice: int = 0  # the job's choice this slot makes
    prompt: list[int] = field(default_factory=list)  # that choice's prompt
    leader: Slot | None = None  # the slot reading the prompt for this one, until it is read
    followers: list[Slot] = field(default_factory=list)  # the slots this one reads it for
    sampler: Any = None
    text: TextStream | None = None
    prompt_done: int = 0  # prompt tokens in the KV cache (reused or evaluated)
    cached: int = 0  # of those, reused from the previous request
    last_token: int = -1
    generated: int = 0
    started: float = 0.0
    first_token_at: float | None = None
    batch_index: int = -1  # where this slot's logits are in the current batch
    unsent: list[str] = field(default_factory=list)  # text held for the next token event
    sent_at: float = 0.0
    chars_out: int = 0  # characters of the answer released (sent or in `unsent`)
    # Logprobs of generated tokens not yet sent, each with where its text begins (a character
    # offset): sent with the text they made, dropped with a stop string.
    unsent_logprobs: list[tuple[int, Logprob]] = field(default_factory=list)
    prompt_logprobs: list[Logprob] = field(default_factory=list)  # scored so far
    scoring: list[tuple[int, int]] = field(default_factory=list)  # (prompt position, batch index)

    @property
    def prefilling(self) -> bool:
        return self.job is not None and self.prompt_done < len(self.prompt)


@dataclass(frozen=True)
class EngineConfig:
    """The engine's knobs; the scheduler reads the ones about slots and the queue.

    The node's defaults are its settings' (`engine.engine_config`); the grammar limits below
    are not settings, and are stated here.
    """

    n_ctx: int  # per slot
    n_slots: int
    n_batch: int
    threads: int
    queue_size: int
    max_tokens_cap: int
    retry_after: int
    prefill_chunk: int  # prompt tokens per step while other slots generate
    reuse_prefix: bool
    stream_interval: float  # seconds between a stream's token events (0: every token)
    kv_cache_type: str = "f16"  # the KV cache's number type (llama.KV_TYPES)
    # Most seconds a request's grammar may take to check one token: the check runs on the
    # scheduler thread, so every other stream waits for it.
    grammar_step_limit: float = 0.25
    # Wall-clock seconds a grammar worker may take for one token before it is killed.
    grammar_hard_limit: float = 1.0
    grammar_memory: int = 1 << 30  # address space of each grammar worker process


class SlotScheduler:
    def __init__(
        self,
        model: LlamaModel,
        config: EngineConfig,
        on_done: Callable[[DoneEvent], None] | None = None,
    ) -> None:
        self.model = model
        self.config = config
        self.on_done = on_done
        self.prompt_tokens_total = 0
        self.cached_tokens_total = 0
        self.completion_tokens_total = 0
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self.slots = [Slot(seq=i) for i in range(config.n_slots)]
        self._stop = False
        self._outbox: list[tuple[Job, Event]] = []
        self._chat_seen = float("-inf")  # when an interactive request last held a slot
        self._thread = threading.Thread(target=self._run, name="gguf-scheduler", daemon=True)

    # --- called from the event loop ---

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def busy_slots(self) -> int:
        return sum(1 for s in self.slots if s.job is not None)

    @property
    def batch_slots(self) -> int:
        """Most slots batch jobs hold together: all but one (the one, with a single slot)."""
        return max(1, len(self.slots) - 1)

    def _in_admission_order(self, new: Job | None = None) -> list[Job]:
        """The waiting jobs (and `new`, last of its class) in the order they start: the
        interactive ones, then the batch ones, each class first-in first-out."""
        jobs = [*self._waiting, *([new] if new is not None else [])]
        return [j for j in jobs if not j.batch] + [j for j in jobs if j.batch]

    def _startable(self, jobs: list[Job]) -> list[Job]:
        """Of `jobs`, in admission order, those the free slots start now: up to the first that
        cannot start (all its choices at once; a batch job also within `batch_slots`)."""
        free = sum(1 for s in self.slots if s.job is None)
        batch_busy = sum(1 for s in self.slots if s.job is not None and s.job.batch)
        starts = []
        for job in jobs:
            if job.choices > free:
                break
            if job.batch:
                if batch_busy and batch_busy + job.choices > self.batch_slots:
                    break
                batch_busy += job.choices
            free -= job.choices
            starts.append(job)
        return starts

    def enqueue(self, job: Job) -> None:
        """Queue a job of at most n_slots choices, unless more than `queue_size` jobs would
        then wait for their slots: those the free slots cannot start now, counting only the
        jobs that start before it (a queue of batch jobs never turns an interactive one away)."""
        with self._cond:
            order = self._in_admission_order(job)
            ahead = order[: order.index(job) + 1]
            waiting = len(ahead) - len(self._startable(ahead))
            if waiting > self.config.queue_size:
                raise QueueFull(
                    "the node is busy: every slot is taken and the queue is full",
                    retry_after=self.config.retry_after,
                )
            self._waiting.append(job)
            self._cond.notify()

    def cancel(self, job: Job, error: ApplianceError | None = None) -> None:
        with self._cond:
            job.abort = job.abort or error
            job.cancelled = True
            self._cond.notify()

    def abort_all(self, error: ApplianceError) -> None:
        with self._cond:
            for job in [*self._waiting, *(s.job for s in self.slots if s.job is not None)]:
                job.abort = error
                job.cancelled = True
            self._cond.notify()

    # --- the scheduler thread ---

    def _run(self) -> None:
        batch = Batch(self.model.n_batch + len(self.slots))
        try:
            while True:
                with self._cond:
                    self._admit()
                    while not self._stop and not any(s.job for s in self.slots):
                        self._deliver()
                        self._cond.wait()
                        self._admit()
                    if self._stop:
                        break
                try:
                    self._step(batch)
                except Exception as exc:  # a failed decode must not kill the scheduler
                    log.exception("decode step failed")
                    for slot in self.slots:
                        if slot.job is not None:
                            self._fail(slot, Unavailable(f"generation failed: {exc}"))
                        self.model.forget(slot.seq, 0)
                        slot.cache.clear()
                self._deliver()
        finally:
            stopped = Unavailable("the engine stopped")
            for slot in self.slots:
                if slot.job is not None:
                    self._fail(slot, stopped)
            with self._cond:
                while self._waiting:
                    job = self._waiting.popleft()
                    job.free_grammar()
                    self._emit(job, ErrorEvent(stopped))
            self._deliver()
            batch.free()

    def _emit(self, job: Job, event: Event) -> None:
        self._outbox.append((job, event))

    def _deliver(self) -> None:
        """Hand this step's events to their event loops: one wake-up per loop, not per event."""
        if not self._outbox:
            return
        outbox, self._outbox = self._outbox, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, Event]]] = {}
        for job, event in outbox:
            by_loop.setdefault(job.loop, []).append((job, event))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
                loop.call_soon_threadsafe(_put_all, items)

    def _admit(self) -> None:
        """Give free slots to waiting jobs in admission order; drop jobs cancelled or expired
        meanwhile."""
        now = time.monotonic()
        for job in list(self._waiting):
            if job.abort is not None:
                self._waiting.remove(job)
                job.free_grammar()
                self._emit(job, ErrorEvent(job.abort))
            elif job.cancelled or now >= job.deadline:
                self._waiting.remove(job)
                job.free_grammar()
                self._done(
                    job, job.ended_in_queue("cancelled" if job.cancelled else "timeout", now)
                )
        for job in self._startable(self._in_admission_order()):
            self._waiting.remove(job)
            free = [s for s in self.slots if s.job is None]
            job.reasons = [""] * job.choices
            job.running = job.choices
            job.started = now
            choice = 0
            for prompt in job.prompts:
                leader = self._pick(free, prompt, job.batch)
                free.remove(leader)
                self._start(leader, job, prompt, choice, now)
                for i in range(1, job.params.n):  # its siblings: a cache is of no use to them
                    sibling = self._pick(free, [], job.batch)
                    free.remove(sibling)
                    self._start(sibling, job, prompt, choice + i, now, leader=leader, offset=i)
                    leader.followers.append(sibling)
                choice += job.params.n

    def _pick(self, free: list[Slot], prompt: list[int], batch: bool) -> Slot:
        """The free slot for a prompt: the one whose cache shares the longest start with it, if
        that saves reading at least REUSE_MIN tokens; else one that keeps the busy slots' sequence
        ids in as few runs as it can (llama.cpp decodes each run of consecutive ids in a pass of
        its own: see `_step`), and among those the one sharing the most with the prompt, then the
        one unused the longest, so a recent conversation's cache survives the longest. A batch job
        takes a slot holding an interactive request's cache only if no other is free: a chat's
        next turn finds its cache, however many batch rows went through meanwhile."""
        shared = {
            s.seq: common_prefix(s.cache, prompt) if self.config.reuse_prefix else 0 for s in free
        }
        best = max(free, key=lambda s: (shared[s.seq], -s.last_used))
        if shared[best.seq] >= min(REUSE_MIN, len(prompt) - 1) > 0:
            return best
        busy = {s.seq for s in self.slots if s.job is not None}
        return min(
            free,
            key=lambda s: (
                batch and bool(s.cache) and not s.batch_cache,
                _runs(busy | {s.seq}),
                -shared[s.seq],
                s.last_used,
            ),
        )

    def _start(
        self,
        slot: Slot,
        job: Job,
        prompt: list[int],
        choice: int,
        now: float,
        leader: Slot | None = None,
        offset: int = 0,
    ) -> None:
        reuse = self.config.reuse_prefix and not job.params.score_prompt and leader is None
        keep = common_prefix(slot.cache, prompt) if reuse else 0
        keep = min(keep, len(prompt) - 1)  # the last prompt token is evaluated for logits
        if not self.model.forget(slot.seq, keep):
            keep = 0
            self.model.forget(slot.seq, 0)
        del slot.cache[keep:]
        slot.job = job
        slot.batch_cache = job.batch
        slot.choice = choice
        slot.prompt = prompt
        slot.leader = leader
        slot.followers.clear()
        sampling = job.params.sampling
        if offset and sampling.seed is not None:
            sampling = replace(sampling, seed=sampling.seed + offset)
        slot.sampler = self.model.new_sampler(sampling)
        slot.text = TextStream(job.params.stop)
        slot.prompt_done = slot.cached = keep
        slot.generated = 0
        slot.started = now
        slot.first_token_at = None
        slot.unsent.clear()
        slot.sent_at = 0.0
        slot.chars_out = 0
        slot.unsent_logprobs.clear()
        slot.prompt_logprobs.clear()
        if job.params.score_prompt and leader is None:  # nothing before it predicts it
            first = prompt[0]
            slot.prompt_logprobs.append(Logprob(first, self.model.piece(first), None))
        job.cached += keep
        self.cached_tokens_total += keep

    def _step(self, batch: Batch) -> None:
        now = time.monotonic()
        batch.clear()
        generating = 0
        for slot in self.slots:
            job = slot.job
            slot.batch_index = -1
            slot.scoring.clear()
            if job is None:
                continue
            if job.abort is not None:
                self._fail(slot, job.abort)
            elif job.cancelled:
                self._finish(slot, "cancelled", now)
            elif now >= job.deadline:
                self._finish(slot, "timeout", now)
            elif not slot.prefilling:
                generating += 1
        # A step that reads an interactive prompt reads no batch prompt and leaves the batch
        # streams out: the chat's first token waits for one pass over its own tokens only.
        chat_reads = any(s.job is not None and not s.job.batch and s.prefilling for s in self.slots)
        reads = self._prompt_reads(generating, now, chat_reads)
        # The tokens go in in sequence order: with a KV cache per sequence, llama.cpp splits a
        # batch into passes over the weights, one for each run of consecutive sequence ids in
        # the batch's order (llama_batch_allocr::split_equal, sequential), so tokens of
        # sequences 0, 1, 2 and 3 in that order take one pass, and in any other order up to four.
        for slot in self.slots:
            job = slot.job
            if job is None:
                continue
            if not slot.prefilling:
                if chat_reads and job.batch:
                    continue
                slot.batch_index = batch.add(slot.last_token, len(slot.cache), slot.seq, True)
                slot.cache.append(slot.last_token)
                continue
            size = reads.get(slot.seq, 0)
            if not size:
                continue
            prompt = slot.prompt
            score = job.params.score_prompt
            chunk = prompt[slot.prompt_done : slot.prompt_done + size]
            last = len(prompt) - 1
            for j, token in enumerate(chunk, start=slot.prompt_done):
                index = batch.add(token, len(slot.cache), slot.seq, score or j == last)
                slot.cache.append(token)
                if score and j < last:  # these logits predict the prompt's next token
                    slot.scoring.append((j + 1, index))
                if j == last:
                    slot.batch_index = index
                    for follower in slot.followers:  # their first token: from these logits
                        follower.batch_index = index
            slot.prompt_done += len(chunk)
            self.prompt_tokens_total += len(chunk)
        if batch.n == 0:
            return
        self._decode_and_sample(batch)

    def _prompt_reads(self, generating: int, now: float, chat_reads: bool) -> dict[int, int]:
        """How many prompt tokens each prefilling slot reads this step (by sequence id);
        `chat_reads`: an interactive prompt is among them."""
        if any(s.job is not None and not s.job.batch for s in self.slots):
            self._chat_seen = now
        near_chat = now - self._chat_seen < CHAT_RECENT
        budget = self.model.n_batch - generating
        if generating:
            budget = min(budget, self.config.prefill_chunk)
        score_budget = SCORE_ROWS
        prefilling = sorted(
            (s for s in self.slots if s.prefilling),
            key=lambda s: (s.job is not None and s.job.batch, s.started),
        )
        # With interactive requests about, batch prompts are read BATCH_PREFILL tokens a step:
        # a chat's first token waits for few batch prompt tokens.
        reads: dict[int, int] = {}
        for slot in prefilling:
            if budget <= 0:
                break
            assert slot.job is not None
            if slot.leader is not None:  # its leader reads the prompt
                continue
            if slot.job.batch:
                if chat_reads:
                    break
                # Alone, still at most a chunk: a chat after a quiet spell waits for one step.
                chunk = BATCH_PREFILL if near_chat else self.config.prefill_chunk
                budget = min(budget, chunk)
            score = slot.job.params.score_prompt
            size = min(budget, score_budget) if score else budget
            size = min(size, len(slot.prompt) - slot.prompt_done)
            if size <= 0:
                continue
            reads[slot.seq] = size
            if score:
                score_budget -= size
            budget -= size
        return reads

    def _decode_and_sample(self, batch: Batch) -> None:
        model = self.model
        status = model.decode(batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")
        for slot in self.slots:
            leader = slot.leader
            if leader is not None and slot.batch_index >= 0:  # its prompt is read: copy it
                model.copy_sequence(leader.seq, slot.seq)
                slot.cache[:] = leader.cache
                slot.prompt_done = len(slot.prompt)
                slot.leader = None
        for slot in self.slots:
            if slot.prompt_logprobs and (slot.scoring or not slot.prefilling):
                self._score_prompt(slot)
        for slot in self.slots:
            job = slot.job
            if job is None or slot.batch_index < 0:
                continue
            if job.params.max_tokens == 0:  # the prompt was all it asked to read
                self._finish(slot, "length", time.monotonic())
                continue
            if job.grammar is None:
                token = model.sample(slot.sampler, slot.batch_index)
                self._accept(slot, token, self._logprob(slot, token))
                continue
            try:
                token = model.sample_constrained(
                    slot.sampler, job.grammar, slot.batch_index, job.params.sampling.greedy
                )
            except InvalidRequest as exc:  # the grammar's worker: too slow, or it died
                self._fail(slot, exc)
                continue
            if token < 0:
                self._fail(
                    slot,
                    InvalidRequest(
                        "the grammar allows no token of this model after "
                        f"{slot.generated} token{'' if slot.generated == 1 else 's'} of the answer",
                        param=job.grammar.param,
                    ),
                )
                continue
            self._accept(slot, token, self._logprob(slot, token))

    def _logprob(self, slot: Slot, token: int) -> Logprob | None:
        """The sampled token's logprob and alternatives, if its request asks for them."""
        assert slot.job is not None
        k = slot.job.params.logprobs
        return None if k is None else self._entry(slot.batch_index, token, k)

    def _entry(self, index: int, token: int, k: int) -> Logprob:
        model = self.model
        value, top = model.logprobs(index, token, k)
        alternatives = tuple(Logprob(t, model.piece(t), v) for t, v in top)
        return Logprob(token, model.piece(token), value, alternatives)

    def _score_prompt(self, slot: Slot) -> None:
        """The logprobs of the prompt tokens this step's logits predict; all of them once the
        prompt is read, in one event for the choice."""
        job = slot.job
        assert job is not None
        k = job.params.logprobs or 0
        for position, index in slot.scoring:
            slot.prompt_logprobs.append(self._entry(index, slot.prompt[position], k))
        slot.scoring.clear()
        if not slot.prefilling:
            scored = tuple(slot.prompt_logprobs)
            for choice in (slot, *slot.followers):
                self._emit(job, TokenEvent("", choice.choice, scored, prompt=True))
            slot.prompt_logprobs.clear()

    def _accept(self, slot: Slot, token: int, logprob: Logprob | None = None) -> None:
        model = self.model
        job = slot.job
        assert job is not None and slot.text is not None
        now = time.monotonic()
        if slot.first_token_at is None:
            slot.first_token_at = now
        if model.is_eog(token):
            self._finish(slot, "stop", now)
            return
        slot.generated += 1
        self.completion_tokens_total += 1
        slot.last_token = token
        if logprob is not None:
            slot.unsent_logprobs.append((slot.text.position, logprob))
        text = slot.text.push(model.piece(token))
        if text:
            slot.unsent.append(text)
            slot.chars_out += len(text)
            # The first text at once; later text at most every stream_interval, in one event.
            if now - slot.sent_at >= self.config.stream_interval:
                self._send_text(slot, now)
        if slot.text.stopped:
            self._finish(slot, "stop", now)
        elif slot.generated >= job.params.max_tokens or len(slot.cache) + 1 >= model.n_ctx_seq:
            self._finish(slot, "length", now)

    def _finish(self, slot: Slot, reason: str, now: float) -> None:
        job = slot.job
        assert job is not None and slot.text is not None
        if reason in ("stop", "length"):
            rest = slot.text.flush()
            if rest:
                slot.unsent.append(rest)
                slot.chars_out += len(rest)
        self._send_text(slot, now, final=not slot.text.stopped)
        job.reasons[slot.choice] = reason
        if slot.choice == 0:
            job.stop_sequence = slot.text.matched
        job.generated += slot.generated
        job.rated += max(slot.generated - 1, 0)
        first = slot.first_token_at
        if first is not None and (job.first_token_at is None or first < job.first_token_at):
            job.first_token_at = first
        self._release(slot, now)  # before the event: whoever sees "done" sees the slot free
        if job.running or job.failed:
            return
        first = job.first_token_at
        rate = None
        if first is not None and job.rated > 0 and now > first:
            rate = job.rated / (now - first)
        done = DoneEvent(
            finish_reason=max(job.reasons, key=_SEVERITY.index),
            prompt_tokens=job.prompt_tokens,
            cached_tokens=job.cached,
            completion_tokens=job.generated,
            queue_seconds=job.started - job.submitted,
            time_to_first_token=None if first is None else first - job.submitted,
            tokens_per_second=rate,
            duration=now - job.submitted,
            choice_reasons=tuple(job.reasons),
            stop_sequence=job.stop_sequence,
        )
        self._done(job, done)

    def _send_text(self, slot: Slot, now: float, final: bool = False) -> None:
        """Send the text held, with the logprobs of the tokens whose text has begun in it
        (`final`: all that are left; else those of a stop string's tokens stay, unsent)."""
        logprobs: tuple[Logprob, ...] = ()
        if slot.unsent_logprobs:
            held = slot.unsent_logprobs
            ready = len(held) if final else sum(1 for at, _ in held if at < slot.chars_out)
            logprobs = tuple(entry for _, entry in held[:ready])
            del held[:ready]
        if (slot.unsent or logprobs) and slot.job is not None:
            self._emit(slot.job, TokenEvent("".join(slot.unsent), slot.choice, logprobs))
            slot.unsent.clear()
        slot.sent_at = now

    def _done(self, job: Job, done: DoneEvent) -> None:
        if self.on_done is not None:
            self.on_done(done)
        self._emit(job, done)

    def _fail(self, slot: Slot, error: ApplianceError) -> None:
        """End the slot's choice with an error: its job's one error event; the job's other
        choices end (cancelled) at the next step, with no done event."""
        job = slot.job
        assert job is not None
        now = time.monotonic()
        self._send_text(slot, now)  # what was generated before the error is not lost
        self._release(slot, now)
        if not job.failed:
            job.failed = job.cancelled = True
            self._emit(job, ErrorEvent(error))

    def _release(self, slot: Slot, now: float) -> None:
        if slot.sampler is not None:
            LlamaModel.free_sampler(slot.sampler)
        job = slot.job
        if job is not None:
            job.running -= 1
            if not job.running:
                job.free_grammar()
        slot.job = None
        slot.leader = None
        slot.followers.clear()
        slot.prompt_logprobs.clear()
        slot.sampler = None
        slot.text = None
        slot.last_used = now


# A job's finish reason: of its choices' reasons, the last in this list.
_SEVERITY = ["", "stop", "length", "cancelled", "timeout"]


def _put_all(items: list[tuple[Job, Event]]) -> None:
    for job, event in items:
        job.events.put_nowait(event)
