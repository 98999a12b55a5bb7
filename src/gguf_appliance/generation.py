"""A generation inside the engine: its parameters, the queued job the scheduler works on, the
events it sends back, and the `Generation` handle the caller holds."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import ApplianceError
from .llama import SamplingParams

if TYPE_CHECKING:
    from .grammar_worker import Grammar


# Most alternatives a token's logprobs may list (OpenAI's chat API allows 20).
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int  # 0: read (and score) the prompt, generate nothing
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    # None: no log probabilities. k: each generated token's, with the k likeliest tokens at
    # its position (0 to MAX_TOP_LOGPROBS); the model's own, before any sampler.
    logprobs: int | None = None
    # Also the prompt's tokens' logprobs (with `logprobs`' k), in one event before the answer:
    # the whole prompt is evaluated, none of it taken from a cached prefix.
    score_prompt: bool = False
    # Choices of each prompt: the prompt is read once, then each samples on its own (choice i
    # with seed + i when a seed is set). A request's choices start together, one slot each.
    n: int = 1


@dataclass(frozen=True, slots=True)
class Logprob:
    """A token, its bytes and its log probability (log-softmax of the raw logits) where it
    stands; `top`: the likeliest tokens there, best first (their own `top` empty)."""

    token: int
    piece: bytes
    logprob: float | None  # None: a prompt's first token, which nothing before predicts
    top: tuple[Logprob, ...] = ()


@dataclass(frozen=True)
class TokenEvent:
    text: str
    choice: int = 0
    # The logprobs of the tokens this text came from (asked for with `logprobs`); with
    # `prompt`, those of the choice's prompt tokens (the text is then empty).
    logprobs: tuple[Logprob, ...] = ()
    prompt: bool = False


@dataclass(frozen=True)
class DoneEvent:
    """The end of a request: its tally, summed over its choices."""

    finish_reason: str  # stop | length | cancelled | timeout: of all choices, the last named
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose KV was reused, not evaluated again
    completion_tokens: int
    queue_seconds: float
    time_to_first_token: float | None
    tokens_per_second: float | None
    duration: float
    choice_reasons: tuple[str, ...] = ()  # each choice's finish reason, by its index
    stop_sequence: str | None = None  # the stop string that ended the first choice, if one did


@dataclass(frozen=True)
class ErrorEvent:
    error: ApplianceError


Event = TokenEvent | DoneEvent | ErrorEvent


@dataclass(eq=False)
class Job:
    """A tokenized request. The scheduler thread writes its events; the event loop reads them."""

    id: int
    prompts: list[list[int]]  # each read once, with params.n choices
    params: GenerationParams
    deadline: float
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Event | None] = field(default_factory=asyncio.Queue)  # None: a nudge
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    abort: ApplianceError | None = None  # set with `cancelled` when the node ends the job
    grammar: Grammar | None = None  # loaded at submit; closed by the scheduler
    # The batch traffic class: admitted after every waiting interactive job, and never onto
    # the slots the scheduler keeps for interactive ones.
    batch: bool = False
    # The scheduler thread's tally of the choices while they run.
    reasons: list[str] = field(default_factory=list)  # by choice; "" while it runs
    stop_sequence: str | None = None  # the first choice's, once it stopped on one
    running: int = 0
    generated: int = 0
    cached: int = 0
    rated: int = 0  # tokens after each choice's first: the decode rate's numerator
    started: float = 0.0
    first_token_at: float | None = None
    failed: bool = False  # an error event went out: no done event

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.params.n

    @property
    def prompt_tokens(self) -> int:
        return sum(map(len, self.prompts))

    def free_grammar(self) -> None:
        if self.grammar is not None:
            self.grammar.close()
            self.grammar = None

    def ended_in_queue(self, reason: str, now: float) -> DoneEvent:
        waited = now - self.submitted
        reasons = (reason,) * self.choices
        return DoneEvent(reason, self.prompt_tokens, 0, 0, waited, None, None, waited, reasons)


class Generation:
    """A submitted request: iterate its events; cancel it when the client goes away.

    It remembers what passed (the first choice's text, the final event) for the request's
    log line.
    """

    def __init__(self, job: Job, cancel: Callable[[Job], None]) -> None:
        self._job = job
        self._cancel = cancel
        self.text: list[str] = []
        self.outcome: DoneEvent | ErrorEvent | None = None

    async def events(self) -> AsyncIterator[Event]:
        async for event in self.stream():
            if event is not None:
                yield event

    async def stream(self) -> AsyncGenerator[Event | None, None]:
        """The events, and a None for each `nudge()` (a caller's timer, say) in between."""
        queue = self._job.events
        while self.outcome is None:
            event = await queue.get()
            if isinstance(event, TokenEvent):
                if event.choice == 0:
                    self.text.append(event.text)
            elif event is not None:
                self.outcome = event
            yield event

    def nudge(self) -> None:
        """Wake the consumer of `stream()` with a None (from the event loop's thread)."""
        self._job.events.put_nowait(None)

    def cancel(self) -> None:
        self._cancel(self._job)

    async def settle(self, timeout: float) -> DoneEvent | ErrorEvent | None:
        """The final event; if the consumer left early (a disconnect), wait for it a while.

        Every job ends with a done or error event, a cancelled one within a decode step.
        """
        if self.outcome is None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._drain(), timeout)
        return self.outcome

    async def _drain(self) -> None:
        async for _ in self.events():
            pass
