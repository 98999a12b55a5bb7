"""What a request becomes inside the engine, and the events it sends back."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import ApplianceError
from .llama import SamplingParams

if TYPE_CHECKING:
    from .grammar_worker import Grammar


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
    cached_tokens: int  # prompt tokens whose KV was reused, not evaluated again
    completion_tokens: int
    queue_seconds: float
    time_to_first_token: float | None
    tokens_per_second: float | None
    duration: float


@dataclass(frozen=True)
class ErrorEvent:
    error: ApplianceError


Event = TokenEvent | DoneEvent | ErrorEvent


@dataclass(eq=False)
class Job:
    """A tokenized request. The scheduler thread writes its events; the event loop reads them."""

    id: int
    prompt: list[int]
    params: GenerationParams
    deadline: float
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Event | None] = field(default_factory=asyncio.Queue)  # None: a ping
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    abort: ApplianceError | None = None  # set with `cancelled` when the node ends the job
    grammar: Grammar | None = None  # loaded at submit; closed by the scheduler

    def free_grammar(self) -> None:
        if self.grammar is not None:
            self.grammar.close()
            self.grammar = None

    def ended_in_queue(self, reason: str, now: float) -> DoneEvent:
        waited = now - self.submitted
        return DoneEvent(reason, len(self.prompt), 0, 0, waited, None, None, waited)
