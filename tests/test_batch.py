"""Batch jobs: the real model in process and behind a running node, S3 in moto's real server."""

from __future__ import annotations

import csv
import gzip
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gguf_appliance.batch import pack, split_text
from gguf_appliance.batch_io import ResultWriter, read_rows

from .conftest import RunningServer, free_port, wait_until
from .reviews import make_reviews

LABELS = {"positive", "negative", "neutral"}


def write_jsonl(path: Path, rows: list[dict[str, Any]], extra_lines: tuple[str, ...] = ()) -> Path:
    lines = [json.dumps(row) for row in rows]
    for i, line in enumerate(extra_lines):
        lines.insert(len(lines) // 2 + i, line)
    path.write_text("\n".join(lines) + "\n")
    return path


def batch_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "gguf_appliance.cli", "batch", *args]


def batch_env(**extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "GGUF_APPLIANCE_ENV_FILE": "",
        "GGUF_APPLIANCE_PROGRESS_INTERVAL": "1",
        **extra,
    }


def run_batch(
    *args: str, timeout: float = 300, **env: str
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    result = subprocess.run(
        batch_command(*args), env=batch_env(**env), capture_output=True, text=True, timeout=timeout
    )
    summary = json.loads(result.stdout) if result.stdout.strip() else {}
    return result, summary


def output_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_each_row_once(lines: list[dict[str, Any]], ids: list[Any]) -> None:
    counts = Counter(json.dumps(line["id"]) for line in lines)
    assert sorted(counts) == sorted(json.dumps(i) for i in ids)
    assert max(counts.values()) == 1, [k for k, v in counts.items() if v > 1]


def unreachable() -> tuple[str, ...]:
    # No node on this port: every call fails at once, so a job that should not run shows.
    return ("--target", f"http://127.0.0.1:{free_port()}", "--retries", "0")


# --- reading and writing (no model) ---


def test_rows_from_jsonl_keep_going_past_malformed_lines(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "in.jsonl",
        [{"id": "a", "text": "x"}, {"text": "no id"}],
        extra_lines=("{not json", "[1, 2]"),
    )
    rows = list(read_rows(str(path)))
    assert [r.id for r in rows] == ["a", {"line": 2}, {"line": 3}, {"line": 4}]
    assert rows[0].fields == {"id": "a", "text": "x"} and rows[0].error is None
    assert "not valid JSON" in (rows[1].error or "")
    assert "not a JSON object" in (rows[2].error or "")
    assert rows[3].fields == {"text": "no id"}  # no id field: known by its line


def test_rows_from_gzipped_csv_and_a_short_row(tmp_path: Path) -> None:
    path = tmp_path / "in.csv.gz"
    with gzip.open(path, "wt", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["review_id", "body"])
        writer.writerow(["r1", "Great, with a comma, inside"])
        writer.writerow(["r2"])
        writer.writerow(["r3", "Bad"])
    rows = list(read_rows(str(path), id_field="review_id"))
    assert [r.id for r in rows] == ["r1", {"row": 2}, "r3"]
    assert rows[0].fields["body"] == "Great, with a comma, inside"
    assert "has 1 fields; the header has 2" in (rows[1].error or "")


def test_rows_from_a_directory_of_documents(tmp_path: Path) -> None:
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "a.txt").write_text("Alpha")
    (tmp_path / "docs" / "sub" / "b.md").write_text("Beta")
    (tmp_path / "docs" / "bad.txt").write_bytes(b"\xff\xfe")
    (tmp_path / "docs" / "image.png").write_bytes(b"\x89PNG")
    rows = list(read_rows(str(tmp_path / "docs")))
    assert [r.id for r in rows] == ["a.txt", "bad.txt", "sub/b.md"]
    assert rows[0].fields["text"] == "Alpha" and rows[2].fields["path"] == "sub/b.md"
    assert "not UTF-8" in (rows[1].error or "")


