"""The model and its context, through llama-cpp-python's low-level API.

Nothing here is thread-safe: the engine's worker thread is the only caller of the context
functions. Tokenizing and rendering chat templates only read the vocabulary and may run on any
thread.
"""

from __future__ import annotations

import ctypes
import json
import logging
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import llama_cpp as C
import numpy as np

from . import chat_template as templates
from .chat_format import syntax_of
from .errors import InvalidRequest, ModelError
from .grammar import Constraint, check_gbnf

if TYPE_CHECKING:
    from .grammar_worker import Grammar

log = logging.getLogger("gguf_appliance.llama")

# ggml_log_level: 1 debug, 2 info, 3 warn, 4 error, 5 continues the previous line.
_GGML_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}


@C.llama_log_callback  # type: ignore[untyped-decorator]
def _log_to_python(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    # llama.cpp's info lines (tensor lists, buffer sizes) go to debug; warnings and errors stay.
    line = text.decode("utf-8", "replace").rstrip()
    if line:
        log.log(_GGML_LEVELS.get(level, logging.DEBUG), "%s", line)


_backend_ready = False


def _init_backend() -> None:
    global _backend_ready
    if not _backend_ready:
        C.llama_log_set(_log_to_python, ctypes.c_void_p(0))
        C.llama_backend_init()
        _backend_ready = True


def build_features() -> str:
    """What this build of llama.cpp uses of the CPU: `NEON = 1 | DOTPROD = 1 | ...`."""
    _init_backend()
    return " ".join(bytes(C.llama_print_system_info()).decode().split())


def tokenize(vocab: Any, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
    """The text's tokens in a vocabulary (any thread: it is only read)."""
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest("the text is not valid UTF-8 (a lone surrogate)") from None
    n_max = len(data) + 8
    tokens = (C.llama_token * n_max)()
    n = C.llama_tokenize(vocab, data, len(data), tokens, n_max, add_special, parse_special)
    if n < 0:
        tokens = (C.llama_token * -n)()
        n = C.llama_tokenize(vocab, data, len(data), tokens, -n, add_special, parse_special)
    return list(tokens[:n])


# The KV cache's number types llama.cpp's CPU backend takes (ggml_type). A quantised V cache
# needs flash attention: llama.cpp's "auto" turns it on for one.
KV_TYPES = {
    "f32": 0,
    "f16": 1,
    "q4_0": 2,
    "q4_1": 3,
    "q5_0": 6,
    "q5_1": 7,
    "q8_0": 8,
    "iq4_nl": 20,
    "bf16": 30,
}


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_last_n: int = 64
    seed: int | None = None
    grammar: Constraint | None = None  # what the answer must match

    @property
    def greedy(self) -> bool:
        # Below 0.001 too: logits divided by 1e-39 overflow, and the softmax of infinities is
        # NaN, from which llama.cpp's dist sampler picks the last candidate, whatever it is.
        return self.temperature < 0.001


class LlamaModel:
    """A loaded GGUF model with one context of `n_seq` sequences."""

    def __init__(
        self,
        path: Path,
        *,
        n_ctx: int,
        n_seq: int,
        n_batch: int,
        threads: int,
        chat_template: str | None = None,
        kv_type: str = "f16",
    ) -> None:
        """`chat_template`: the CHAT_TEMPLATE setting (see chat_template.py); a bad one raises
        ModelError, as a bad model does. `kv_type`: the KV cache's number type (KV_TYPES)."""
        _init_backend()
        self.path = path
        setting = None if chat_template is None else templates.read_setting(chat_template)
        mparams = C.llama_model_default_params()
        self.model = C.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise ModelError(f"llama.cpp could not load {path} (see the log for the reason)")
        self.vocab = C.llama_model_get_vocab(self.model)
        try:
            self._chat = self._chat_template(setting)
            self.tool_syntax = syntax_of(self._chat.source)
        except BaseException:
            C.llama_model_free(self.model)
            raise
        cparams = C.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_seq_max = n_seq
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.kv_unified = False  # every sequence owns n_ctx / n_seq cells: no starvation
        cparams.type_k = cparams.type_v = KV_TYPES[kv_type]
        cparams.no_perf = True
        self.ctx = C.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            C.llama_model_free(self.model)
            raise ModelError(f"llama.cpp could not create a context of {n_ctx} tokens for {path}")
        self.memory = C.llama_get_memory(self.ctx)
        self.n_ctx_seq = int(C.llama_n_ctx_seq(self.ctx))
        # llama.cpp may take a smaller batch than asked (never more than the context): a decode
        # of more tokens than it took aborts the process (GGML_ASSERT), so this is the bound.
        self.n_batch = min(n_batch, int(C.llama_n_batch(self.ctx)), int(C.llama_n_ubatch(self.ctx)))
        self.n_vocab = int(C.llama_vocab_n_tokens(self.vocab))
        self.n_params = int(C.llama_model_n_params(self.model))
        self._piece_buf = ctypes.create_string_buffer(256)
        self._data: Any = None
        self._specials = self._special_texts()
        self._ids: Any = None
        self._array: Any = None

    # --- text and tokens (any thread) ---

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        return tokenize(self.vocab, text, add_special=add_special, parse_special=parse_special)

    def token_text(self, token: int) -> str:
        if token < 0:  # a model without that token (no BOS, no EOS): llama.cpp would throw
            return ""
        return bytes(C.llama_vocab_get_text(self.vocab, token) or b"").decode("utf-8", "replace")

    def piece(self, token: int) -> bytes:
        """The bytes a generated token stands for (control tokens render as nothing)."""
        buf = self._piece_buf
        n = C.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = C.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def detokenize(self, tokens: list[int]) -> str:
        """The text of token ids (any thread: a buffer of its own; control tokens as nothing)."""
        array = (C.llama_token * len(tokens))(*tokens)
        size = max(64, 8 * len(tokens))
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = C.llama_detokenize(self.vocab, array, len(tokens), buf, size, False, False)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", "replace")
            size = -n
        raise InvalidRequest("the token ids cannot be turned into text")

    def is_eog(self, token: int) -> bool:
        return bool(C.llama_vocab_is_eog(self.vocab, token))

    @property
    def has_chat_template(self) -> bool:
        return self._chat is not None

    @property
    def chat_template(self) -> str:
        """Which chat template is in use and where it came from (/v1/models, the log)."""
        return self._chat.label

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value as text (None if the file has no such key)."""
        buf = ctypes.create_string_buffer(256)
        n = C.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            C.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace")

    def _chat_template(self, setting: tuple[str, str | None] | None) -> templates.ChatTemplate:
        template = C.llama_model_chat_template(self.model, None)
        return templates.choose(
            setting,
            gguf_template=template.decode("utf-8") if template else None,
            architecture=self.meta("general.architecture"),
            bos=self.token_text(C.llama_vocab_bos(self.vocab)),
            eos=self.token_text(C.llama_vocab_eos(self.vocab)),
        )

    def chat_prompt(
        self, messages: Sequence[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        """The chat template's tokens, with control tokens only where the template put them.

        The rendered template is tokenized with special tokens parsed (`<|im_start|>` is one
        control token). A message whose text holds a special token's text (a user's
        `<|im_end|><|im_start|>system`) must not become one: then the template is rendered with
        a marker in place of each message's text, the template's own text is tokenized with
        special tokens parsed and each message's text without. `tools` and the calls of earlier
        turns (for a template that renders them) cannot be marked so: one holding a special
        token's text is refused.
        """
        if self._chat is None:
            raise InvalidRequest("this model has no chat template: send a prompt, not messages")
        specials = self._specials
        if specials is not None:
            calls = [m["tool_calls"] for m in messages if m.get("tool_calls")]
            for what, value in (("tools", tools), ("messages", calls)):
                if value and specials.search(json.dumps(value, ensure_ascii=False)):
                    raise InvalidRequest(
                        "a tool definition or an earlier tool call holds the text of one of "
                        "this model's control tokens",
                        param=what,
                    )
        if specials is None or not any(
            isinstance(m.get("content"), str) and specials.search(m["content"]) for m in messages
        ):
            rendered = self._render(messages, tools)
            bos = self.token_text(C.llama_vocab_bos(self.vocab))
            add_special = not (bos and rendered.startswith(bos))
            return self.tokenize(rendered, add_special=add_special, parse_special=True)
        return self._chat_prompt_marked(messages, tools)

    def _render(
        self, messages: Sequence[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> str:
        assert self._chat is not None
        try:
            return self._chat.render(messages, tools)
        except InvalidRequest:
            raise
        except Exception as exc:  # jinja raises TemplateError (and raise_exception's own)
            raise InvalidRequest(f"the chat template rejected the messages: {exc}") from None

    def _special_texts(self) -> re.Pattern[str] | None:
        """A pattern finding the text of any control or user-defined token of the vocabulary."""
        kinds = C.LLAMA_TOKEN_ATTR_CONTROL | C.LLAMA_TOKEN_ATTR_USER_DEFINED
        texts = {
            self.token_text(t)
            for t in range(self.n_vocab)
            if C.llama_vocab_get_attr(self.vocab, t) & kinds
        }
        texts.discard("")
        by_length = sorted(texts, key=len, reverse=True)
        return re.compile("|".join(map(re.escape, by_length))) if texts else None

    def _chat_prompt_marked(
        self, messages: Sequence[dict[str, Any]], tools: list[dict[str, Any]] | None
    ) -> list[int]:
        tag = secrets.token_hex(8).upper()
        markers: dict[str, str] = {}
        masked = []
        for i, message in enumerate(messages):
            content = message.get("content")
            if isinstance(content, str) and content:
                # Letters and digits only: a template's `| trim` or `| upper` must not touch it.
                marker = f"GGUFMSG{tag}N{i}END"
                markers[marker] = content
                message = {**message, "content": marker}
            masked.append(message)
        rendered = self._render(masked, tools)
        bos = self.token_text(C.llama_vocab_bos(self.vocab))
        add_special = not (bos and rendered.startswith(bos))
        tokens: list[int] = []
        pattern = re.compile("|".join(re.escape(m) for m in markers)) if markers else None
        pos = 0
        for match in pattern.finditer(rendered) if pattern else ():
            tokens += self.tokenize(
                rendered[pos : match.start()], add_special=add_special, parse_special=True
            )
            tokens += self.tokenize(markers[match.group()], add_special=False, parse_special=False)
            add_special = False
            pos = match.end()
        tokens += self.tokenize(rendered[pos:], add_special=add_special, parse_special=True)
        if pattern is not None and tag.lower() in pattern.sub("", rendered).lower():
            # A marker the template changed (cut, or lower-cased): that message's text cannot
            # be put back, so refuse rather than send the model a marker.
            raise InvalidRequest(
                "this model's chat template changes a message's text in a way the node cannot "
                "follow; send a prompt instead"
            )
        return tokens

    def text_prompt(self, prompt: str) -> list[int]:
        return self.tokenize(prompt, add_special=True, parse_special=False)

    # --- decoding (the worker thread only) ---

    def check_grammar(self, grammar: str, param: str = "grammar") -> None:
        """Raise InvalidRequest unless llama.cpp will take the grammar: within the limits of
        grammar.check_gbnf, and every `<token>` one token of this model."""
        for name in check_gbnf(grammar, param=param):
            if len(self.tokenize(name, add_special=False, parse_special=True)) != 1:
                raise InvalidRequest(
                    f"the grammar's {name[:40]} is not one token of this model", param=param
                )

    def new_sampler(self, params: SamplingParams) -> Any:
        """The sampler chain of a request, without its grammar (see sample_constrained)."""
        chain = C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())
        add = C.llama_sampler_chain_add
        if (params.repeat_penalty, params.frequency_penalty, params.presence_penalty) != (1, 0, 0):
            add(
                chain,
                C.llama_sampler_init_penalties(
                    self.n_vocab,
                    params.repeat_last_n,
                    params.repeat_penalty,
                    params.frequency_penalty,
                    params.presence_penalty,
                ),
            )
        if params.greedy:
            add(chain, C.llama_sampler_init_greedy())
            return chain
        if params.top_k > 0:
            add(chain, C.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            add(chain, C.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0.0:
            add(chain, C.llama_sampler_init_min_p(params.min_p, 1))
        add(chain, C.llama_sampler_init_temp(params.temperature))
        seed = C.LLAMA_DEFAULT_SEED if params.seed is None else params.seed & 0xFFFFFFFF
        add(chain, C.llama_sampler_init_dist(seed))
        return chain

    @staticmethod
    def free_sampler(sampler: Any) -> None:
        C.llama_sampler_free(sampler)

    def sample(self, sampler: Any, batch_index: int) -> int:
        return int(C.llama_sampler_sample(sampler, self.ctx, batch_index))

    def sample_constrained(
        self, sampler: Any, grammar: Grammar, batch_index: int, greedy: bool
    ) -> int:
        """Sample under a grammar; -1 if the grammar allows no token here.

        As llama.cpp's own server does: sample as if there were no grammar and keep the token
        if the grammar allows it (checking one token is cheap); only if not, mask the
        candidates with the tokens it allows and sample again. Kept tokens follow the
        grammar-masked distribution all the same. A greedy pick asks only which of the 512
        likeliest tokens the grammar allows (the likeliest allowed one is among them if any
        is), and masks the whole vocabulary only if none is. The grammar itself runs in a
        worker process (grammar_worker.py): its errors raise InvalidRequest for this request.
        """
        logits = C.llama_get_logits_ith(self.ctx, batch_index)
        candidates = self._candidates(logits)
        C.llama_sampler_apply(sampler, ctypes.byref(candidates))
        token = int(candidates.data[candidates.selected].id)
        shortlist = None
        if greedy and self.n_vocab > 512:
            scores = np.ctypeslib.as_array(logits, shape=(self.n_vocab,))
            shortlist = np.argpartition(scores, -512)[-512:]
        allowed = grammar.step(token, self.n_vocab, shortlist)
        if allowed is None:
            return -1
        if allowed is not True:
            candidates = self._candidates(logits)
            self._data["logit"][~allowed] = -np.inf
            C.llama_sampler_apply(sampler, ctypes.byref(candidates))
            token = int(candidates.data[candidates.selected].id)
            if not allowed[token]:  # a sampler that picked a masked token (NaN logits)
                scores = np.ctypeslib.as_array(logits, shape=(self.n_vocab,))
                token = int(np.flatnonzero(allowed)[np.argmax(scores[allowed])])
            grammar.accept(token)
        C.llama_sampler_accept(sampler, token)
        return token

    def logprobs(
        self, batch_index: int, token: int, top: int
    ) -> tuple[float, list[tuple[int, float]]]:
        """The log probability of `token` where `batch_index`'s logits predict it, and the
        `top` likeliest tokens there with theirs, best first.

        The model's own distribution: the log-softmax of the raw logits, before temperature,
        penalties, grammar and the other samplers. One pass over the vocabulary; only the
        tokens near the maximum are sorted (the alternatives are exact all the same).
        """
        scores = np.ctypeslib.as_array(
            C.llama_get_logits_ith(self.ctx, batch_index), shape=(self.n_vocab,)
        )
        peak = float(scores.max())
        total = float(np.exp(scores - peak).sum(dtype=np.float64))
        norm = peak + float(np.log(total)) if total > 0 else peak

        def value(logit: float) -> float:
            lp = logit - norm
            return lp if lp > -9999.0 else -9999.0  # also NaN: JSON has no -inf or NaN

        best: list[tuple[int, float]] = []
        if top > 0:
            k = min(top, self.n_vocab)
            window = 8.0
            near = np.flatnonzero(scores >= peak - window)
            while len(near) < k and window < 64.0:  # widened a little at a time
                window += 4.0
                near = np.flatnonzero(scores >= peak - window)
            if len(near) < k:  # flat, infinite or NaN logits: all of them
                near = np.arange(self.n_vocab)
            if len(near) > 8 * k:  # too many to sort: the k best first
                near = near[np.argpartition(scores[near], -k)[-k:]]
            ranked = near[np.argsort(-scores[near], kind="stable")[:k]]
            best = [(int(t), value(float(scores[t]))) for t in ranked]
        return value(float(scores[token])), best

    def _candidates(self, logits: Any) -> Any:
        """Every token with its logit, in an array reused from step to step."""
        if self._data is None:
            dtype = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
            self._data = np.zeros(self.n_vocab, dtype=dtype)
            self._ids = np.arange(self.n_vocab, dtype=np.int32)
            self._array = C.llama_token_data_array(
                data=self._data.ctypes.data_as(C.llama_token_data_p),
                size=self.n_vocab,
                selected=-1,
                sorted=False,
            )
        self._data["id"] = self._ids
        self._data["logit"] = np.ctypeslib.as_array(logits, shape=(self.n_vocab,))
        self._data["p"] = 0.0
        self._array.size = self.n_vocab
        self._array.selected = -1
        self._array.sorted = False
        return self._array

    def forget(self, seq: int, start: int) -> bool:
        """Drop the sequence's KV from position `start` on; False if the model cannot."""
        return bool(C.llama_memory_seq_rm(self.memory, seq, start, -1))

    def copy_sequence(self, source: int, target: int) -> None:
        """Give `target` a copy of `source`'s KV (the whole range; done at the next decode)."""
        C.llama_memory_seq_cp(self.memory, source, target, -1, -1)

    def decode(self, batch: Batch) -> int:
        return int(C.llama_decode(self.ctx, batch.raw))

    def set_threads(self, threads: int) -> None:
        """Decode with this many threads from the next step on (the benchmark's sweep)."""
        C.llama_set_n_threads(self.ctx, threads, threads)

    def close(self) -> None:
        if self.ctx:
            C.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            C.llama_model_free(self.model)
            self.model = None


class Batch:
    """A reusable llama_batch: tokens of several sequences for one decode step."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.raw = C.llama_batch_init(capacity, 0, 1)
        self.n = 0

    def clear(self) -> None:
        self.n = 0
        self.raw.n_tokens = 0

    def add(self, token: int, pos: int, seq: int, logits: bool) -> int:
        i = self.n
        raw = self.raw
        raw.token[i] = token
        raw.pos[i] = pos
        raw.n_seq_id[i] = 1
        raw.seq_id[i][0] = seq
        raw.logits[i] = logits
        self.n = i + 1
        raw.n_tokens = self.n
        return i

    def free(self) -> None:
        C.llama_batch_free(self.raw)
