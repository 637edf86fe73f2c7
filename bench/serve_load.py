"""Load test of `elfctl serve`: throughput, latency, failures and identical texts, in one run.

Starts `elfctl serve` on a run (a subprocess on 127.0.0.1 only), measures `elfctl sample` at
the same batch size in the same run, then sends N requests from M concurrent clients over
loopback, bounded in count and in time. Reports:

  - throughput (samples/s) against `elfctl sample` at the same batch size (goal >= 0.8x);
  - p50 / p95 latency of a request;
  - failed or lost requests (goal 0);
  - whether every text equals what offline sampling gives for the same seed and prompt
    (goal: all): each distinct (seed, prompt) is sampled again by a `SampleJob`, what
    `elfctl sample --seed S --prompt P` runs, in this process;
  - time to the first streamed frame against time to the final text, over a few streams;
  - freeing rows: one batch of streams in which half the clients leave at their first frame,
    against the same batch with every client staying (how soon the others finish, and the
    rows the server reports freed).

    python bench/serve_load.py --repo runs/tiny
    python bench/serve_load.py --repo runs/tiny --requests 2000 --clients 32 --max-batch 32

Requests cycle through no prompt and a few prompts taken from the model's own samples, and
through 50 seeds (request i: seed 7i mod 50), so 100 distinct requests repeat in batches of
different company. The baseline is unprompted `elfctl sample` (no encoder pass: its
fastest case); the server's batches also encode their prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from elfctl.config import sampling_setting
from elfctl.runs import SampleJob, load_for_sampling
from elfctl.sampling import detokenize, parse_prompt

SEEDS = 50


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "elfctl", "serve", "--repo", args.repo, "--port", str(port),
        "--max-batch", str(args.max_batch), "--batch-window-ms", str(args.window_ms),
        "--model-id", "bench", *(["--cpu"] if args.cpu else []),
    ]  # fmt: skip
    return subprocess.Popen(command, stderr=subprocess.PIPE, text=True)


def wait_up(base: str, proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read()}")
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not come up in time")


def offline_speed(args, steps: int, length: int) -> float:
    """samples/s of `elfctl sample` at the server's batch size (its run.json, load excluded)."""
    with tempfile.TemporaryDirectory() as out:
        command = [
            sys.executable, "-m", "elfctl", "sample", "--repo", args.repo, "--out", out,
            "--num-samples", str(args.max_batch * args.offline_batches),
            "--batch-size", str(args.max_batch), "--steps", str(steps),
            "--length", str(length), "--seed", "0", "--json", *(["--cpu"] if args.cpu else []),
        ]  # fmt: skip
        subprocess.run(command, check=True, capture_output=True, text=True)
        return json.loads((Path(out) / "run.json").read_text())["samples_per_s"]


def request_body(i: int, prompts: list[str | None], steps: int, length: int) -> dict:
    body = {"seed": (7 * i) % SEEDS, "steps": steps, "max_tokens": length, "model": "bench"}
    prompt = prompts[i % len(prompts)]
    if prompt is not None:
        body["prompt"] = prompt
    return body


def load_phase(base: str, bodies: list[dict], clients: int, limit_s: float) -> dict:
    """Every body sent once, by `clients` threads, until done or `limit_s` has passed."""
    results: dict[int, dict] = {}
    next_index = iter(range(len(bodies)))
    lock = threading.Lock()
    stop_at = time.monotonic() + limit_s

    def client():
        with httpx.Client(timeout=120) as http:
            while time.monotonic() < stop_at:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    return
                start = time.perf_counter()
                try:
                    response = http.post(f"{base}/v1/completions", json=bodies[i])
                    ok = response.status_code == 200
                    body = response.json() if ok else None
                except httpx.HTTPError as e:
                    ok, body = False, {"error": str(e)}
                results[i] = {"ok": ok, "seconds": time.perf_counter() - start, "body": body}

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(limit_s + 180)
    return {"results": results, "wall": time.perf_counter() - start}


def stream_timings(base: str, bodies: list[dict]) -> list[tuple[float, float]]:
    """(seconds to the first frame, seconds to the final text) of each streamed body."""
    out = []
    for body in bodies:
        start = time.perf_counter()
        first = final = None
        with httpx.stream(
            "POST", f"{base}/v1/completions", json={**body, "stream": True}, timeout=120
        ) as response:
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                choice = json.loads(line[6:])["choices"][0]
                now = time.perf_counter() - start
                if first is None:
                    first = now
                if choice["finish_reason"] is not None:
                    final = now
        out.append((first, final))
    return out