def test_the_writer_resumes_and_drops_a_line_cut_by_a_crash(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": 1, "result": "a"}\n{"id": "1", "result": "b"}\n{"id": 3, "res')
    writer = ResultWriter(str(out))
    assert writer.done == {"1", '"1"'}
    writer.write({"id": 3, "result": "c"})
    with pytest.raises(RuntimeError, match="written twice"):
        writer.write({"id": 1, "result": "again"})
    writer.close()
    assert [line["id"] for line in output_lines(out)] == [1, "1", 3]


def test_the_writer_ends_a_whole_last_line_that_lost_its_newline(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": 1, "result": "a"}')
    writer = ResultWriter(str(out))
    writer.write({"id": 2, "result": "b"})
    writer.close()
    assert out.read_text() == '{"id": 1, "result": "a"}\n{"id": 2, "result": "b"}\n'


# --- no job destroys data ---


@pytest.mark.parametrize("spelling", ["same path", "another spelling", "symlink", "hardlink"])
def test_an_output_that_is_the_input_is_refused_and_left_alone(
    tmp_path: Path, spelling: str
) -> None:
    src = write_jsonl(tmp_path / "r.jsonl", [{"id": "a", "text": "Great."}, {"text": "Awful."}])
    before = src.read_bytes()
    (tmp_path / "sub").mkdir()
    out = {
        "same path": src,
        "another spelling": tmp_path / "sub" / ".." / "r.jsonl",
        "symlink": tmp_path / "link.jsonl",
        "hardlink": tmp_path / "hard.jsonl",
    }[spelling]
    if spelling == "symlink":
        out.symlink_to(src)
    if spelling == "hardlink":
        out.hardlink_to(src)
    result, _ = run_batch(str(src), str(out), "--task", "sentiment", *unreachable())
    assert result.returncode == 1, result.stderr
    assert f"the output {out} is the input file {src}" in result.stderr
    assert src.read_bytes() == before
    assert out.read_bytes() == before and out.is_symlink() == (spelling == "symlink")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"Meeting notes: keep these\n", "line 1 is not JSON"),
        (b'{"id": "a", "text": "Great."}\n', "line 1 has a field 'text'"),
        (b'{"id": "a", "text": "Great."}', "line 1 has a field 'text'"),  # no newline: not cut
        (b'{"id": "a", "result": "positive"}\n[1, 2]\n', "line 2 is not a JSON object"),
        (
            b'{"id": "a", "result": "positive"}\n\n{"id": null, "result": 1}\n',
            "line 3 has the id null",
        ),
        (gzip.compress(b'{"id": "a", "result": "positive"}\n', mtime=0), "line 1 is not JSON"),
    ],
    ids=["text", "input rows", "one line without newline", "array", "null id", "gzip"],
)
def test_an_output_with_lines_no_job_wrote_is_refused_and_left_alone(
    tmp_path: Path, content: bytes, problem: str
) -> None:
    src = write_jsonl(
        tmp_path / "in.jsonl", [{"id": "a", "text": "Great."}, {"id": "b", "text": "Awful."}]
    )
    out = tmp_path / "results.jsonl"
    out.write_bytes(content)
    result, _ = run_batch(str(src), str(out), "--task", "sentiment", *unreachable())
    assert result.returncode == 1, result.stderr
    assert f"{out} holds lines a batch job did not write: {problem}" in result.stderr
    assert "left as it is" in result.stderr
    assert out.read_bytes() == content


def test_two_rows_with_one_id_stop_the_job_before_it_starts(tmp_path: Path) -> None:
    src = write_jsonl(
        tmp_path / "in.jsonl",
        [{"id": "a", "text": "Great."}, {"id": "b", "text": "Fine."}, {"id": "a", "text": "Bad."}],
    )
    out = tmp_path / "out.jsonl"
    result, _ = run_batch(str(src), str(out), "--task", "sentiment", *unreachable())
    assert result.returncode == 1, result.stderr
    assert 'the input has the id "a" twice, on line 1 and on line 3' in result.stderr
    assert not out.exists()


def test_split_text_respects_the_limit_and_keeps_every_word() -> None:
    text = "\n\n".join(
        f"Paragraph {i}. " + " ".join(f"word{i}_{j}." for j in range(40)) for i in range(12)
    )
    pieces = split_text(text, 500)
    assert len(pieces) > 5
    assert all(len(p) <= 500 for p in pieces)
    assert " ".join(pieces).split() == text.split()
    assert pack(["aa", "bb", "cc"], 6) == ["aa\n\nbb", "cc"]


# --- jobs on the real model ---


