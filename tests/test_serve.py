"""`elfctl serve`: OpenAI's completion API over a tiny random model, batched and streamed.

Every server here is started and stopped by its test on 127.0.0.1, and every request is
bounded by a timeout.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from elfctl.cli import app
from elfctl.errors import UserError
from elfctl.runs import load_for_sampling
from elfctl.sampling import detokenize, parse_prompt
from elfctl.serve import Batcher, check_extra
from tests.serve_fixture import httpx, running
from tests.test_golden import random_checkpoint

TIMEOUT = 120
FAST = {"steps": 4, "max_tokens": 12}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return random_checkpoint(tmp_path_factory.mktemp("serve"), "tiny")


@pytest.fixture(scope="module")
def loaded(ckpt):
    return load_for_sampling(str(ckpt), None, None, "cpu", for_prompting=True)


@pytest.fixture(scope="module")
def server(loaded):
    with running(loaded, window_ms=50) as (base, srv):
        yield base, srv


def post(base, body, **kw):
    return httpx.post(f"{base}/v1/completions", json=body, timeout=TIMEOUT, **kw)


def texts(response) -> list[str]:
    assert response.status_code == 200, response.text
    return [c["text"] for c in response.json()["choices"]]


def offline(ckpt, tmp_path, *args) -> list[dict]:
    out = tmp_path / f"offline{len(list(tmp_path.iterdir()))}"
    result = CliRunner().invoke(
        app, ["sample", "--repo", str(ckpt), "--out", str(out), *map(str, args)]
    )
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------- the API


def test_a_completion_has_openai_shape_with_the_text_after_the_prompt(server, loaded):
    base, _ = server
    body = post(base, {"model": "tiny", "prompt": "the dog", "n": 2, "seed": 3, **FAST}).json()
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    assert body["id"].startswith("cmpl-") and body["seed"] == 3
    assert [c["index"] for c in body["choices"]] == [0, 1]
    for c in body["choices"]:
        assert c["finish_reason"] in ("stop", "length") and c["logprobs"] is None
        assert not c["text"].startswith("the dog")
    usage = body["usage"]
    assert usage["prompt_tokens"] == 2  # "the dog", counted once per prompt
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_models_and_health_answer(server):
    base, _ = server
    models = httpx.get(f"{base}/v1/models", timeout=TIMEOUT).json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]
    health = httpx.get(f"{base}/health", timeout=TIMEOUT).json()
    assert health["status"] == "ok" and health["defaults"]["steps"] == 32


def test_the_official_openai_client_works_unchanged(server):
    openai = pytest.importorskip("openai", reason="the openai client is not installed")
    base, _ = server
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=TIMEOUT)
    assert [m.id for m in client.models.list()] == ["tiny"]
    done = client.completions.create(
        model="tiny", prompt="the dog", max_tokens=12, seed=4, temperature=0.7,
        extra_body={"steps": 4},
    )  # fmt: skip
    assert done.choices[0].finish_reason in ("stop", "length")
    stream = client.completions.create(
        model="tiny", prompt="the dog", max_tokens=12, seed=4, stream=True,
        extra_body={"steps": 4},
    )  # fmt: skip
    joined = "".join(chunk.choices[0].text for chunk in stream)
    assert joined == done.choices[0].text  # frames carry their text in `elf`, not `text`
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.completions.create(model="tiny", prompt="the dog", logprobs=1)


def test_texts_equal_offline_sampling_for_the_same_seed_and_prompts(server, loaded, ckpt, tmp_path):
    """Prompt p's j-th choice is offline sample j * len(prompts) + p (prompt i mod count)."""
    base, _ = server
    prompts = ["the dog", "every cat"]
    body = {"prompt": prompts, "n": 2, "seed": 5, **FAST}
    got = texts(post(base, body))
    rows = offline(
        ckpt, tmp_path, "--prompt", prompts[0], "--prompt", prompts[1], "--num-samples", 4,
        "--seed", 5, "--steps", 4, "--length", 12,
    )  # fmt: skip
    tok = loaded.tokenizer
    for index, text in enumerate(got):
        p, j = divmod(index, 2)
        row = rows[j * 2 + p]
        skip = parse_prompt(tok, prompts[p]).span
        assert row["tokens"][:skip] == list(parse_prompt(tok, prompts[p]).ids)
        assert text == detokenize(tok, [row["tokens"][skip:]])[0]


