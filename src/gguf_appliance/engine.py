"""The engine: the model, the slot scheduler, and the one async interface the routes use.

`Engine.submit()` checks what can be known before decoding (the prompt fits, max_tokens within
the cap, the queue has room) and returns a `Generation`: iterate its events, `cancel()` it when
the client goes away. The engine knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .chat_format import ToolSyntax, ToolUse, merge_turns
from .errors import (
    ApplianceError,
    Draining,
    EmptyPrompt,
    InvalidPrompt,
    InvalidRequest,
    NotReady,
    PromptTooLong,
)
from .generation import (
    MAX_TOP_LOGPROBS,
    DoneEvent,
    ErrorEvent,
    Event,
    Generation,
    GenerationParams,
    Job,
    TokenEvent,
)
from .grammar import Constraint
from .grammar_worker import Grammar, GrammarPool
from .llama import LlamaModel
from .scheduler import EngineConfig, SlotScheduler

if TYPE_CHECKING:
    from .settings import Settings

__all__ = [
    "DoneEvent",
    "Engine",
    "EngineConfig",
    "ErrorEvent",
    "Event",
    "Generation",
    "GenerationParams",
    "TokenEvent",
    "engine_config",
    "load_configured_model",
]

log = logging.getLogger("gguf_appliance.engine")


def engine_config(settings: Settings) -> EngineConfig:
    return EngineConfig(
        n_ctx=settings.n_ctx,
        n_slots=settings.n_slots,
        n_batch=settings.n_batch,
        threads=settings.threads,
        queue_size=settings.queue_size,
        max_tokens_cap=settings.max_tokens_cap,
        retry_after=settings.retry_after,
        prefill_chunk=settings.prefill_chunk,
        reuse_prefix=settings.reuse_prefix,
        stream_interval=settings.stream_interval,
        kv_cache_type=settings.kv_cache_type,
    )


async def load_configured_model(engine: Engine, settings: Settings) -> Path:
    """Fetch (or find) and verify the settings' model, then load it; both off the event loop."""
    from .sources import fetch_in_thread

    path = await fetch_in_thread(
        settings.model, settings.models_dir, settings.model_sha256, settings.progress_interval
    )
    await asyncio.to_thread(engine.load, path, settings.chat_template)
    return path


def _close_unclaimed(task: asyncio.Future[Grammar]) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result().close()


