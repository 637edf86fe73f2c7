"""Gen PPL under the two eos modes of `score-ppl`, side by side on samples of mixed lengths.

`--eos-mode official` also scores one eos after every sample shorter than the corpus's
longest (what the official script's whole-corpus eos padding does); `ours` scores only a
sample's own tokens. How much that moves Gen PPL depends on how likely the scorer finds an
eos right after each sample, so the scorer here is a real (if small) language model: a
2-layer GPT-2 with the tests' byte-level BPE tokenizer, trained for --steps steps on the
test bed's grammar with an eos after every text, saved in Hugging Face format and loaded
through `scoring.load_scorer` like gpt2-large. It is scored on fresh grammar texts (4-10
words: they end where a text may end) and on the same texts cut at a random word (they
end mid-sentence, where eos is unlikely), and optionally on a samples file.

    python bench/eos_mode.py
    python bench/eos_mode.py --samples runs/tiny/demo-samples   # also a samples.jsonl
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' GPT-2 fixture

from elfctl import records
from elfctl.scoring import metrics as scoring
from elfctl.testbed.grammar import generate_corpus
from tests.gpt2_fixture import build_tiny_gpt2  # noqa: E402


def train_scorer(folder: Path, steps: int, seed: int) -> None:
    """Train the fixture's GPT-2 (re-initialised at GPT-2's own scale) on grammar texts,
    each followed by eos, then save it back into `folder`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    torch.manual_seed(seed)
    model.apply(model._init_weights)  # the fixture's deliberately large weights undone
    texts = generate_corpus(8000, seed)
    rows = [ids + [tokenizer.eos_token_id] for ids in tokenizer(texts)["input_ids"]]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(seed)
    model.train()
    for step in range(steps):
        batch = rng.sample(rows, 32)
        longest = max(map(len, batch))
        ids = torch.tensor([r + [tokenizer.eos_token_id] * (longest - len(r)) for r in batch])
        mask = torch.tensor([[1] * len(r) + [0] * (longest - len(r)) for r in batch])
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if (step + 1) % 100 == 0:
            print(f"  scorer step {step + 1}: loss {loss.item():.3f}", flush=True)
    model.eval()
    model.save_pretrained(folder)


def cut_mid_text(texts: list[str], seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for text in texts:
        words = text.split()
        out.append(" ".join(words[: rng.randint(2, max(2, len(words) - 1))]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="scorer training steps")
    parser.add_argument("--texts", type=int, default=512, help="grammar texts to score")
    parser.add_argument("--samples", type=Path, help="also score this samples file / run dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    start = time.perf_counter()
    folder = build_tiny_gpt2(Path(tempfile.mkdtemp(prefix="eos-mode-gpt2-")), seed=args.seed)
    print(f"training the scorer ({args.steps} steps) in {folder}", flush=True)
    train_scorer(folder, args.steps, args.seed)
    model, tokenizer = scoring.load_scorer(str(folder))

    texts = generate_corpus(args.texts, args.seed + 1)
    corpora = {"grammar texts": texts, "cut mid-text": cut_mid_text(texts, args.seed + 2)}
    if args.samples is not None:
        rows = records.read_samples(records.samples_path(args.samples))
        corpora[str(args.samples)] = [row["text"] for row in rows]

    print()
    header = (
        f"{'corpus':28s} {'n':>5s} {'shorter':>7s} {'tokens':>7s} {'PPL ours':>9s} "
        f"{'official':>9s} {'diff':>7s} {'eos NLL':>8s}"
    )
    print(header)
    print("-" * len(header))
    for name, corpus in corpora.items():
        ours = scoring.score_ppl(corpus, model, tokenizer, batch_size=32)
        official = scoring.score_ppl(corpus, model, tokenizer, batch_size=32, eos_mode="official")
        shorter = official.n_tokens - ours.n_tokens
        eos_nll = (official.nll_sum - ours.nll_sum) / max(shorter, 1)
        print(
            f"{name[-28:]:28s} {ours.n_samples:5d} {shorter:7d} {ours.n_tokens:7d} "
            f"{ours.ppl:9.3f} {official.ppl:9.3f} {(official.ppl / ours.ppl - 1):+7.1%} "
            f"{eos_nll:8.2f}"
        )
    seconds = time.perf_counter() - start
    print(
        "\n'shorter': samples that get the official mode's extra eos; 'eos NLL': its mean NLL "
        "(nats).\nlog(official / ours) = (eos NLL - log PPL ours) x shorter / (tokens + "
        f"shorter), so the gap shrinks with sample length. {seconds:.0f} s"
    )


if __name__ == "__main__":
    main()