def test_infill_and_unprompted_texts_equal_offline_sampling(server, ckpt, tmp_path):
    base, _ = server
    template = "the [gap:2] sees [gap:3] ."
    got = texts(post(base, {"infill": template, "n": 3, "seed": 2, **FAST}))
    rows = offline(ckpt, tmp_path, "--infill", template, "--num-samples", 3, "--seed", 2,
                   "--steps", 4, "--length", 12)  # fmt: skip
    assert got == [r["text"] for r in rows]
    got = texts(post(base, {"prompt": "", "n": 3, "seed": 2, **FAST}))
    rows = offline(ckpt, tmp_path, "--num-samples", 3, "--seed", 2, "--steps", 4, "--length", 12)
    assert got == [r["text"] for r in rows]


def test_stop_sequences_cut_the_text(server):
    base, _ = server
    full = texts(post(base, {"n": 4, "seed": 8, **FAST}))
    word = next(t.split()[1] for t in full if len(t.split()) > 2)
    cut = post(base, {"n": 4, "seed": 8, "stop": [word], **FAST}).json()["choices"]
    for whole, choice in zip(full, cut, strict=True):
        if word in whole:
            assert choice["text"] == whole[: whole.find(word)]
            assert choice["finish_reason"] == "stop"
        else:
            assert choice["text"] == whole


# ---------------------------------------------------------------------------- batching


REQUESTS = [
    {"prompt": "the dog", "seed": 1},
    {"prompt": "every cat", "seed": 2, "n": 2},
    {"seed": 3},
    {"infill": "the [gap:2] sees [gap:3] .", "seed": 4},
    {"prompt": ["the dog", "every bird"], "seed": 1},
    {"prompt": "the dog", "seed": 9},
]