def test_sentiment_in_process_over_300_reviews(tmp_path: Path) -> None:
    reviews = make_reviews(300)
    src = write_jsonl(
        tmp_path / "reviews.jsonl",
        [{"id": r["id"], "text": r["text"]} for r in reviews],
        extra_lines=("{oops",),
    )
    out = tmp_path / "out.jsonl"
    result, summary = run_batch(str(src), str(out), "--task", "sentiment")
    assert result.returncode == 3, result.stderr  # one malformed row: reported, the rest done
    lines = output_lines(out)
    assert_each_row_once(lines, [r["id"] for r in reviews] + [{"line": 151}])
    failed = [line for line in lines if line.get("error")]
    assert [line["id"] for line in failed] == [{"line": 151}]
    assert "not valid JSON" in failed[0]["error"]
    truth = {r["id"]: r["label"] for r in reviews}
    answers = {line["id"]: line["result"] for line in lines if not line.get("error")}
    assert set(answers.values()) <= LABELS
    right = sum(answers[k] == truth[k] for k in truth) / len(truth)
    assert right >= 0.7, right  # measured 0.89 on this model; chance is 0.5
    assert summary["ok"] == 300 and summary["failed"] == 1
    assert all(line["tokens"]["completion"] >= 1 for line in lines if not line.get("error"))
    assert "rows/s" in result.stderr and "300 ok, 1 failed" in result.stderr


