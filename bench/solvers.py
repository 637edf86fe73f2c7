"""Samplers at equal forwards on the test bed: quality, diversity and time per forward.

Three subcommands (docs/solvers.md shows the tables they print):

  quality   For each sampler x time schedule x forward budget x seed, sample N texts with
            the most steps that fit the budget (`Solver.steps_for`) and score them. One JSON
            line per cell is appended to --results (cells already there are skipped, so an
            interrupted run continues).
              --task tiny       unconditional (runs/tiny): accepted share (the grammar's
                                exact recognizer), Gen PPL and entropy of the grammar-trained
                                GPT-2 scorer, MAUVE against validation (--mauve), and the
                                diversity guards distinct-4 and self-BLEU (words)
              --task prompt     the same with the first two words of held-out validation
                                sentences as prompts (clean hold)
              --task translate  tiny-translate (runs/tiny-translate): BLEU against the
                                references, the target grammar's accepted share, the guards
  table     Mean +- standard error over seeds of every metric per (task, sampler, schedule,
            budget), as a Markdown table, from one or more --results files.
  speed     Time per forward of each sampler, side by side in one run: the tiny net (length
            16) and ELF-B shapes (length 128, random weights), on the CPU; wall time of a
            whole sampling call divided by its true forwards (decode included).
  overhead  What each sampler spends outside the network per step: the same loop with a
            network that costs nothing (x_hat = z), at the tiny and ELF-B shapes.

    OMP_NUM_THREADS=1 python bench/solvers.py quality --task tiny --run-dir runs/tiny \
        --results outputs/solvers/tiny.jsonl
    python bench/solvers.py table outputs/solvers/tiny.jsonl
    OMP_NUM_THREADS=1 python bench/solvers.py speed
    OMP_NUM_THREADS=1 python bench/solvers.py overhead
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

SAMPLERS = "sde,ode,heun,heun-sde,dpm2m,dpm2m-sde"
SCHEDULES = "logit_normal,quantile,karras"


# ----------------------------------------------------------------------------- quality


def validation_texts() -> list[str]:
    import datasets

    from elfctl.testbed.assets import resolve_testbed_uri

    uri = resolve_testbed_uri("testbed:grammar/validation")
    return list(datasets.load_from_disk(uri)["text"])


def prompts_for(n: int, seed: int = 0) -> list[str]:
    """The first two words of held-out validation sentences of 6+ words, in a seeded order."""
    long = [t for t in validation_texts() if len(t.split()) >= 6]
    random.Random(seed).shuffle(long)
    return [" ".join(long[i % len(long)].split()[:2]) for i in range(n)]


class Scorers:
    """The grammar scorer (Gen PPL, MAUVE features) and the references, loaded once."""

    def __init__(self, task: str, mauve: bool, n: int):
        from elfctl.scoring import metrics
        from elfctl.testbed.scorer import ensure_grammar_scorer

        self.task, self.mauve = task, mauve
        self.references = None
        if task == "translate":  # BLEU against the references needs no scorer
            return
        path = ensure_grammar_scorer()
        self.model, self.tokenizer = metrics.load_scorer(path)
        if mauve:
            from elfctl.scoring.mauve import featurize, load_featurizer

            self.featurizer = load_featurizer(path)
            refs = validation_texts()[:n]
            self.references = featurize(refs, *self.featurizer, batch_size=64)
        import datasets

        from elfctl.testbed.assets import resolve_testbed_uri

        uri = resolve_testbed_uri("testbed:grammar/train")
        self.training = set(datasets.load_from_disk(uri)["text"])

    def score(self, texts: list[str], references: list[str] | None) -> dict:
        from elfctl.scoring import score_bleu
        from elfctl.scoring.diversity import score_diversity

        diversity = score_diversity(texts, None, self_bleu_samples=len(texts))
        out = {"distinct_4": diversity.distinct["4"], "self_bleu": diversity.self_bleu}
        if self.task == "translate":
            from elfctl.testbed.translate import target_accepts

            out["bleu"] = score_bleu(texts, references).bleu
            out["accepted"] = sum(map(target_accepts, texts)) / len(texts)
            return out
        from elfctl.scoring import metrics
        from elfctl.testbed.quality import evaluate_samples

        ppl = metrics.score_ppl(texts, self.model, self.tokenizer, batch_size=64)
        out.update(gen_ppl=ppl.ppl, entropy=ppl.entropy)
        out["accepted"] = evaluate_samples(texts, self.training)["accepted"]
        if self.mauve:
            from elfctl.scoring.mauve import featurize, mauve_from_features

            features = featurize(texts, *self.featurizer, batch_size=64)
            out["mauve"] = mauve_from_features(features, self.references).mauve
        return out


def cell_key(cell: dict) -> tuple:
    return (
        cell.get("model", ""),
        cell["task"],
        cell["sampler"],
        cell["schedule"],
        cell["budget"],
        cell["seed"],
    )


def quality(args) -> None:
    import dataclasses

    from elfctl import records
    from elfctl.config import sampling_setting
    from elfctl.runs import SampleJob, load_for_sampling
    from elfctl.sampling import solver

    results = Path(args.results)
    done = set()
    if results.exists():
        done = {cell_key(json.loads(line)) for line in results.read_text().splitlines()}
    translate = args.task == "translate"
    loaded = load_for_sampling(
        args.run_dir, with_encoder=translate, for_prompting=args.task == "prompt"
    )
    base = sampling_setting(loaded.config, args.setting)
    sources = references = prompts = None
    if translate:
        from elfctl.data import read_condition_inputs

        sources, references = read_condition_inputs(
            "testbed:translate/validation", limit=args.num_samples
        )
    if args.task == "prompt":
        prompts = prompts_for(args.num_samples)
    scorers = Scorers(args.task, args.mauve, args.num_samples)
    for budget in map(int, args.budgets.split(",")):
        for name in args.samplers.split(","):
            for schedule in args.schedules.split(","):
                for seed in map(int, args.seeds.split(",")):
                    cell = {
                        "model": args.label,
                        "task": args.task,
                        "sampler": name,
                        "schedule": schedule,
                        "budget": budget,
                        "seed": seed,
                    }
                    if cell_key(cell) in done:
                        continue
                    steps = solver(name).steps_for(budget)
                    setting = dataclasses.replace(
                        base,
                        method=name,
                        steps=steps,
                        time_schedule=schedule,
                        **({"gamma": args.gamma} if args.gamma is not None else {}),
                        **({"sc_cfg": args.sc_cfg} if args.sc_cfg is not None else {}),
                    )
                    job = SampleJob(
                        setting=setting,
                        num_samples=args.num_samples,
                        length=loaded.config.data.max_length,
                        seed=seed,
                        batch_size=args.batch_size,
                        precision="fp32",
                        conditions=sources,
                        references=references,
                        prompts=prompts,
                    )
                    out_dir = Path(args.work) / f"{args.task}-{name}-{schedule}-{budget}-{seed}"
                    start = time.perf_counter()
                    info = job.run(loaded, out_dir, resume="never")
                    seconds = time.perf_counter() - start
                    texts = [row["text"] for row in records.read_samples(out_dir)]
                    cell.update(
                        steps=steps,
                        forwards=info["forwards"]["sampling"],
                        gamma=setting.gamma,
                        sc_cfg=setting.sc_cfg,
                        cfg=setting.cfg,
                        n=len(texts),
                        seconds=round(seconds, 3),
                        checkpoint_step=info["checkpoint"]["step"],
                        **scorers.score(texts, references),
                    )
                    _append(results, cell)
                    print(json.dumps(cell), flush=True)


def _append(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------- table

METRICS = ("accepted", "gen_ppl", "mauve", "bleu", "distinct_4", "self_bleu", "seconds")


def table(args) -> None:
    from elfctl.runs import mean_stderr

    cells = [
        json.loads(line) for path in args.results for line in Path(path).read_text().splitlines()
    ]
    groups: dict[tuple, list[dict]] = {}
    for cell in cells:
        key = (cell.get("model", ""), cell["task"], cell["sampler"], cell["schedule"])
        groups.setdefault((*key, cell["budget"]), []).append(cell)
    present = [m for m in METRICS if any(m in c for c in cells)]
    scale = {"accepted": 100.0, "distinct_4": 100.0}
    head = "| model | task | sampler | grid | budget | steps | fwd | seeds | "
    print(head + " | ".join(present) + " |")
    print("|" + "---|" * (8 + len(present)))
    for key in sorted(groups, key=lambda k: (k[1], k[4], k[0], k[2], k[3])):
        rows = groups[key]
        parts = []
        for metric in present:
            values = [r[metric] * scale.get(metric, 1.0) for r in rows if metric in r]
            if not values:
                parts.append("-")
                continue
            mean, se = mean_stderr(values)
            parts.append(
                f"{mean:.1f} ± {se:.1f}" if metric != "mauve" else f"{mean:.3f} ± {se:.3f}"
            )
        model, task, sampler, schedule, budget = key
        print(
            f"| {model or '-'} | {task} | {sampler} | {schedule} | {budget} | {rows[0]['steps']} | "
            f"{rows[0]['forwards']} | {len(rows)} | " + " | ".join(parts) + " |"
        )


# ----------------------------------------------------------------------------- speed


def speed(args) -> None:
    """Round-robin over the samplers (repeat r of every sampler before repeat r + 1), so that a
    busy machine's slow moments fall on all of them alike; the median call is reported."""
    import torch

    from elfctl.config import ModelConfig, resolve
    from elfctl.model import ELF
    from elfctl.sampling import SOLVERS, SamplerSettings, sample_latents
    from elfctl.sampling.sampler import decode

    shapes = [
        ("tiny (length 16)", resolve("tiny").model, 16, args.batch_size),
        ("ELF-B (length 128, random)", ModelConfig(), 128, args.elf_b_batch),
    ]
    print(f"time per forward, {torch.get_num_threads()} thread(s), CPU, fp32")
    print("| net | batch | sampler | steps | forwards (+1 decode) | s per call | ms per forward |")
    print("|---|---|---|---|---|---|---|")
    for label, config, length, batch in shapes:
        model = ELF(config).eval()
        noise = torch.randn(batch, length, config.latent_dim)
        times: dict[str, list[float]] = {name: [] for name in SOLVERS}
        counts: dict[str, int] = {}
        for repeat in range(args.repeats + 1):
            for name in SOLVERS:
                steps = SOLVERS[name].steps_for(args.forwards)
                settings = SamplerSettings(steps=steps, method=name)
                counted: list[int] = []
                gen = torch.Generator().manual_seed(repeat)
                start = time.perf_counter()
                with torch.no_grad():
                    z = sample_latents(model, settings, noise, gen, forwards=counted)
                    decode(model, z, settings.sc_cfg)
                if repeat:  # the first round warms up
                    times[name].append(time.perf_counter() - start)
                counts[name] = counted[0]
        for name in SOLVERS:
            call = statistics.median(times[name])
            steps = SOLVERS[name].steps_for(args.forwards)
            print(
                f"| {label} | {batch} | {name} | {steps} | {counts[name]} (+1) | {call:.3f} | "
                f"{1000 * call / (counts[name] + 1):.2f} |",
                flush=True,
            )