def concurrently(base, bodies) -> list:
    results = [None] * len(bodies)

    def send(i):
        results[i] = post(base, bodies[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    return results


def test_concurrent_requests_are_batched_and_give_the_texts_they_give_alone(loaded):
    bodies = [{**FAST, **b} for b in REQUESTS]
    with running(loaded, window_ms=1000, max_batch=16) as (base, srv):
        together = [texts(r) for r in concurrently(base, bodies)]
        stats = srv.batcher.stats
        assert stats.batches < len(bodies)  # some requests shared a batch
    with running(loaded, window_ms=0) as (base, _):
        alone = [texts(post(base, body)) for body in bodies]
    assert together == alone
    assert together[0] != together[5]  # the same prompt under another seed differs


def test_requests_with_other_settings_or_lengths_go_in_other_batches():
    batches = []
    run = Batcher(lambda jobs: batches.append([j.name for j in jobs]), max_batch=4, window_s=0.3)

    class FakeJob:
        def __init__(self, name, key, rows=1):
            self.name, self.key, self.rows, self.cancelled = name, key, rows, False
            self.arrived = time.monotonic()

        def deliver(self, kind, payload):
            pass

    jobs = [
        FakeJob("a", (12, "sde-4")),
        FakeJob("b", (16, "sde-4")),
        FakeJob("c", (12, "ode-4")),
        FakeJob("d", (12, "sde-4"), rows=2),
        FakeJob("e", (12, "sde-4"), rows=2),  # over max_batch with a and d
        FakeJob("f", (12, "sde-4")),
    ]
    jobs[2].cancelled = True  # its client left before its batch: dropped
    for job in jobs:
        run.submit(job)
    run.start()
    run.stop(timeout=10)
    assert batches == [["a", "d", "f"], ["b"], ["e"]]
    assert run.stats.dropped == 1


# ---------------------------------------------------------------------------- streams


def stream_events(base, body, stop_after: int | None = None) -> list:
    events = []
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=TIMEOUT) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
            if stop_after is not None and len(events) >= stop_after:
                break
    return events


def test_a_stream_sends_the_forming_text_then_the_final_text_and_done(server):
    base, _ = server
    body = {"prompt": "the dog", "seed": 6, "steps": 8, "max_tokens": 12}
    events = stream_events(base, {**body, "stream": True})
    assert events[-1] == "[DONE]"
    frames, final = events[:-2], events[-2]
    steps = [f["choices"][0]["elf"]["step"] for f in frames]
    assert steps == [2, 4, 6, 8]  # K = 4 frames, evenly spaced, ending at the last step
    assert all(f["choices"][0]["text"] == "" for f in frames)
    assert final["choices"][0]["text"] == texts(post(base, body))[0]
    assert frames[-1]["choices"][0]["elf"]["text"] == final["choices"][0]["text"]


def test_a_client_leaving_mid_stream_frees_its_rows_and_the_batch_finishes_for_others(loaded):
    slow = {"prompt": "the dog", "seed": 7, "steps": 64, "max_tokens": 12}
    with running(loaded, window_ms=1000, max_batch=8) as (base, srv):
        expected = texts(post(base, slow))
        other: list = []
        rows: list[int] = []  # the rows of each forward of the shared batch
        hook = loaded.model.register_forward_pre_hook(
            lambda m, a, k: rows.append(a[0].shape[0]), with_kwargs=True
        )
        try:
            thread = threading.Thread(target=lambda: other.append(post(base, slow)))
            thread.start()
            events = stream_events(base, {**slow, "seed": 8, "stream": True}, stop_after=1)
            assert "elf" in events[0]["choices"][0]  # it left after its first frame
            thread.join(TIMEOUT)
        finally:
            hook.remove()
        assert texts(other[0]) == expected
        # Its row was freed mid-trajectory: the batch went on with one row, not two.
        assert srv.engine.freed_rows == 1
        assert httpx.get(f"{base}/health", timeout=TIMEOUT).json()["freed_rows"] == 1
        assert rows[0] == 2 and rows[-1] == 1
        assert rows.count(2) < 64 // 2 + 1  # left at its first frame (step 16 of 64)
        # A job whose client leaves before its batch starts (the 1 s window) is dropped.
        stats = srv.batcher.stats
        dropped, rows = stats.dropped, stats.rows
        body = {**slow, "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=TIMEOUT) as r:
            assert r.status_code == 200
        deadline = time.monotonic() + 10
        while stats.dropped == dropped:
            assert time.monotonic() < deadline, "the abandoned job was not dropped"
            time.sleep(0.01)
        assert stats.rows == rows
        assert texts(post(base, {**slow, "steps": 4})) == texts(post(base, {**slow, "steps": 4}))


# ---------------------------------------------------------------------------- bad requests

TOO_LONG = " ".join(["the dog"] * 20)
BAD = [
    ("{", None, "not valid JSON"),
    ('{"prompt": "the dog", "frobnicate": 1}', "frobnicate", "Unknown field"),
    ('{"n": "2"}', "n", "integer"),
    ('{"n": true}', "n", "integer"),
    ('{"steps": 2.5}', "steps", "integer"),
    ('{"gamma": "high"}', "gamma", "number"),
    ('{"stream": "yes"}', "stream", "true or false"),
    ('{"prompt": [1, 2, 3]}', "prompt", "token ids"),
    (json.dumps({"prompt": TOO_LONG}), "prompt", "tokens but samples have only"),
    ('{"n": 9}', "n", "between 1 and 8"),
    ('{"prompt": ["the dog", "every cat"], "n": 5}', "n", "rows per request"),
    ('{"max_tokens": 17}', "max_tokens", "between 1 and 16"),
    ('{"max_tokens": 0}', "max_tokens", "between 1 and 16"),
    ('{"infill": "the [gap:x] ."}', "infill", "gap"),
    ('{"infill": "the dog ."}', "infill", "no gap"),
    ('{"infill": "the [gap:2]", "prompt": "a"}', "infill", "not both"),
    ('{"condition": "the dog ."}', "condition", "not conditional"),
    ('{"logprobs": 1}', "logprobs", "likelihood"),
    ('{"echo": true}', "echo", "likelihood"),
    ('{"best_of": 3}', "best_of", "likelihood"),
    ('{"suffix": "the end"}', "suffix", "infill"),
    ('{"sampler": "euler"}', "sampler", "ode"),
    ('{"gamma": -1}', "gamma", "at least"),
    ('{"seed": -1}', "seed", "between"),
    ('{"temperature": "hot"}', "temperature", "number"),
    ('{"stop": [""]}', "stop", "non-empty"),
    ("[1, 2]", None, "JSON object"),
]


@pytest.mark.parametrize("raw, param, says", BAD, ids=[b[2] + ":" + b[0][:20] for b in BAD])
def test_a_bad_request_is_a_400_in_openai_shape_and_the_next_good_one_works(
    server, raw, param, says
):
    base, _ = server
    response = httpx.post(
        f"{base}/v1/completions",
        content=raw,
        headers={"content-type": "application/json"},
        timeout=TIMEOUT,
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert says in error["message"] and error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert error["message"].endswith(".") and "Traceback" not in error["message"]
    assert len(texts(post(base, {"seed": 1, **FAST}))) == 1


def test_a_body_over_the_size_limit_is_refused_and_the_server_goes_on(server):
    base, _ = server
    big = json.dumps({"prompt": "the " * 300_000})
    response = httpx.post(
        f"{base}/v1/completions", content=big, headers={"content-type": "application/json"},
        timeout=TIMEOUT,
    )  # fmt: skip
    assert response.status_code == 400 and "over the limit" in response.json()["error"]["message"]
    assert len(texts(post(base, {"seed": 1, **FAST}))) == 1


def test_no_request_can_name_a_file_or_a_model_path(server):
    base, _ = server
    response = post(base, {"model": "/etc/passwd", **FAST})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    for field in ("checkpoint", "repo", "path", "tokenizer"):
        assert post(base, {field: "/etc/passwd"}).status_code == 400
    assert httpx.get(f"{base}/static/../../etc/passwd", timeout=TIMEOUT).status_code == 404


def test_unknown_endpoints_answer_in_openai_shape(server):
    base, _ = server
    response = httpx.get(f"{base}/v1/chat/completions", timeout=TIMEOUT)
    assert response.status_code in (404, 405) and "error" in response.json()


def test_the_api_key_is_required_when_set(loaded):
    with running(loaded, api_key="s3cret") as (base, _):
        refused = post(base, {"seed": 1, **FAST})
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        wrong = post(base, FAST, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert httpx.get(f"{base}/v1/models", timeout=TIMEOUT).status_code == 401
        assert httpx.get(f"{base}/health", timeout=TIMEOUT).status_code == 200  # for balancers
        good = post(base, {"seed": 1, **FAST}, headers={"Authorization": "Bearer s3cret"})
        assert len(texts(good)) == 1


def test_the_playground_is_one_page_that_fetches_nothing_from_other_hosts(server):
    base, _ = server
    page = httpx.get(f"{base}/", timeout=TIMEOUT)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    html = page.text
    for needle in ("http://", "https://", 'src="//', 'href="//', "<link", "import("):
        assert needle not in html
    for element in ('id="prompt"', 'id="infill"', 'id="steps"', 'id="cfg"', 'id="live"'):
        assert element in html


def test_the_server_binds_loopback_unless_told_otherwise():
    import inspect

    from elfctl.cli.serve import serve
    from elfctl.serve import Server

    assert inspect.signature(serve).parameters["host"].default.default == "127.0.0.1"
    assert inspect.signature(Server.run).parameters["host"].default == "127.0.0.1"


def test_a_missing_extra_is_one_clear_sentence(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    with pytest.raises(UserError, match=r"pip install 'elfctl\[serve\]'"):
        check_extra()


# ---------------------------------------------------------------------------- the process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, proc, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("the server did not come up")


def test_on_sigterm_the_server_answers_what_is_in_flight_then_exits(ckpt):
    """A real `elfctl serve` process: loopback by default, the key from the environment."""
    port = free_port()
    env = {**os.environ, "ELFCTL_API_KEY": "k3y", "PYTHONPATH": str(Path.cwd())}
    proc = subprocess.Popen(
        [sys.executable, "-m", "elfctl", "serve", "--repo", str(ckpt), "--port", str(port),
         "--cpu", "--batch-window-ms", "0"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc)
        auth = {"Authorization": "Bearer k3y"}
        assert post(base, FAST).status_code == 401
        results: list = []
        slow = {"seed": 1, "steps": 400, "max_tokens": 12}
        thread = threading.Thread(target=lambda: results.append(post(base, slow, headers=auth)))
        thread.start()
        deadline = time.monotonic() + 60
        while httpx.get(f"{base}/health", timeout=5).json()["running_requests"] == 0:
            assert time.monotonic() < deadline and not results, "the request never queued"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        thread.join(TIMEOUT)
        assert results and len(texts(results[0])) == 1  # answered, not dropped
        assert proc.wait(timeout=60) == 0
        assert "stopped: every request in flight was answered" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


# ---------------------------------------------------------------------------- conditional


def test_a_conditional_model_takes_a_condition_and_matches_offline_sampling(tmp_path):
    ckpt = random_checkpoint(tmp_path / "tt", "tiny-translate")
    loaded = load_for_sampling(str(ckpt), None, None, "cpu", for_prompting=True)
    source = "the dog sleeps ."
    (tmp_path / "src.txt").write_text(f"{source}\n{source}\n")
    rows = offline(ckpt, tmp_path, "--input", tmp_path / "src.txt", "--seed", 3, "--steps", 4)
    with running(loaded) as (base, _):
        got = texts(post(base, {"condition": source, "n": 2, "seed": 3, "steps": 4}))
        assert got == [r["text"] for r in rows]
        refused = post(base, {"condition": 7, "steps": 4})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "condition"
        budget = loaded.config.data.max_length - loaded.config.data.max_input_length
        too_long = post(base, {"condition": source, "max_tokens": budget + 1})
        assert too_long.status_code == 400 and "output budget" in too_long.text