def test_a_killed_job_rerun_gives_every_row_once(tmp_path: Path) -> None:
    reviews = make_reviews(160, seed=1)
    src = write_jsonl(tmp_path / "in.jsonl", reviews)
    out = tmp_path / "out.jsonl"
    job = subprocess.Popen(
        batch_command(str(src), str(out), "--task", "sentiment"),
        env=batch_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_until(
        lambda: job.poll() is not None or (out.exists() and out.read_text().count("\n") >= 30),
        120,
        "the job never wrote 30 rows",
    )
    assert job.poll() is None, "the job ended before it could be killed"
    job.send_signal(signal.SIGKILL)
    job.wait()
    done_before = out.read_text().count("\n")
    assert 30 <= done_before < 160
    result, summary = run_batch(str(src), str(out), "--task", "sentiment")
    assert result.returncode == 0, result.stderr
    assert summary["skipped"] == done_before
    assert summary["ok"] == 160 - done_before
    assert_each_row_once(output_lines(out), [r["id"] for r in reviews])


def test_a_row_without_an_id_never_takes_another_rows_id(
    server: RunningServer, tmp_path: Path
) -> None:
    # Line 2 has no id; the row on line 1 has the id 2. Both get their line.
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": 2, "text": "I loved it."}, {"text": "Awful."}])
    out = tmp_path / "out.jsonl"
    args = (str(src), str(out), "--task", "sentiment", "--target", server.base_url)
    result, summary = run_batch(*args)
    assert result.returncode == 0, result.stderr
    assert summary["ok"] == 2
    lines = output_lines(out)
    assert_each_row_once(lines, [2, {"line": 2}])
    assert {line["result"] for line in lines} <= LABELS
    result, summary = run_batch(*args)  # a rerun knows both rows by their ids
    assert result.returncode == 0, result.stderr
    assert summary["skipped"] == 2 and summary["ok"] == 0
    assert output_lines(out) == lines


def test_a_rerun_keeps_every_line_a_job_wrote_and_trims_only_its_cut_last_line(
    server: RunningServer, tmp_path: Path
) -> None:
    src = write_jsonl(
        tmp_path / "in.jsonl",
        [{"id": "a", "text": "I loved it."}, {"text": "Awful."}],
        extra_lines=("{oops",),
    )
    out = tmp_path / "out.jsonl"
    written = (
        b'{"id": "a", "result": "positive", "tokens": {"prompt": 30, "completion": 2}, '
        b'"seconds": 0.2}\n'
        b'{"id": {"line": 2}, "result": null, "error": "line 2 is not valid JSON: Expecting '
        b'property name enclosed in double quotes", "seconds": 0.0}\n'
    )
    out.write_bytes(written + b'{"id": {"line": 3}, "result": "neg')  # killed here
    result, summary = run_batch(
        str(src), str(out), "--task", "sentiment", "--target", server.base_url
    )
    assert result.returncode == 0, result.stderr
    assert summary["skipped"] == 2 and summary["ok"] == 1
    data = out.read_bytes()
    assert data.startswith(written)
    redone = json.loads(data[len(written) :])
    assert redone["id"] == {"line": 3} and redone["result"] in LABELS


def test_sentiment_through_a_node_over_http(server: RunningServer, tmp_path: Path) -> None:
    reviews = make_reviews(200, seed=2)
    src = write_jsonl(tmp_path / "in.jsonl", reviews)
    out = tmp_path / "out.jsonl"
    result, _ = run_batch(str(src), str(out), "--task", "sentiment", "--target", server.base_url)
    assert result.returncode == 0, result.stderr
    lines = output_lines(out)
    assert_each_row_once(lines, [r["id"] for r in reviews])
    assert {line["result"] for line in lines} <= LABELS
    truth = {r["id"]: r["label"] for r in reviews}
    assert sum(line["result"] == truth[line["id"]] for line in lines) / len(lines) >= 0.7


def test_a_busy_node_answering_503_is_retried(
    start_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    node = start_server(n_slots=1, queue_size=1, retry_after=1)
    reviews = make_reviews(24, seed=3)
    src = write_jsonl(tmp_path / "in.jsonl", reviews)
    out = tmp_path / "out.jsonl"
    result, summary = run_batch(
        str(src), str(out), "--task", "sentiment", "--target", node.base_url, "--concurrency", "6"
    )
    assert result.returncode == 0, result.stderr
    assert summary["retries"] > 0  # six clients on one slot and one queue place: 503s, retried
    assert summary["ok"] == 24
    assert (
        node.metric('gguf_appliance_requests_total{route="/v1/chat/completions",status="503"}') > 0
    )
    assert_each_row_once(output_lines(out), [r["id"] for r in reviews])


def test_a_wrong_api_key_stops_the_job(
    start_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    node = start_server(api_keys="the-right-key-of-this-node")
    src = write_jsonl(tmp_path / "in.jsonl", make_reviews(5))
    result, _ = run_batch(
        str(src),
        str(tmp_path / "out.jsonl"),
        "--task",
        "sentiment",
        "--target",
        node.base_url,
        "--api-key",
        "wrong",
    )
    assert result.returncode == 1
    assert "HTTP 401" in result.stderr


def test_classify_and_template_with_a_schema(server: RunningServer, tmp_path: Path) -> None:
    rows = [
        {"id": i, "title": t, "text": t}
        for i, t in enumerate(["Fix the login bug", "Add dark mode", "Crash on start"])
    ]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "classes.jsonl"
    result, _ = run_batch(
        str(src),
        str(out),
        "--task",
        "classify",
        "--labels",
        "bug,feature",
        "--target",
        server.base_url,
    )
    assert result.returncode == 0, result.stderr
    assert {line["result"] for line in output_lines(out)} <= {"bug", "feature"}
    schema = tmp_path / "schema.json"
    schema.write_text(
        json.dumps(
            {
                "type": "object",
                "properties": {"priority": {"type": "integer", "minimum": 1, "maximum": 5}},
                "required": ["priority"],
            }
        )
    )
    out = tmp_path / "template.jsonl"
    result, _ = run_batch(
        str(src),
        str(out),
        "--task",
        "template",
        "--template",
        "Rate the priority of this ticket from 1 to 5: {title}",
        "--schema",
        str(schema),
        "--max-tokens",
        "32",
        "--target",
        server.base_url,
    )
    assert result.returncode == 0, result.stderr
    for line in output_lines(out):
        assert isinstance(line["result"]["priority"], int)


def test_template_reports_a_missing_field_in_its_line(
    server: RunningServer, tmp_path: Path
) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "name": "Ada"}, {"id": 2}])
    out = tmp_path / "out.jsonl"
    result, _ = run_batch(
        str(src),
        str(out),
        "--task",
        "template",
        "--template",
        "Say hello to {name}.",
        "--max-tokens",
        "8",
        "--target",
        server.base_url,
    )
    assert result.returncode == 3
    lines = {line["id"]: line for line in output_lines(out)}
    assert lines[1]["result"] and not lines[1].get("error")
    assert lines[2]["error"] == "the row has no 'name' field"


