"""What users read in `--help` is what they can type: the rendered help of every command.

The help is rendered by typer's rich formatter (typer is pinned in pyproject.toml because
this rendering changes between its versions): these tests read the rendered text, not
our help strings, so a change of renderer that shows flags as taking a value, or that
swallows `[gap:N]` as markup, fails here.
"""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from elfctl.cli import app

runner = CliRunner()
COMMANDS = sorted(c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands)


def rendered_help(*command: str) -> str:
    """The help as shown, box drawing removed and whitespace collapsed."""
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    text = re.sub(r"[│╭╮╰╯─]", " ", result.output)
    return " ".join(text.split())


def test_every_command_is_covered():
    assert {"sample", "eval", "sweep", "train", "distill", "show", "convert-jax"} <= set(COMMANDS)


@pytest.mark.parametrize("command", [[]] + [[c] for c in COMMANDS])
def test_flags_are_shown_without_a_value(command):
    text = rendered_help(*command)
    assert "<bool>" not in text
    assert re.search(r"--help Show this message", text)


@pytest.mark.parametrize("command", ["sample", "eval", "sweep", "train", "distill"])
def test_a_flag_with_a_value_still_shows_its_type(command):
    text = rendered_help(command)
    assert re.search(r"--cpu (Run|Train) on the CPU", text)
    assert "--max-steps <int range>" in text or "--batch-size <int range>" in text


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_infill_templates_keep_their_gap_markers(command):
    text = rendered_help(command)
    assert "'the dog [gap:5] the cat .'" in text


def test_sample_help_shows_the_gap_syntax_in_its_text_and_example():
    text = rendered_help("sample")
    assert "around [gap:N] gaps" in text
    assert "--infill 'the [gap:2] dog [gap:3] .'" in text


@pytest.mark.parametrize(
    "command, extra", [("sweep", "elfctl[plot]"), ("score-mauve", "elfctl[mauve]")]
)
def test_pip_extras_are_shown_with_their_brackets(command, extra):
    assert f"pip install '{extra}'" in rendered_help(command)


def test_train_help_shows_the_multi_process_form_that_starts_two_processes_on_a_cpu():
    text = rendered_help("train")
    multi = "accelerate launch --multi_gpu --num_processes 2 -m elfctl train --preset tiny --cpu"
    assert multi in text
    assert "accelerate launch --num_processes 2 -m" not in text


def test_mixed_precision_help_offers_what_the_flag_accepts():
    assert "--mixed-precision <str> no or bf16" in rendered_help("train")


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_sample_and_eval_name_the_encoder_beside_the_tokenizer(command):
    text = rendered_help(command)
    assert "--tokenizer <str>" in text and "--encoder <str>" in text


def test_eval_help_says_which_config_it_evaluates_with():
    text = rendered_help("eval")
    own = "with neither, a run dir (or a checkpoint of ours) is evaluated with the config.yaml"
    assert own in text
    assert "testbed:grammar/scorer" in text


@pytest.mark.parametrize("command", COMMANDS)
def test_square_brackets_in_a_commands_help_are_shown_as_written(command):
    """`distill.spans[k-1]` or `elfctl[plot]` must not vanish as rich markup."""
    info = next(
        c
        for c in app.registered_commands
        if (c.name or c.callback.__name__.replace("_", "-")) == command
    )
    written = " ".join(filter(None, [info.help, info.epilog])).replace("\\[", "[")
    text = rendered_help(command)
    for token in re.findall(r"\[[^\]\s]+\]", written):
        assert token in text, f"{token} is missing from `elfctl {command} --help`"