class Engine:
    """Owns the model; generation runs on the scheduler's thread, off the event loop."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model: LlamaModel | None = None
        self.grammars: GrammarPool | None = None
        self.scheduler: SlotScheduler | None = None
        self.load_seconds: float | None = None
        self._load_error: str | None = None
        self._draining = False
        # Called on the scheduler thread with every finished generation (see `watch`).
        self._watchers: list[Callable[[DoneEvent], None]] = []
        self._ids = itertools.count(1)

    # --- life cycle ---

    def load(self, model_path: Path, chat_template: str | None = None) -> None:
        """Load the model and start the scheduler (blocking: run it in a thread).

        `chat_template`: the CHAT_TEMPLATE setting (None: the GGUF's own, or a guess)."""
        started = time.monotonic()
        config = self.config
        self.model = LlamaModel(
            model_path,
            n_ctx=config.n_ctx * config.n_slots,
            n_seq=config.n_slots,
            n_batch=config.n_batch,
            threads=config.threads,
            chat_template=chat_template,
            kv_type=config.kv_cache_type,
        )
        self.scheduler = SlotScheduler(self.model, config, on_done=self._done)
        self.scheduler.start()
        self.grammars = GrammarPool(
            model_path,
            limit=config.n_slots + 2,
            memory=config.grammar_memory,
            retry_after=config.retry_after,
        )
        threading.Thread(target=self._warm_grammars, name="gguf-grammar-warm", daemon=True).start()
        self.load_seconds = time.monotonic() - started
        log.info(
            "model loaded in %.2f s: %s, %d slots of %d tokens (KV cache %s), %d threads, "
            "chat template %s, tool calls %s",
            self.load_seconds,
            model_path.name,
            config.n_slots,
            self.model.n_ctx_seq,
            config.kv_cache_type,
            config.threads,
            self.model.chat_template,
            self.model.tool_syntax.name,
        )

    def _done(self, done: DoneEvent) -> None:
        for watcher in self._watchers:
            watcher(done)

    def watch(self, on_done: Callable[[DoneEvent], None]) -> None:
        """Call `on_done` (on the scheduler's thread) with every finished generation."""
        self._watchers.append(on_done)

    def fail(self, reason: str) -> None:
        """The model cannot be served: say why (readiness, submit) until the process ends."""
        self._load_error = reason

    def drain(self) -> None:
        """Take no new request; what is in flight runs on (see `abort_all`)."""
        self._draining = True

    @property
    def load_error(self) -> str | None:
        return self._load_error

    @property
    def draining(self) -> bool:
        return self._draining

    def _warm_grammars(self) -> None:
        pool = self.grammars
        if pool is not None:
            try:
                pool.warm()
            except OSError as exc:  # the first grammar request will try again and say why
                log.warning("could not start a grammar worker: %s", exc)

    def close(self) -> None:
        if self.grammars is not None:
            self.grammars.close()
        if self.scheduler is not None:
            self.scheduler.stop()
            self.scheduler = None
        if self.model is not None:
            self.model.close()
            self.model = None

    @property
    def ready(self) -> bool:
        return self.scheduler is not None

    def healthy(self) -> bool:
        """False when the engine should be working and is not (its thread died)."""
        if self.scheduler is None:
            return self.model is None  # loading, or failed to load: nothing to watch
        return self.scheduler.alive

    @property
    def slot_context(self) -> int:
        return self._require_model().n_ctx_seq

    @property
    def queue_depth(self) -> int:
        return self.scheduler.queue_depth if self.scheduler else 0

    @property
    def busy_slots(self) -> int:
        return self.scheduler.busy_slots if self.scheduler else 0

    @property
    def in_flight(self) -> int:
        return self.queue_depth + self.busy_slots

    def token_totals(self) -> tuple[int, int, int]:
        """Prompt tokens evaluated, prompt tokens reused from the cache, tokens generated."""
        s = self.scheduler
        if s is None:
            return 0, 0, 0
        return s.prompt_tokens_total, s.cached_tokens_total, s.completion_tokens_total

    # --- the async interface ---

    def tokenize_messages(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        return self._require_model().chat_prompt(messages)

    @property
    def tool_syntax(self) -> ToolSyntax:
        """How the loaded model's chat template has it call tools."""
        return self._require_model().tool_syntax

    def tokenize_chat(
        self, messages: list[dict[str, Any]], use: ToolUse | None, *, merge: bool = False
    ) -> list[int]:
        """A conversation with tools (chat_format's form of messages), rendered as the model's
        template takes them; `merge`: consecutive turns of one role as one."""
        model = self._require_model()
        chat, tools = model.tool_syntax.prompt(messages, use)
        return model.chat_prompt(merge_turns(chat) if merge else chat, tools)

    def tokenize_prompt(self, prompt: str) -> list[int]:
        return self._require_model().text_prompt(prompt)

    def check_tokens(self, tokens: list[int]) -> None:
        """Raise InvalidPrompt unless every id is a token of the model's vocabulary."""
        size = self._require_model().n_vocab
        wrong = next((t for t in tokens if not 0 <= t < size), None)
        if wrong is not None:
            raise InvalidPrompt(
                f"the prompt holds the token id {wrong}; this model's are 0 to {size - 1}"
            )

    def detokenize(self, tokens: list[int]) -> str:
        return self._require_model().detokenize(tokens)

    def compile_grammar(self, constraint: Constraint) -> Grammar:
        """Build a request's grammar, check it, load it into a worker process and try it on a
        first token (blocking: run it in a thread, see `prepare_grammar`)."""
        model = self._require_model()
        gbnf = constraint.to_gbnf()
        model.check_grammar(gbnf, constraint.field)
        if self.grammars is None:
            raise NotReady("the model is still loading", retry_after=self.config.retry_after)
        config = self.config
        return Grammar(
            self.grammars,
            gbnf,
            param=constraint.field,
            step_limit=config.grammar_step_limit,
            hard_limit=config.grammar_hard_limit,
            trigger=constraint.trigger,
        )

    async def prepare_grammar(self, constraint: Constraint) -> Grammar:
        """`compile_grammar` off the event loop. If the request goes away meanwhile, the
        grammar is closed when it is ready (its worker goes back to the pool)."""
        task = asyncio.ensure_future(asyncio.to_thread(self.compile_grammar, constraint))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_close_unclaimed)
            raise

    def submit(
        self,
        prompt: list[int],
        params: GenerationParams,
        timeout: float,
        grammar: Grammar | None = None,
        *,
        batch: bool = False,
    ) -> Generation:
        """Queue a tokenized prompt. Raises at once for what can be known before decoding.

        A request with a grammar passes it built (`prepare_grammar`); if it does not, it is
        built here, on the caller's thread. The job owns it from here on, also on a refusal.
        """
        return self.submit_prompts([prompt], params, timeout, grammar, batch=batch)

    def submit_prompts(
        self,
        prompts: list[list[int]],
        params: GenerationParams,
        timeout: float,
        grammar: Grammar | None = None,
        *,
        batch: bool = False,
    ) -> Generation:
        """`submit` of several prompts in one request, each with `params.n` choices (prompt
        i's are choices i*n to i*n+n-1); all its choices start together. `batch`: of the batch
        traffic class (see the scheduler)."""
        try:
            if params.sampling.grammar is not None and grammar is None:
                grammar = self.compile_grammar(params.sampling.grammar)
            return self._submit(prompts, params, timeout, grammar, batch)
        except BaseException:
            if grammar is not None:
                grammar.close()
            raise

    def _submit(
        self,
        prompts: list[list[int]],
        params: GenerationParams,
        timeout: float,
        grammar: Grammar | None,
        batch: bool = False,
    ) -> Generation:
        self._require_model()
        scheduler = self.scheduler
        if self._draining or scheduler is None:
            raise Draining("the node is shutting down; retry on another node")
        if not prompts or len(prompts) > self.config.n_slots:
            raise InvalidPrompt(
                f"{len(prompts)} prompts; this node takes 1 to {self.config.n_slots} a request"
            )
        self.check_params(params)
        if len(prompts) * params.n > self.config.n_slots:
            raise InvalidRequest(
                f"{len(prompts)} prompts of {params.n} choices; this node makes at most "
                f"{self.config.n_slots} a request (its slots)",
                param="n",
            )
        room = self.slot_context
        for prompt in prompts:
            if not prompt:
                raise EmptyPrompt("the prompt is empty")
            if len(prompt) >= room:
                raise PromptTooLong(
                    f"the prompt has {len(prompt)} tokens; the context holds {room} tokens "
                    f"per request, and at least one must be left for the answer"
                )
            self.check_tokens(prompt)
        job = Job(
            id=next(self._ids),
            prompts=prompts,
            params=params,
            deadline=time.monotonic() + timeout,
            loop=asyncio.get_running_loop(),
            grammar=grammar,
            batch=batch,
        )
        scheduler.enqueue(job)
        return Generation(job, scheduler.cancel)

    def check_params(self, params: GenerationParams) -> None:
        """Raise InvalidRequest for parameters this node cannot serve (before any work)."""
        if params.max_tokens > self.config.max_tokens_cap:
            raise InvalidRequest(
                f"max_tokens is {params.max_tokens}; this node allows at most "
                f"{self.config.max_tokens_cap}",
                param="max_tokens",
            )
        if params.max_tokens < 0:
            raise InvalidRequest("max_tokens cannot be negative", param="max_tokens")
        if params.logprobs is not None and not 0 <= params.logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequest(
                f"logprobs is {params.logprobs}; at most {MAX_TOP_LOGPROBS} alternatives",
                param="logprobs",
            )
        slots = self.config.n_slots
        if not 1 <= params.n <= slots:
            raise InvalidRequest(
                f"n is {params.n}; this node makes 1 to {slots} choices a request (its slots)",
                param="n",
            )
        if params.n > 1 and params.sampling.grammar is not None:
            raise InvalidRequest(
                "a request with a grammar (grammar, response_format or tools) takes n: 1",
                param="n",
            )

    def abort_all(self, error: ApplianceError) -> None:
        """End every queued and running request with `error` (the drain's last resort)."""
        if self.scheduler is not None:
            self.scheduler.abort_all(error)

    def _require_model(self) -> LlamaModel:
        if self.model is None:
            raise NotReady(
                self._load_error or "the model is still loading",
                retry_after=self.config.retry_after,
            )
        return self.model