def batch_of_streams(base: str, bodies: list[dict], leave: set[int]) -> float:
    """Send every body as a stream at once; clients in `leave` read one frame and leave.
    Returns the seconds until every staying client has its final text."""
    done: dict[int, float] = {}
    start = time.perf_counter()

    def client(i: int) -> None:
        body = {**bodies[i], "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=300) as r:
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                if i in leave:
                    return  # closes the connection after the first frame
                if json.loads(line[6:])["choices"][0]["finish_reason"] is not None:
                    done[i] = time.perf_counter() - start

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    stayed = [i for i in range(len(bodies)) if i not in leave]
    missing = [i for i in stayed if i not in done]
    if missing:
        raise SystemExit(f"{len(missing)} staying streams got no final text")
    return max(done[i] for i in stayed)


def leaving_phase(base: str, body: dict, rows: int) -> dict:
    """The same batch of `rows` streams twice: every client staying, then half leaving."""
    bodies = [{**body, "seed": 1000 + i} for i in range(rows)]
    freed_before = httpx.get(f"{base}/health", timeout=30).json()["freed_rows"]
    all_stay = batch_of_streams(base, bodies, set())
    half_leave = batch_of_streams(base, bodies, set(range(0, rows, 2)))
    freed = httpx.get(f"{base}/health", timeout=30).json()["freed_rows"] - freed_before
    return {"all_stay": all_stay, "half_leave": half_leave, "freed": freed, "rows": rows}


def offline_texts(args, bodies: list[dict], steps: int, length: int) -> dict:
    """(seed, prompt) -> the text `elfctl sample --seed S [--prompt P]` gives as sample 0,
    cut after its prompt as the server's completions are."""
    loaded = load_for_sampling(args.repo, None, None, "cpu" if args.cpu else _device(),
                               for_prompting=True)  # fmt: skip
    setting = sampling_setting(loaded.config)
    setting = type(setting)(**{**setting.__dict__, "steps": steps})
    out = {}
    with tempfile.TemporaryDirectory() as work:
        for body in bodies:
            key = (body["seed"], body.get("prompt"))
            if key in out:
                continue
            prompts = [key[1]] if key[1] is not None else None
            job = SampleJob(setting, 1, length, seed=key[0], batch_size=1, prompts=prompts)
            folder = Path(work) / f"{len(out)}"
            job.run(loaded, folder)
            row = json.loads((folder / "samples.jsonl").read_text().splitlines()[0])
            skip = parse_prompt(loaded.tokenizer, key[1]).span if key[1] is not None else 0
            out[key] = detokenize(loaded.tokenizer, [row["tokens"][skip:]])[0]
    return out


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def prompts_for(args) -> list[str | None]:
    """No prompt, and the first words of a few of the model's own offline samples."""
    loaded = load_for_sampling(args.repo, None, None, "cpu", for_prompting=False)
    words = loaded.tokenizer.convert_ids_to_tokens(list(range(len(loaded.tokenizer))))
    plain = [w.lstrip("▁") for w in words if w.lstrip("▁").isalpha()][:6]
    return [None, f"{plain[0]} {plain[1]}", plain[2], f"{plain[3]} {plain[4]} {plain[5]}"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repo", default="runs/tiny")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--window-ms", type=float, default=20.0)
    parser.add_argument("--steps", type=int, default=None, help="default: the run's setting")
    parser.add_argument("--offline-batches", type=int, default=8)
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--time-limit-s", type=float, default=900.0)
    parser.add_argument("--start-timeout-s", type=float, default=600.0)
    parser.add_argument("--leavers-batch", type=int, default=None, help="default: --max-batch")
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    loaded = load_for_sampling(args.repo, None, None, "cpu")
    setting = sampling_setting(loaded.config)
    steps = args.steps or setting.steps
    length = setting.length or loaded.config.data.max_length
    prompts = prompts_for(args)
    bodies = [request_body(i, prompts, steps, length) for i in range(args.requests)]
    print(f"{args.requests} requests, {args.clients} clients, max batch {args.max_batch}, "
          f"window {args.window_ms:g} ms, {steps} steps, {length} tokens; prompts {prompts}",
          flush=True)  # fmt: skip

    offline = offline_speed(args, steps, length)
    print(f"elfctl sample at batch {args.max_batch}: {offline:.2f} samples/s", flush=True)

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(args, port)
    try:
        wait_up(base, proc, args.start_timeout_s)
        load = load_phase(base, bodies, args.clients, args.time_limit_s)
        health = httpx.get(f"{base}/health", timeout=30).json()
        streams = stream_timings(base, bodies[: args.streams])
        leaving = leaving_phase(base, bodies[0], args.leavers_batch or args.max_batch)
    finally:
        proc.terminate()
        proc.wait(120)

    results = load["results"]
    ok = [r for r in results.values() if r["ok"]]
    failed = len(results) - len(ok)
    lost = args.requests - len(results)
    served = len(ok) / load["wall"]
    latencies = [r["seconds"] for r in ok]
    reference = offline_texts(args, bodies, steps, length)
    same = sum(
        results[i]["body"]["choices"][0]["text"] == reference[(b["seed"], b.get("prompt"))]
        for i, b in enumerate(bodies)
        if i in results and results[i]["ok"]
    )
    first = [f for f, _ in streams]
    final = [f for _, f in streams]
    print(f"server: {len(ok)} samples in {load['wall']:.1f}s = {served:.2f} samples/s "
          f"({health['batches']} batches, mean {health['rows'] / max(health['batches'], 1):.1f} "
          f"rows)")  # fmt: skip
    print(f"throughput ratio server / elfctl sample: {served / offline:.2f}x (goal >= 0.8x)")
    print(f"latency p50 {percentile(latencies, 0.5):.3f}s  p95 {percentile(latencies, 0.95):.3f}s")
    print(f"failed {failed}, lost {lost} (goal 0)")
    print(f"texts equal to offline sampling: {same} of {len(ok)} ({len(reference)} distinct "
          "(seed, prompt) pairs)")  # fmt: skip
    print(
        f"streams ({len(streams)}, one at a time after the load): first frame median "
        f"{statistics.median(first):.3f}s, final text median {statistics.median(final):.3f}s"
    )
    print(
        f"a batch of {leaving['rows']} streams: the staying clients' last final text after "
        f"{leaving['half_leave']:.2f}s when half leave at their first frame, against "
        f"{leaving['all_stay']:.2f}s when all stay ({leaving['freed']} rows freed)"
    )


if __name__ == "__main__":
    main()
