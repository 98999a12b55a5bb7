"""POST /v1/embeddings through OpenAI's own client, checked against llama.cpp computed here by
hand; the embedder's batching; hostile requests refused before any work, the node unharmed."""

from __future__ import annotations

import ctypes
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import llama_cpp as C
import numpy as np
import openai
import pytest

from gguf_appliance.api import openapi
from gguf_appliance.embeddings import SEQUENCES_PER_DECODE, Embedder

from .conftest import RunningServer, wait_until

SENTENCES = [
    "The cat sat on the mat.",
    "A kitten is sitting on a rug.",
    "Quarterly revenue rose by 12 percent.",
    "The stock market fell sharply today.",
    "I love pizza with extra cheese.",
    "Pasta and pizza are Italian dishes.",
]


def client(node: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.url("/v1"), api_key="x", max_retries=0, timeout=60)


def vectors(response: Any) -> np.ndarray:
    return np.array([item.embedding for item in response.data], dtype=np.float64)


def tokenize(vocab: Any, text: str) -> list[int]:
    data = text.encode()
    buf = (C.llama_token * (len(data) + 8))()
    n = C.llama_tokenize(vocab, data, len(data), buf, len(buf), True, False)
    assert n > 0
    return list(buf[:n])


@pytest.fixture(scope="module")
def by_hand(model_path: Path) -> Iterator[Callable[[str], np.ndarray]]:
    """A text's embedding computed here: a context with no pooling, every token's hidden state
    read with llama_get_embeddings_ith, averaged and normalised in numpy."""
    C.llama_backend_init()
    model = C.llama_model_load_from_file(str(model_path).encode(), C.llama_model_default_params())
    params = C.llama_context_default_params()
    params.embeddings = True
    params.pooling_type = C.LLAMA_POOLING_TYPE_NONE
    params.n_ctx = params.n_batch = params.n_ubatch = 512
    params.n_threads = params.n_threads_batch = 1
    ctx = C.llama_init_from_model(model, params)
    assert C.llama_pooling_type(ctx) == C.LLAMA_POOLING_TYPE_NONE
    vocab = C.llama_model_get_vocab(model)
    n_embd = C.llama_model_n_embd(model)
    batch = C.llama_batch_init(512, 0, 1)

    def embed(text: str) -> np.ndarray:
        tokens = tokenize(vocab, text)
        C.llama_memory_clear(C.llama_get_memory(ctx), True)
        for i, token in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, i, 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = True
        batch.n_tokens = len(tokens)
        assert C.llama_decode(ctx, batch) == 0
        rows = [
            np.ctypeslib.as_array(
                ctypes.cast(C.llama_get_embeddings_ith(ctx, i), ctypes.POINTER(ctypes.c_float)),
                shape=(n_embd,),
            ).astype(np.float64)
            for i in range(len(tokens))
        ]
        mean = np.mean(rows, axis=0)
        return np.asarray(mean / np.linalg.norm(mean))

    yield embed
    C.llama_batch_free(batch)
    C.llama_free(ctx)
    C.llama_model_free(model)


def test_the_openai_client_gets_unit_vectors_as_floats_and_as_base64(
    server: RunningServer,
) -> None:
    api = client(server)
    # The client asks for base64 when not told otherwise, and decodes it itself.
    default = api.embeddings.create(model="any", input=SENTENCES[:2])
    floats = api.embeddings.create(model="any", input=SENTENCES[:2], encoding_format="float")
    assert [d.index for d in default.data] == [0, 1]
    assert np.array_equal(vectors(default), vectors(floats))  # the same float32 values
    assert vectors(default).shape == (2, 576)
    assert np.allclose(np.linalg.norm(vectors(default), axis=1), 1.0, atol=1e-5)
    model = httpx.get(server.url("/v1/models")).json()["data"][0]["id"]
    assert default.model == model
    assert default.usage.prompt_tokens == default.usage.total_tokens > 2
    raw = httpx.post(
        server.url("/v1/embeddings"), json={"input": "hi", "encoding_format": "base64"}
    ).json()
    openapi.EmbeddingList.model_validate(raw, strict=True)
    decoded = np.frombuffer(__import__("base64").b64decode(raw["data"][0]["embedding"]), "<f4")
    assert decoded.shape == (576,)
    openapi.EmbeddingList.model_validate(
        httpx.post(server.url("/v1/embeddings"), json={"input": "hi"}).json(), strict=True
    )


def test_a_text_its_token_ids_and_its_place_in_a_batch_give_one_vector(
    server: RunningServer, model_path: Path
) -> None:
    api = client(server)
    alone = vectors(api.embeddings.create(model="m", input=SENTENCES[0]))[0]
    again = vectors(api.embeddings.create(model="m", input=[SENTENCES[0]]))[0]
    assert np.array_equal(alone, again)
    batch = vectors(api.embeddings.create(model="m", input=SENTENCES[3:] + SENTENCES[:1]))
    assert np.allclose(batch[-1], alone, atol=1e-5)
    C.llama_backend_init()
    params = C.llama_model_default_params()
    params.vocab_only = True
    model = C.llama_model_load_from_file(str(model_path).encode(), params)
    try:
        tokens = [tokenize(C.llama_model_get_vocab(model), s) for s in SENTENCES[:2]]
    finally:
        C.llama_model_free(model)
    one = vectors(api.embeddings.create(model="m", input=tokens[0]))
    two = vectors(api.embeddings.create(model="m", input=tokens))
    assert np.allclose(one[0], alone, atol=1e-5)
    assert np.allclose(two[0], alone, atol=1e-5)
    assert two.shape == (2, 576)


