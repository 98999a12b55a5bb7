"""KV_CACHE_TYPE: the KV cache's number type reaches llama.cpp, shrinks the cache as it should,
and a node with a quantised cache still answers sensibly."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from gguf_appliance.engine import GenerationParams, engine_config
from gguf_appliance.llama import SamplingParams
from gguf_appliance.settings import Settings
from tests.conftest import collect, make_engine

# llama.cpp's own line when it allocates the cache, e.g.
# "llama_kv_cache: size = 48.00 MiB ( 2048 cells, 30 layers, 2/2 seqs), K (f16): 24.00 MiB, ..."
KV_LINE = re.compile(
    r"size = +([\d.]+) MiB .*K \((\w+)\): +([\d.]+) MiB, V \((\w+)\): +([\d.]+) MiB"
)


def kv_cache(model_path: Path, kv_type: str, caplog: pytest.LogCaptureFixture) -> tuple[float, str]:
    """Load an engine with that cache type: the cache's MiB and its K type, as llama.cpp says."""
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="gguf_appliance.llama"):
        engine = make_engine(model_path, n_ctx=1024, n_slots=2, kv_cache_type=kv_type)
    try:
        found = [KV_LINE.search(r.getMessage()) for r in caplog.records]
        (match,) = [m for m in found if m]
        size, k_type, _, v_type, _ = match.groups()
        assert k_type == v_type
        prompt = engine.model.tokenize(
            "The capital of France is", add_special=True, parse_special=False
        )  # type: ignore[union-attr]
        params = GenerationParams(max_tokens=6, sampling=SamplingParams(temperature=0.0))
        text, done = asyncio.run(collect(engine, prompt, params))
        assert done.completion_tokens > 0 and "Paris" in text, text
    finally:
        engine.close()
    return float(size), k_type


def test_a_q8_0_cache_is_about_half_an_f16_one_and_still_answers(
    model_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    f16, f16_type = kv_cache(model_path, "f16", caplog)
    q8, q8_type = kv_cache(model_path, "q8_0", caplog)
    assert (f16_type, q8_type) == ("f16", "q8_0")
    # q8_0 stores 32 values in 34 bytes, f16 in 64.
    assert q8 / f16 == pytest.approx(34 / 64, rel=0.02)


def test_the_setting_reaches_the_engine_and_refuses_unknown_types() -> None:
    assert engine_config(Settings(kv_cache_type="q8_0")).kv_cache_type == "q8_0"
    assert engine_config(Settings()).kv_cache_type == "f16"
    with pytest.raises(ValidationError, match="kv_cache_type"):
        Settings(kv_cache_type="q3_k")