class NullNet:
    """A network that costs nothing (x_hat = z): what a sampler spends outside the network."""

    def __init__(self, latent_dim: int):
        from types import SimpleNamespace

        self.cfg = SimpleNamespace(self_cond=True, t_eps=0.05, latent_dim=latent_dim)

    def __call__(self, inputs, t, sc_scale=None, decode=False):
        return inputs[..., : self.cfg.latent_dim], None


def overhead(args) -> None:
    """Milliseconds per step outside the network (a zero-cost network), per sampler."""
    import torch

    from elfctl.config import ModelConfig, resolve
    from elfctl.sampling import SOLVERS, SamplerSettings, sample_latents

    shapes = [
        ("tiny (length 16)", resolve("tiny").model.latent_dim, 16, args.batch_size),
        ("ELF-B (length 128)", ModelConfig().latent_dim, 128, args.elf_b_batch),
    ]
    print(f"time outside the network, {torch.get_num_threads()} thread(s), CPU")
    print("| shape | batch | sampler | steps | forwards | ms per step outside the network |")
    print("|---|---|---|---|---|---|")
    for label, width, length, batch in shapes:
        net, noise = NullNet(width), torch.randn(batch, length, width)
        times: dict[str, list[float]] = {name: [] for name in SOLVERS}
        for repeat in range(args.repeats + 1):
            for name in SOLVERS:
                settings = SamplerSettings(steps=args.steps, method=name)
                start = time.perf_counter()
                with torch.no_grad():
                    sample_latents(net, settings, noise, torch.Generator().manual_seed(repeat))
                if repeat:
                    times[name].append(time.perf_counter() - start)
        for name in SOLVERS:
            ms = 1000 * statistics.median(times[name]) / args.steps
            forwards = SOLVERS[name].forwards(args.steps)
            print(f"| {label} | {batch} | {name} | {args.steps} | {forwards} | {ms:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--task", choices=["tiny", "prompt", "translate"], required=True)
    q.add_argument("--run-dir", required=True)
    q.add_argument("--label", default="", help="The model's name in the table (e.g. teacher).")
    q.add_argument("--results", required=True)
    q.add_argument("--work", default="outputs/solvers/work")
    q.add_argument("--samplers", default=SAMPLERS)
    q.add_argument("--schedules", default=SCHEDULES)
    q.add_argument("--budgets", default="4,8,16,32")
    q.add_argument("--seeds", default="0,1,2,3")
    q.add_argument("--num-samples", type=int, default=256)
    q.add_argument("--batch-size", type=int, default=64)
    q.add_argument("--setting", default=None, help="The preset setting to start from.")
    q.add_argument("--gamma", type=float, default=None)
    q.add_argument("--sc-cfg", type=float, default=None)
    q.add_argument("--mauve", action="store_true")
    t = sub.add_parser("table")
    t.add_argument("results", nargs="+")
    s = sub.add_parser("speed")
    s.add_argument("--forwards", type=int, default=16)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--elf-b-batch", type=int, default=4)
    s.add_argument("--repeats", type=int, default=2)
    o = sub.add_parser("overhead")
    o.add_argument("--steps", type=int, default=32)
    o.add_argument("--batch-size", type=int, default=64)
    o.add_argument("--elf-b-batch", type=int, default=32)
    o.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    {"quality": quality, "table": table, "speed": speed, "overhead": overhead}[args.command](args)


if __name__ == "__main__":
    main()