def test_the_vectors_are_llama_cpps_mean_pooled_hidden_states(
    server: RunningServer, by_hand: Callable[[str], np.ndarray]
) -> None:
    got = vectors(client(server).embeddings.create(model="m", input=SENTENCES))
    for text, vector in zip(SENTENCES, got, strict=True):
        expected = by_hand(text)
        assert float(vector @ expected) > 0.9999, text
        assert np.allclose(vector, expected, atol=2e-4), text


def test_close_sentences_are_closer_than_unrelated_ones(server: RunningServer) -> None:
    # Measured on SmolLM2-135M: pairs on one topic at 0.90-0.92, across topics 0.70-0.81.
    v = vectors(client(server).embeddings.create(model="m", input=SENTENCES))
    similarity = v @ v.T
    for a, b in ((0, 1), (2, 3), (4, 5)):  # each sentence's partner beats every other one
        others = [similarity[a, j] for j in range(len(SENTENCES)) if j not in (a, b)]
        assert similarity[a, b] > max(others), (a, b, similarity.round(3))


def test_hostile_requests_are_refused_fast_naming_the_field(start_server: Any) -> None:
    node = start_server(max_body_bytes=16 * 1_048_576, embedding_max_tokens=2000, threads=1)
    url = node.url("/v1/embeddings")
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"input": ["x"] * 100_000}, "input", "invalid_request"),
        ({"input": list(range(100)) * 10_000}, "input", "context_length_exceeded"),  # 1M ids
        ({"input": [[1, [2, [3]]]]}, "input", "invalid_request"),
        ({"input": [[1, "two"]]}, "input", "invalid_request"),
        ({"input": [{"text": "x"}]}, "input", "invalid_request"),
        ({"input": [[]]}, "input", "invalid_request"),
        ({"input": []}, "input", "invalid_request"),
        ({"input": ""}, "input", "invalid_request"),
        ({"input": [[True, False]]}, "input", "invalid_request"),
        ({"input": [[-1]]}, "input", "invalid_request"),
        ({"input": [[49152]]}, "input", "invalid_request"),  # one past the vocabulary
        ({"input": "word " * 600}, "input", "context_length_exceeded"),
        ({"input": ["word " * 400] * 6}, "input", "invalid_request"),  # 2,000 tokens in all
        ({"input": "x", "dimensions": 256}, "dimensions", "invalid_request"),
        ({"input": "x", "dimensions": 0}, "dimensions", "invalid_request"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format", "invalid_request"),
        ({"input": "x", "temperature": 0.5}, "temperature", "invalid_request"),
        ({"input": "x", "model": "other.gguf"}, "", "not_found"),
    ]
    for body, param, code in cases:
        started = time.monotonic()
        response = httpx.post(url, json=body, timeout=30)
        took = time.monotonic() - started
        error = response.json()["error"]
        expected = 404 if code == "not_found" else 400
        assert response.status_code == expected, (str(body)[:80], response.text[:300])
        assert error["code"] == code, (str(body)[:80], error)
        if param:
            assert error["param"] == param, (str(body)[:80], error)
        assert took < 5, (str(body)[:80], took)
    # `user` is harmless metadata (OpenAI's end-user id): taken, not used. The right size is too.
    ok = httpx.post(url, json={"input": "x", "user": "u-1", "dimensions": 576}, timeout=30)
    assert ok.status_code == 200, ok.text
    assert httpx.get(node.url("/health/ready")).status_code == 200
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    assert httpx.post(node.url("/v1/chat/completions"), json=chat, timeout=60).status_code == 200
    # A client that leaves mid-way: logged as 499, and the embedder is free for the next one.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, json={"input": ["word " * 400] * 4}, timeout=httpx.Timeout(30, read=0.3))
    sample = 'gguf_appliance_requests_total{route="/v1/embeddings",status="499"}'
    wait_until(lambda: node.metric(sample, default=0) == 1, 30, "the 499 was not logged")
    assert httpx.post(url, json={"input": "x"}, timeout=60).status_code == 200
    assert "Traceback" not in node.log_path.read_text()


def test_a_dedicated_embedding_model_is_listed_and_answers(
    start_server: Any, model_path: Path, tmp_path: Path
) -> None:
    dedicated = tmp_path / "my-embedder.gguf"
    shutil.copy(model_path, dedicated)
    node = start_server(embedding_model=str(dedicated), threads=1)
    ids = [m["id"] for m in httpx.get(node.url("/v1/models")).json()["data"]]
    assert ids == ["SmolLM2-135M-Instruct.Q4_1", "my-embedder"]
    api = client(node)
    answer = api.embeddings.create(model="my-embedder", input="hello")
    assert answer.model == "my-embedder"
    with pytest.raises(openai.NotFoundError):
        api.embeddings.create(model="someone-else.gguf", input="hello")


def test_the_embedder_batches_across_sequences_and_context_alike(model_path: Path) -> None:
    embedder = Embedder(model_path, n_ctx=64, threads=1)
    try:
        assert (embedder.n_ctx, embedder.pooling, embedder.declared_pooling) == (64, "mean", "none")
        texts = [f"{SENTENCES[i % len(SENTENCES)]} Number {i}." for i in range(40)]
        inputs = [embedder.tokenize(t) for t in texts]
        inputs.append(embedder.tokenize("word " * 60)[:64])  # a whole context alone
        together = embedder.embed(inputs)  # > SEQUENCES_PER_DECODE, > n_ctx tokens: 4+ decodes
        assert len(inputs) > 2 * SEQUENCES_PER_DECODE
        one_by_one = np.concatenate([embedder.embed([tokens]) for tokens in inputs])
        assert np.allclose(together, one_by_one, atol=1e-5)
        assert np.allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    finally:
        embedder.close()
