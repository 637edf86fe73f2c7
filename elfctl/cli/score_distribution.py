"""`elfctl score-diversity` and `elfctl score-mauve`: degeneration and distribution metrics.

They read inputs, show tables, print `--json` and append to metrics.jsonl exactly as the
other scorers (cli/score.py) do; the work is `elfctl.scoring`'s `score_diversity_files` /
`score_mauve_files`, which `eval --metrics` and `sweep` call too, so their numbers are
these commands' numbers.
"""

from __future__ import annotations

import typer

from elfctl.cli.app import app, handle_errors, log
from elfctl.cli.options import Cpu, md
from elfctl.cli.score import FILES_HELP, JSON_OPTION, progress_for, read_inputs, report

DIVERSITY_HELP = (
    "Degeneration and diversity of each file: distinct-n (1-4, over the file), rep-n (1-4, "
    "the share of repeated n-grams within a sample, averaged), self-BLEU (sacreBLEU sentence "
    "BLEU of each sample against the others, over a fixed seeded subsample) and unigram "
    "entropy.\n\ndistinct-n, rep-n and entropy count --tokenizer tokens (GPT-2 Large's by "
    "default, so the entropy equals score-ppl's; 'words' for whitespace words). Empty "
    "samples are skipped and counted. A record is appended to the metrics.jsonl beside each "
    "input."
)
MAUVE_HELP = md(
    "MAUVE of each file against human references (the mauve-text package; "
    "pip install 'elfctl[mauve]').\n\nFeatures are the last hidden state at each text's last "
    "token under --model (GPT-2 Large by default, any local folder), truncated at "
    "--max-length tokens; references are featurized once for all files. Each side needs at "
    "least 10 non-empty texts. A record is appended to the metrics.jsonl beside each input."
)

# The table shows a selection that fits a terminal; --json and metrics.jsonl hold n = 1..4.
DIVERSITY_COLUMNS = [
    ("dist-1", "distinct_1"),
    ("dist-2", "distinct_2"),
    ("dist-4", "distinct_4"),
    ("rep-2", "rep_2"),
    ("rep-4", "rep_4"),
    ("self-BLEU", "self_bleu"),
    ("entropy", "entropy"),
]
# MAUVE's reference options, shared by eval and sweep (score-mauve documents its own).
REFERENCES_OPTION = typer.Option(
    None, "--references", help="Human text for MAUVE (as score-mauve --references)."
)
REFERENCE_FIELD_OPTION = typer.Option(
    "text", "--reference-field", help="Text field of --references rows."
)
NUM_REFERENCES_OPTION = typer.Option(
    5000, "--num-references", min=1, help="Use the first N references."
)
MAUVE_MODEL_OPTION = typer.Option(
    None, "--mauve-model", help="MAUVE feature model (default: --scorer)."
)

MAUVE_COLUMNS = [
    ("empty", "n_empty"),
    ("refs", "n_references"),
    ("buckets", "num_buckets"),
    ("MAUVE", "mauve"),
]


# ----------------------------------------------------------------------------- score-diversity


@app.command(
    "score-diversity",
    help=DIVERSITY_HELP,
    epilog=(
        "Examples:\n\n"
        "  elfctl score-diversity outputs/owt-b-sde32\n\n"
        "  elfctl score-diversity 'outputs/*/samples.jsonl' --tokenizer words --json\n\n"
        "  elfctl score-diversity outputs/a outputs/b --self-bleu-samples 500 --seed 1"
    ),
)
@handle_errors
def score_diversity_command(
    files: list[str] = typer.Argument(..., help=FILES_HELP, show_default=False),
    tokenizer: str = typer.Option(
        "gpt2-large",
        "--tokenizer",
        help="Tokens to count: a tokenizer hub id or local folder, or 'words'.",
    ),
    max_length: int = typer.Option(
        1024, "--max-length", min=1, help="Truncate each sample to this many tokens."
    ),
    self_bleu_samples: int = typer.Option(
        1000, "--self-bleu-samples", min=2, help="Size of the seeded self-BLEU subsample."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the self-BLEU subsample."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Diversity metrics of each file (help text: DIVERSITY_HELP)."""
    from elfctl.scoring import score_diversity_files

    inputs = read_inputs(files)
    result_records = score_diversity_files(
        inputs,
        tokenizer,
        max_length=max_length,
        self_bleu_samples=self_bleu_samples,
        seed=seed,
    )
    title = f"diversity ({result_records[0]['scorer']})"
    report(result_records, title, DIVERSITY_COLUMNS, json_out)


# ----------------------------------------------------------------------------- score-mauve


def load_references(source: str, field: str, split: str | None, limit: int) -> list[str]:
    """MAUVE's human texts, read before any sampling or featurizing."""
    from elfctl.scoring import read_references, require_mauve

    require_mauve()
    return read_references(source, field, split, limit)


@app.command(
    "score-mauve",
    help=MAUVE_HELP,
    epilog=(
        "Examples:\n\n"
        "  elfctl score-mauve outputs/owt-b-sde32 --references owt-valid.jsonl\n\n"
        "  elfctl score-mauve outputs/tiny --references testbed:grammar/validation "
        "--model ./tiny-gpt2\n\n"
        "  elfctl score-mauve 'outputs/*' --references human.txt --num-references 1000 --json"
    ),
)
@handle_errors
def score_mauve_command(
    files: list[str] = typer.Argument(..., help=FILES_HELP, show_default=False),
    references: str = typer.Option(
        ...,
        "--references",
        help=(
            "Human text: a samples file or run dir, a .jsonl file (--reference-field), a .txt "
            "file (one text per line), a save_to_disk folder or a hub dataset."
        ),
    ),
    reference_field: str = typer.Option(
        "text", "--reference-field", help="Text field of --references rows."
    ),
    split: str = typer.Option(None, "--split", help="Dataset split of --references."),
    num_references: int = typer.Option(
        5000, "--num-references", min=1, help="Use the first N references."
    ),
    model: str = typer.Option(
        "gpt2-large", "--model", help="Feature model: a hub id or local folder."
    ),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Texts per forward pass."),
    max_length: int = typer.Option(
        1024, "--max-length", min=1, help="Truncate each text to this many tokens."
    ),
    seed: int = typer.Option(25, "--seed", help="k-means seed (mauve-text's default: 25)."),
    scaling: float = typer.Option(
        5.0, "--scaling", min=0.0, help="MAUVE scaling factor c (mauve-text's default: 5)."
    ),
    json_out: bool = JSON_OPTION,
    cpu: Cpu = False,
) -> None:
    """MAUVE of each file (help text: MAUVE_HELP)."""
    from accelerate import PartialState

    from elfctl.scoring import score_mauve_files

    inputs = read_inputs(files)
    texts = load_references(references, reference_field, split, num_references)
    result_records = score_mauve_files(
        inputs,
        texts,
        model,
        references_name=references,
        batch_size=batch_size,
        max_length=max_length,
        seed=seed,
        scaling=scaling,
        device=PartialState(cpu=cpu).device,
        progress=progress_for,
        log=log,
    )
    report(result_records, f"MAUVE ({model} features)", MAUVE_COLUMNS, json_out)
