"""The raw-text pipeline: tokenization throughput, the cache, and memory vs corpus size.

    python bench/data_pipeline.py                       # 50 MB and 500 MB corpora
    python bench/data_pipeline.py --sizes-mb 20 200 --steps 20

1. Tokenization throughput (tokens/s) of `elfctl.pipeline` with data.num_proc 1 and 2 on
   the same corpus (the smaller size), each into a fresh cache; then the same call again,
   which hits the cache: its time as a share of the first (goal: under 5 %).
2. Peak RSS of `elfctl train --preset tiny` (the tiny preset's model and tokenizer, packed
   rows, `--steps` steps, num_proc 1) on each corpus, first run (tokenize + train) and
   second run (cache hit + train), each a fresh process. Two peaks: RSS (os.wait4), which
   also counts the pages of memory-mapped Arrow files that were read (page cache the
   kernel can drop), and anonymous memory (RssAnon, sampled), the process's own. Goal: the
   larger corpus adds under 200 MB.

Corpora are the test bed's grammar: one block of distinct generated sentences, written
over and over up to the size (the tokenizer's cost does not depend on repetition). On a
shared CPU the absolute figures are noisy; the ratios are taken side by side in one run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MB = 2**20
LABELS = ("first run (tokenize + train)", "second run (cache + train)")


def write_corpus(path: Path, size_mb: int) -> Path:
    from elfctl.testbed.grammar import generate_corpus

    block = ("\n".join(generate_corpus(40_000, seed=11)) + "\n").encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        written = 0
        while written < size_mb * MB:
            f.write(block)
            written += len(block)
    return path


def tokenize_once(corpus: Path, num_proc: int, cache: Path) -> tuple[float, dict, float]:
    """(seconds to build, manifest, seconds of a second call hitting the cache)."""
    from elfctl.config import resolve
    from elfctl.data import load_corpus
    from elfctl.model import load_tokenizer

    cfg = resolve("tiny", sets=[f"data.num_proc={num_proc}", f"data.cache_dir={cache}"])
    tokenizer = load_tokenizer(cfg.encoder.tokenizer)
    start = time.perf_counter()
    built = load_corpus(str(corpus), cfg.data, tokenizer)
    first = time.perf_counter() - start
    assert built.prepared.built
    start = time.perf_counter()
    again = load_corpus(str(corpus), cfg.data, tokenizer)
    second = time.perf_counter() - start
    assert not again.prepared.built
    return first, built.prepared.manifest, second


def train_peak_rss(corpus: Path, cache: Path, run_dir: Path, steps: int) -> dict:
    """Peaks of one `elfctl train` process, in MB: `rss` (os.wait4's ru_maxrss: every
    resident page, including pages of memory-mapped Arrow files, which are page cache the
    kernel may drop at will) and `anon` (RssAnon sampled every 0.1 s from /proc: the
    process's own memory); plus wall `seconds`."""
    elfctl = Path(sys.executable).with_name("elfctl")
    command = [str(elfctl), "train", "--preset", "tiny", "--run-dir", str(run_dir), "--cpu"]
    command += ["--max-steps", str(steps), "--set", f"data.train={corpus}"]
    command += ["--set", "data.packing=true", "--set", f"data.cache_dir={cache}"]
    command += ["--set", f"train.checkpoint_every={steps}"]
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    anon = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        anon = max(anon, _status_kb(proc.pid, "RssAnon"))
        time.sleep(0.1)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"training failed with exit code {proc.returncode}: {command}")
    return {"rss": usage.ru_maxrss / 1024, "anon": anon / 1024, "seconds": seconds}


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=int, nargs=2, default=[50, 500])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp folder")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="elfctl-bench-data-"))
    small_mb, large_mb = args.sizes_mb
    try:
        small = write_corpus(work / f"corpus-{small_mb}mb" / "text.txt", small_mb)
        large = write_corpus(work / f"corpus-{large_mb}mb" / "text.txt", large_mb)

        print(f"1. tokenization, tiny preset tokenizer, {small_mb} MB corpus")
        rates = {}
        for num_proc in (1, 2):
            first, manifest, second = tokenize_once(small, num_proc, work / f"cache-np{num_proc}")
            rates[num_proc] = manifest["tokens"] / first
            print(
                f"   num_proc {num_proc}: {manifest['tokens']:,} tokens in {first:.1f} s = "
                f"{rates[num_proc]:,.0f} tokens/s; cached second call {second:.3f} s = "
                f"{100 * second / first:.2f} % of the first"
            )
        print(f"   num_proc 2 / num_proc 1: {rates[2] / rates[1]:.2f}x")

        print(f"2. peak RSS of `elfctl train --preset tiny` ({args.steps} steps, packed rows)")
        peaks = {}
        for size_mb, corpus in ((small_mb, small), (large_mb, large)):
            cache = work / f"cache-train-{size_mb}"
            for label in LABELS:
                run = work / f"run-{size_mb}-{len(peaks)}"
                peak = train_peak_rss(corpus, cache, run, args.steps)
                peaks[(size_mb, label)] = peak
                print(
                    f"   {size_mb:>4} MB, {label}: peak RSS {peak['rss']:,.0f} MB, peak anonymous "
                    f"{peak['anon']:,.0f} MB, {peak['seconds']:.0f} s"
                )
        for label in LABELS:
            big, small_peak = peaks[(large_mb, label)], peaks[(small_mb, label)]
            print(
                f"   {large_mb} MB over {small_mb} MB, {label}: RSS "
                f"{big['rss'] - small_peak['rss']:+,.0f} MB, anonymous "
                f"{big['anon'] - small_peak['anon']:+,.0f} MB"
            )
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