def test_summarize_a_document_longer_than_the_context(
    start_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    node = start_server(n_ctx=512, n_slots=2)
    docs = tmp_path / "docs"
    docs.mkdir()
    story = " ".join(
        f"On day {d}, the lighthouse keeper Mara counted {d * 3} ships and wrote it down."
        for d in range(1, 90)
    )
    assert len(story) > 4 * 512 * 2  # far more than one 512-token context
    (docs / "log.txt").write_text(story)
    (docs / "short.txt").write_text("The meeting moved to Friday at noon.")
    out = tmp_path / "out.jsonl"
    # 3,000-character chunks do not fit 512 tokens: the node refuses them and they are halved.
    result, summary = run_batch(
        str(docs),
        str(out),
        "--task",
        "summarize",
        "--max-tokens",
        "48",
        "--target",
        node.base_url,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    lines = {line["id"]: line for line in output_lines(out)}
    assert set(lines) == {"log.txt", "short.txt"}
    assert lines["log.txt"]["result"].strip() and lines["log.txt"]["calls"] > 3
    assert lines["short.txt"]["result"].strip() and "calls" not in lines["short.txt"]
    assert summary["ok"] == 2


# --- object storage: moto's S3 server on 127.0.0.1 ---


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    yield f"http://127.0.0.1:{port}"
    moto.stop()


def test_input_and_output_in_s3(s3: str, tmp_path: Path) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3})
    fs.mkdir("reviews")
    reviews = make_reviews(40, seed=4)
    with fs.open("reviews/in/part-0.jsonl.gz", "wb", compression="gzip") as f:
        f.write("".join(json.dumps(r) + "\n" for r in reviews).encode())
    args = (
        "s3://reviews/in/part-0.jsonl.gz",
        "s3://reviews/out/sentiment.jsonl",
        "--task",
        "sentiment",
        "--endpoint-url",
        s3,
    )
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    result, summary = run_batch(*args, **env)
    assert result.returncode == 0, result.stderr
    fs.invalidate_cache()
    lines = [
        json.loads(x) for x in fs.cat_file("reviews/out/sentiment.jsonl").decode().splitlines()
    ]
    assert_each_row_once(lines, [r["id"] for r in reviews])
    assert {line["result"] for line in lines} <= LABELS
    # Rerun with the local spool gone (another machine): the bucket's copy says all is done.
    result, summary = run_batch(*args, XDG_CACHE_HOME=str(tmp_path / "other-cache"))
    assert result.returncode == 0, result.stderr
    assert summary["skipped"] == 40 and summary["ok"] == 0


def test_an_s3_output_that_is_the_input_or_someone_elses_is_refused_and_left_alone(
    s3: str, tmp_path: Path
) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3})
    fs.makedirs("refusals", exist_ok=True)  # moto keeps buckets for the session
    rows = b'{"text": "Great."}\n{"text": "Awful."}\n'
    notes = b"Meeting notes: keep these\n"
    fs.pipe_file("refusals/in.jsonl", rows)
    fs.pipe_file("refusals/notes.jsonl", notes)
    for output, message in [
        ("s3a://refusals/in.jsonl", "is the input file s3://refusals/in.jsonl"),
        ("s3://refusals/notes.jsonl", "notes.jsonl holds lines a batch job did not write: line 1"),
    ]:
        result, _ = run_batch(
            "s3://refusals/in.jsonl",
            output,
            "--task",
            "sentiment",
            "--endpoint-url",
            s3,
            *unreachable(),
            XDG_CACHE_HOME=str(tmp_path / "cache"),
        )
        assert result.returncode == 1, result.stderr
        assert message in result.stderr
    fs.invalidate_cache()
    assert fs.cat_file("refusals/in.jsonl") == rows
    assert fs.cat_file("refusals/notes.jsonl") == notes


def test_embed_in_process_and_over_http_give_the_same_unit_vectors(
    server: RunningServer, tmp_path: Path
) -> None:
    import numpy as np

    rows = [
        {"id": i, "text": f"Review {i}: the food was {'good' if i % 2 else 'bad'}."}
        for i in range(12)
    ]
    rows.append({"id": "empty", "text": "  "})
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    vectors = {}
    for name, extra in (("local", ()), ("http", ("--target", server.base_url))):
        out = tmp_path / f"{name}.jsonl"
        result, summary = run_batch(str(src), str(out), "--task", "embed", *extra)
        assert result.returncode == 3, result.stderr  # the empty row fails, said in its line
        lines = output_lines(out)
        assert_each_row_once(lines, [row["id"] for row in rows])
        failed = [line for line in lines if line.get("error")]
        assert [line["id"] for line in failed] == ["empty"]
        assert summary["ok"] == 12 and summary["prompt_tokens"] > 12
        done = {line["id"]: np.array(line["result"]) for line in lines if not line.get("error")}
        assert all(v.shape == (576,) and abs(np.linalg.norm(v) - 1) < 1e-5 for v in done.values())
        assert all(line["tokens"]["prompt"] > 0 for line in lines if not line.get("error"))
        vectors[name] = done
    for key, vector in vectors["local"].items():
        assert np.allclose(vector, vectors["http"][key], atol=1e-5), key
