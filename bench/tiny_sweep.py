"""Quality against sampling steps for the tiny preset: the README's sweep picture.

Builds (once) the test bed's grammar-trained GPT-2 scorer (elfctl/testbed/scorer.py: GPT-2
Large cannot be downloaded here, and a random GPT-2 scores every text alike), then runs

    elfctl sweep --repo RUN_DIR --steps 4,8,16,32,64 --seeds 0,1,2 --num-samples 256
                 --scorer GRAMMAR_GPT2 --references testbed:grammar/validation

and copies sweep.png to --png. Gen PPL and MAUVE both use the grammar scorer; MAUVE compares
with the grammar's validation texts. Also prints the scorer's Gen PPL on the grammar's own
texts and on shuffled words (what its numbers mean), and the share of samples the grammar
accepts at each step count.

    python bench/tiny_sweep.py --run-dir runs/tiny
    python bench/tiny_sweep.py --run-dir runs/tiny --png docs/tiny-sweep.png --force
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path


def print_scorer_baselines(scorer: str) -> None:
    """What the scorer's Gen PPL means: the grammar's own texts against shuffled words."""
    import datasets

    from elfctl.scoring import metrics as scoring
    from elfctl.testbed.assets import resolve_testbed_uri
    from elfctl.testbed.quality import shuffled_samples

    model, tokenizer = scoring.load_scorer(scorer)
    validation = datasets.load_from_disk(resolve_testbed_uri("testbed:grammar/validation"))
    grammatical = scoring.score_ppl(list(validation["text"])[:256], model, tokenizer).ppl
    shuffled = scoring.score_ppl(shuffled_samples(256, 0), model, tokenizer).ppl
    print(f"scorer Gen PPL: validation texts {grammatical:.2f}, shuffled words {shuffled:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/tiny", help="A trained tiny run (read only).")
    parser.add_argument("--out", default="outputs/tiny-sweep", help="The sweep directory.")
    parser.add_argument("--steps", default="4,8,16,32,64")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--png", default=None, help="Also copy sweep.png here.")
    parser.add_argument("--force", action="store_true", help="Replace an earlier --out.")
    args = parser.parse_args()

    from elfctl import records
    from elfctl.runs import sweep
    from elfctl.testbed.grammar import accepts
    from elfctl.testbed.scorer import ensure_grammar_scorer

    scorer = ensure_grammar_scorer()
    print("grammar scorer:", scorer, flush=True)
    print_scorer_baselines(scorer)
    command = [
        sys.executable, "-m", "elfctl", "sweep", "--repo", args.run_dir, "--steps", args.steps,
        "--seeds", args.seeds, "--num-samples", str(args.num_samples), "--scorer",
        ensure_grammar_scorer(), "--references", "testbed:grammar/validation", "--out",
        args.out, "--cpu",
    ]  # fmt: skip
    if args.force:
        command.append("--force")
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True)

    summary = sweep.load(args.out)
    print("\nsteps  accepted by the grammar (mean over seeds)")
    for row in summary["rows"]:
        shares = []
        for run_dir in row["run_dirs"]:
            texts = [r["text"] for r in records.read_samples(run_dir)]
            shares.append(sum(accepts(t) for t in texts) / len(texts))
        print(f"{row['steps']:>5}  {100 * sum(shares) / len(shares):.1f} %")
    if args.png:
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(args.out) / sweep.PLOT_FILE, args.png)
        print(f"copied the plot to {args.png}")


if __name__ == "__main__":
    main()
