"""Embeddings: a model and a llama context of their own, never the scheduler's.

`Embedder` owns one llama_model and one context made with `embeddings = True`. The scheduler
thread stays the only caller of the generation context; the embedder's context is used under
its own lock, from its own thread (`EmbeddingService` runs it on a one-thread executor, so the
event loop never waits on llama.cpp and a queue of embedding requests never fills the loop's
default thread pool, which tokenizing for chat needs).

Pooling is what the GGUF says (`{arch}.pooling_type`: mean, CLS or last token). A model that
names none (a chat model such as the bundled SmolLM2) gets mean pooling: the context is made
again with `LLAMA_POOLING_TYPE_MEAN`, so llama.cpp pools in every case. A reranker's RANK
pooling gives scores, not vectors, and is refused. Every vector is L2-normalised.

Several inputs go into one llama_decode, each its own sequence id; the memory is cleared
before every batch, so an input's vector never depends on what was decoded before it.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import llama_cpp as C
import numpy as np
import numpy.typing as npt

from .errors import (
    ApplianceError,
    ClientDisconnected,
    InvalidRequest,
    ModelError,
    NotReady,
    PromptTooLong,
    QueueFull,
)
from .llama import _init_backend, tokenize
from .sources import fetch_in_thread, source_name

if TYPE_CHECKING:
    from .settings import Settings

log = logging.getLogger("gguf_appliance.embeddings")

POOLING_NAMES = {
    C.LLAMA_POOLING_TYPE_NONE: "none",
    C.LLAMA_POOLING_TYPE_MEAN: "mean",
    C.LLAMA_POOLING_TYPE_CLS: "cls",
    C.LLAMA_POOLING_TYPE_LAST: "last",
    C.LLAMA_POOLING_TYPE_RANK: "rank",
}
# Sequences in one decode: more inputs per llama_decode, while the mean-pooling matrix
# (tokens x sequences) stays small.
SEQUENCES_PER_DECODE = 16

Vectors = npt.NDArray[np.float32]


class Embedder:
    """A model and an embeddings context; `embed` is thread-safe (one call at a time)."""

    def __init__(self, path: Path, *, n_ctx: int, threads: int) -> None:
        _init_backend()
        started = time.monotonic()
        self.path = path
        self._lock = threading.Lock()
        self.model = C.llama_model_load_from_file(
            str(path).encode(), C.llama_model_default_params()
        )
        if not self.model:
            raise ModelError(f"llama.cpp could not load {path} (see the log for the reason)")
        self.ctx: Any = None
        self.batch: Any = None
        try:
            self._setup(n_ctx, threads)
        except BaseException:
            self.close()
            raise
        log.info(
            "embedding model loaded in %.2f s: %s, %d dimensions, %s pooling%s, inputs of up "
            "to %d tokens",
            time.monotonic() - started,
            path.name,
            self.n_embd,
            self.pooling,
            " (the model names none)" if self.declared_pooling == "none" else "",
            self.n_ctx,
        )

    def _setup(self, n_ctx: int, threads: int) -> None:
        model = self.model
        self.vocab = C.llama_model_get_vocab(model)
        self.n_vocab = int(C.llama_vocab_n_tokens(self.vocab))
        self.n_embd = int(C.llama_model_n_embd(model))
        encoder, decoder = (
            bool(C.llama_model_has_encoder(model)),
            bool(C.llama_model_has_decoder(model)),
        )
        if encoder and decoder:
            raise ModelError(
                f"{self.path.name} is an encoder-decoder model: it gives no embeddings"
            )
        self._encode = encoder
        # Never past the length the model was trained on: an encoder's learned positions end
        # there (a position beyond them would abort llama.cpp).
        trained = int(C.llama_model_n_ctx_train(model))
        n_ctx = min(n_ctx, trained) if trained > 0 else n_ctx
        self.ctx = self._context(n_ctx, threads, C.LLAMA_POOLING_TYPE_UNSPECIFIED)
        declared = int(C.llama_pooling_type(self.ctx))
        self.declared_pooling = POOLING_NAMES.get(declared, str(declared))
        if declared == C.LLAMA_POOLING_TYPE_RANK:
            raise ModelError(f"{self.path.name} is a reranker (rank pooling): it gives no vectors")
        if declared == C.LLAMA_POOLING_TYPE_NONE:
            C.llama_free(self.ctx)
            self.ctx = None
            self.ctx = self._context(n_ctx, threads, C.LLAMA_POOLING_TYPE_MEAN)
        self.pooling = POOLING_NAMES[int(C.llama_pooling_type(self.ctx))]
        self.memory = C.llama_get_memory(self.ctx)
        # Every batch fits one ubatch: llama.cpp pools a sequence within one ubatch only. (It
        # may round the context up: the ubatch is what was asked.)
        self.n_ctx = min(int(C.llama_n_ctx(self.ctx)), int(C.llama_n_ubatch(self.ctx)))
        self.batch = C.llama_batch_init(self.n_ctx, 0, 1)

    def _context(self, n_ctx: int, threads: int, pooling: int) -> Any:
        cparams = C.llama_context_default_params()
        cparams.embeddings = True
        cparams.pooling_type = pooling
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_ctx
        cparams.n_ubatch = n_ctx
        cparams.n_seq_max = SEQUENCES_PER_DECODE
        cparams.kv_unified = True  # the batch's sequences share the n_ctx cells
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.no_perf = True
        ctx = C.llama_init_from_model(self.model, cparams)
        if not ctx:
            raise ModelError(
                f"llama.cpp could not create an embeddings context of {n_ctx} tokens for "
                f"{self.path.name}"
            )
        return ctx

    # --- tokens (any thread: reads the vocabulary only) ---

    def tokenize(self, text: str) -> list[int]:
        """The text's tokens as the model wants them embedded: with its BOS/CLS and EOS/SEP
        if its vocabulary adds them; special tokens' text is read as text."""
        return tokenize(self.vocab, text, add_special=True, parse_special=False)

    def check(self, inputs: Sequence[Sequence[int]], param: str = "input") -> None:
        """Raise InvalidRequest, naming `param`, unless every input can be embedded."""
        for i, tokens in enumerate(inputs):
            if not tokens:
                raise InvalidRequest(f"input {i} has no tokens", param=param)
            if len(tokens) > self.n_ctx:
                error = PromptTooLong(
                    f"input {i} has {len(tokens)} tokens; this node embeds at most "
                    f"{self.n_ctx} tokens an input (EMBEDDING_CTX), and never cuts one",
                    param=param,
                )
                raise error
            low, high = min(tokens), max(tokens)
            if low < 0 or high >= self.n_vocab:
                bad = low if low < 0 else high
                raise InvalidRequest(
                    f"input {i} holds the token id {bad}; this model's ids are 0 to "
                    f"{self.n_vocab - 1}",
                    param=param,
                )

    # --- embedding (any thread; one call at a time) ---

    def embed(
        self, inputs: Sequence[Sequence[int]], stop: Callable[[], bool] | None = None
    ) -> Vectors:
        """One L2-normalised vector per input (rows, float32), in the inputs' order.

        `stop` is asked before each decode: true, the call ends with ClientDisconnected.
        """
        self.check(inputs)
        out = np.zeros((len(inputs), self.n_embd), dtype=np.float32)
        with self._lock:
            if self.ctx is None:
                raise NotReady("the embedding model is closed")
            group: list[int] = []
            size = 0
            for i, tokens in enumerate(inputs):
                if group and (
                    size + len(tokens) > self.n_ctx or len(group) == SEQUENCES_PER_DECODE
                ):
                    self._decode(inputs, group, out, stop)
                    group, size = [], 0
                group.append(i)
                size += len(tokens)
            if group:
                self._decode(inputs, group, out, stop)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        out /= np.where(norms > 0, norms, 1.0)  # a zero vector (none seen) stays zero
        return out

    def _decode(
        self,
        inputs: Sequence[Sequence[int]],
        group: list[int],
        out: Vectors,
        stop: Callable[[], bool] | None,
    ) -> None:
        if stop is not None and stop():
            raise ClientDisconnected("the client closed the connection before the embeddings")
        if self.memory:
            C.llama_memory_clear(self.memory, True)
        raw = self.batch
        n = 0
        for seq, i in enumerate(group):
            for pos, token in enumerate(inputs[i]):
                raw.token[n] = token
                raw.pos[n] = pos
                raw.n_seq_id[n] = 1
                raw.seq_id[n][0] = seq
                raw.logits[n] = True
                n += 1
        raw.n_tokens = n
        run = C.llama_encode if self._encode else C.llama_decode
        rc = int(run(self.ctx, raw))
        if rc != 0:
            raise ApplianceError(f"llama.cpp could not compute the embeddings (status {rc})")
        for seq, i in enumerate(group):
            pointer = C.llama_get_embeddings_seq(self.ctx, seq)
            if not pointer:
                raise ApplianceError("llama.cpp gave no pooled embedding for a sequence")
            out[i] = np.ctypeslib.as_array(
                ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(self.n_embd,)
            )

    def close(self) -> None:
        with self._lock:
            if self.batch is not None:
                C.llama_batch_free(self.batch)
                self.batch = None
            if self.ctx is not None:
                C.llama_free(self.ctx)
                self.ctx = None
            if self.model:
                C.llama_model_free(self.model)
                self.model = None


async def load_embedder(settings: Settings, chat_model: Path) -> Embedder:
    """The embedder of these settings: `embedding_model`, fetched and verified like the chat
    model, or else the chat model's own file (mmap: its pages are shared). Off the loop."""
    path = chat_model
    if settings.embedding_model:
        path = await fetch_in_thread(
            settings.embedding_model,
            settings.models_dir,
            settings.embedding_model_sha256,
            settings.progress_interval,
        )
    return await asyncio.to_thread(
        Embedder, path, n_ctx=settings.embedding_ctx, threads=settings.threads
    )


async def load_configured_embedder(settings: Settings) -> Embedder:
    """The settings' embedder, fetching the chat model only when it is the one embedding."""
    if settings.embedding_model:
        return await load_embedder(settings, Path())
    path = await fetch_in_thread(
        settings.model, settings.models_dir, settings.model_sha256, settings.progress_interval
    )
    return await load_embedder(settings, path)


class EmbeddingService:
    """The node's embedder as the routes see it: loaded in the app's lifespan, run on a thread
    of its own, at most `queue_size` requests waiting behind the one being embedded."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.embedder: Embedder | None = None
        # The id /v1/models lists beside the chat model's; None: the chat model embeds.
        self.model_id = (
            source_name(settings.embedding_model, settings.models_dir)
            if settings.embedding_model
            else None
        )
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gguf-embed")
        self._in_flight = 0

    async def load(self, chat_model: Path) -> None:
        self.embedder = await load_embedder(self.settings, chat_model)

    async def embed(self, inputs: Sequence[Sequence[int]]) -> Vectors:
        embedder = self.embedder
        if embedder is None:
            raise NotReady(
                "the embedding model is not loaded", retry_after=self.settings.retry_after
            )
        if self._in_flight > self.settings.queue_size:
            raise QueueFull(
                "the node is busy with other embedding requests; retry shortly",
                retry_after=self.settings.retry_after,
            )
        self._in_flight += 1
        stop = threading.Event()
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._executor, functools.partial(embedder.embed, inputs, stop.is_set)
            )
        finally:
            stop.set()  # a request cancelled mid-way stops before its next decode
            self._in_flight -= 1

    def close(self) -> None:
        """Wait for the request being embedded, then free the model (blocking)."""
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self.embedder is not None:
            self.embedder.close()
            self.embedder = None
