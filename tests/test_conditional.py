"""Conditional tasks end to end: presets, masks, encoding sources, `elfctl sample --input`.

The sampler-level guarantees (condition positions never change, the unconditional
branch sees zeros, CFG in one batched forward equals two forwards) are pinned in
tests/test_sampler.py; here the same properties are checked through the whole
`elfctl sample --input` path, with the real (tiny, random) T5 encoder and a model
trained for two steps on the `tiny-translate` preset.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from elfctl.cli import app
from elfctl.config import resolve
from elfctl.data import collate, read_condition_inputs, read_condition_rows
from elfctl.errors import UserError
from elfctl.model import ELF, encoder_pair_mask, save_model_checkpoint
from elfctl.runs import load_for_sampling
from elfctl.sampling import (
    condition_batch,
    count_truncated,
    encode_conditions,
    mask_after_eos,
    sample_key,
)
from tests.conftest import randomize_
from tests.test_sampler import slow_sample

runner = CliRunner()


def grid(*rows: str) -> list[list[bool]]:
    return [[c == "1" for c in row] for row in rows]


def bits(*rows: str) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in row] for row in rows])


# ---------------------------------------------------------------------------
# Presets (issue item 1, and the offline tiny-translate)


@pytest.mark.parametrize(
    "name, max_length, max_input_length, data",
    [
        ("xsum-b", 1088, 1024, "embedded-language-flows/xsum_{}_t5"),
        ("de-en-b", 128, 64, "embedded-language-flows/wmt14_de-en_{}_t5"),
    ],
)
def test_official_conditional_presets_hold_the_papers_settings(
    name, max_length, max_input_length, data
):
    cfg = resolve(name)
    assert cfg.data.train == data.format("train")
    assert cfg.data.validation == data.format("validation")
    assert cfg.data.conditional and cfg.data.pad_token == "eos"
    assert (cfg.data.max_length, cfg.data.max_input_length) == (max_length, max_input_length)
    assert cfg.objective.label_drop_prob == 0.1 and cfg.objective.decoder_noise_scale == 1.0
    assert cfg.optim.warmup_steps == 5000
    official = cfg.sampling[0]
    assert (official.method, official.steps, official.cfg, official.sc_cfg) == ("ode", 64, 2, 1)
    assert official.time_schedule == "logit_normal"


def test_tiny_translate_preset_matches_the_test_bed():
    from elfctl.testbed.assets import latent_stats, vocabulary

    cfg = resolve("tiny-translate")
    assert cfg.model.vocab_size == len(vocabulary())
    mean, std = latent_stats("translate")
    assert cfg.encoder.latent_mean == pytest.approx(mean, abs=0.005)
    assert cfg.encoder.latent_std == pytest.approx(std, abs=0.005)
    assert cfg.data.conditional and cfg.data.pad_token == "eos"
    assert (cfg.data.max_length, cfg.data.max_input_length) == (32, 16)
    assert cfg.objective.label_drop_prob == 0.1 and cfg.objective.decoder_noise_scale == 1.0
    settings = {s.name: (s.method, s.steps, s.cfg, s.sc_cfg) for s in cfg.sampling}
    assert cfg.sampling[0].name == "ode-cfg2"
    assert settings == {"ode-cfg2": ("ode", 64, 2.0, 1.0), "ode-cfg1": ("ode", 64, 1.0, 1.0)}


# ---------------------------------------------------------------------------
# Masks for mixed batches, by hand


def test_training_masks_for_a_mixed_eos_padded_batch_with_label_drop():
    rows = [
        {"condition_input_ids": [11, 12], "input_ids": [21, 22, 23]},  # cond 2, total 5
        {"condition_input_ids": [11, 12, 13, 14, 15], "input_ids": [21]},  # cond cut to 3
        {"condition_input_ids": [11], "input_ids": [21, 22]},  # the same shape, label drop
    ]
    batch = collate(rows, max_length=6, max_input_length=3, pad_token="eos", pad_id=0, eos_id=1)
    assert batch["input_ids"].tolist() == [
        [11, 12, 21, 22, 23, 1],
        [11, 12, 13, 21, 1, 1],
        [11, 21, 22, 1, 1, 1],
    ]
    assert torch.equal(batch["attention_mask"], bits("111110", "111100", "111000"))
    assert torch.equal(batch["cond_seq_mask"], bits("110000", "111000", "100000"))
    assert torch.equal(batch["loss_mask"], bits("001111", "000111", "011111"))
    drop = torch.tensor([False, False, True])
    pair = encoder_pair_mask(batch["attention_mask"], batch["cond_seq_mask"], drop)
    expected = torch.tensor(
        [
            grid("110000", "110000", "111110", "111110", "111110", "111110"),
            grid("111000", "111000", "111000", "111100", "111100", "111100"),
            # label drop: the condition sees itself, everything else only the target
            grid("100000", "011000", "011000", "011000", "011000", "011000"),
        ]
    )
    assert torch.equal(pair, expected)


def test_sampling_layout_is_the_training_layout_with_an_empty_target(word_tokenizer):
    # build_word_tokenizer ids: the 3, a 4, cat 5, dog 6, bird 7, sees 8, chases 9, . 15
    sources = ["the cat sees a dog .", "a bird", "the dog chases the cat and the bird ."]
    batch = condition_batch(word_tokenizer, sources, max_length=8, max_input_length=5)
    assert batch["input_ids"].tolist() == [
        [3, 5, 8, 4, 6, 1, 1, 1],  # cut to 5: the trailing "." is lost
        [4, 7, 1, 1, 1, 1, 1, 1],
        [3, 6, 9, 3, 5, 1, 1, 1],
    ]
    assert torch.equal(batch["cond_seq_mask"], bits("11111000", "11000000", "11111000"))
    assert torch.equal(batch["attention_mask"], batch["cond_seq_mask"])
    assert batch["cond_len"].tolist() == [5, 2, 5]
    assert batch["condition_truncated"].tolist() == [True, False, True]
    assert count_truncated(word_tokenizer, sources, 5) == 2
    pair = encoder_pair_mask(batch["attention_mask"], batch["cond_seq_mask"])
    # condition queries see exactly their condition; padding queries see it too
    assert torch.equal(pair[1], torch.tensor(grid(*["11000000"] * 8)))


# ---------------------------------------------------------------------------
# Encoding conditions with a real tiny T5


@pytest.fixture(scope="module")
def translate_assets():
    from elfctl.model import FrozenEncoder, load_tokenizer
    from elfctl.testbed.assets import ensure_assets

    paths = ensure_assets("translate")
    encoder = FrozenEncoder.from_pretrained(paths["encoder"], latent_mean=0.1, latent_std=0.5)
    return load_tokenizer(paths["tokenizer"]), encoder, paths


def test_condition_latents_are_the_source_encoded_alone(translate_assets):
    tokenizer, encoder, _ = translate_assets
    sources = ["the big dog chases this cat quickly .", "every fox sleeps .", "that bird runs ."]
    long_source = " ".join(["the old dog sees the cat ."] * 3)  # 21 tokens, cut to 16
    condition, cut = encode_conditions(encoder, tokenizer, sources + [long_source], 32, 16)
    assert cut == 1
    assert condition.latents.shape == (4, 32, 64) and condition.max_input_length == 16
    for i, source in enumerate(sources + [long_source]):
        ids = tokenizer(source, add_special_tokens=False)["input_ids"][:16]
        alone = encoder.encode(torch.tensor([ids]))[0]  # no mask: nothing else to see
        assert condition.lengths[i] == len(ids)
        assert condition.mask[i].tolist() == [p < len(ids) for p in range(32)]
        torch.testing.assert_close(condition.latents[i, : len(ids)], alone, atol=1e-5, rtol=1e-5)
        assert torch.count_nonzero(condition.latents[i, len(ids) :]) == 0


# ---------------------------------------------------------------------------
# Reading sources


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_jsonl_sources_keep_order_and_optional_references(tmp_path):
    file = write_jsonl(
        tmp_path / "s.jsonl",
        [{"src": "a", "ref": "x"}, {"src": "b"}, {"src": "c", "ref": None}, {"src": "d"}],
    )
    sources, references = read_condition_inputs(str(file), "src", "ref")
    assert sources == ["a", "b", "c", "d"] and references == ["x", None, None, None]
    assert read_condition_inputs(str(file), "src", "ref", limit=2) == (["a", "b"], ["x", None])


@pytest.mark.parametrize(
    "line, complaint",
    [
        ("{not json", "line 2: not valid JSON"),
        ('["a"]', "line 2: expected a JSON object"),
        ('{"other": "a"}', "line 2: missing the source field 'input'"),
        ('{"input": 3}', "line 2: field 'input' must be a string"),
        ('{"input": "a", "target": 4}', "line 2: field 'target' must be a string or null"),
    ],
)
def test_malformed_jsonl_sources_name_file_and_line(tmp_path, line, complaint):
    file = tmp_path / "bad.jsonl"
    file.write_text('{"input": "fine"}\n' + line + "\n")
    with pytest.raises(UserError, match=f"bad.jsonl, {complaint}"):
        read_condition_inputs(str(file))


def test_text_file_gives_one_source_per_line_without_references(tmp_path):
    file = tmp_path / "s.txt"
    file.write_text("first source\n\n  second source  \nthird\n")
    assert read_condition_inputs(str(file)) == (
        ["first source", "second source", "third"],
        [None] * 3,
    )


def test_save_to_disk_folder_picks_the_validation_split_or_the_named_one(tmp_path):
    from datasets import Dataset, DatasetDict

    def split(prefix):
        return Dataset.from_dict({"input": [f"{prefix}{i}" for i in range(3)], "target": ["r"] * 3})

    DatasetDict({"train": split("t"), "validation": split("v")}).save_to_disk(tmp_path / "dd")
    assert read_condition_inputs(str(tmp_path / "dd"))[0] == ["v0", "v1", "v2"]
    assert read_condition_inputs(str(tmp_path / "dd"), split="train", limit=2) == (
        ["t0", "t1"],
        ["r", "r"],
    )
    with pytest.raises(UserError, match="no split 'test'"):
        read_condition_inputs(str(tmp_path / "dd"), split="test")
    with pytest.raises(UserError, match="no source column 'text'"):
        read_condition_inputs(str(tmp_path / "dd"), source_field="text")


def test_a_folder_of_data_files_loads_through_load_dataset(tmp_path):
    # `load_dataset` reads a folder of data files like a hub repository: the hub code path.
    folder = tmp_path / "repo"
    folder.mkdir()
    write_jsonl(folder / "test.jsonl", [{"input": "x", "target": "y"}, {"input": "z"}])
    assert read_condition_inputs(str(folder)) == (["x", "z"], ["y", None])


def test_the_test_bed_validation_set_reads_with_its_references():
    from elfctl.testbed.translate import translate

    sources, references = read_condition_inputs("testbed:translate/validation", limit=4)
    assert len(sources) == 4 and references == [translate(s) for s in sources]


def test_missing_and_unsupported_inputs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_condition_inputs(str(tmp_path / "nothing.jsonl"))
    (tmp_path / "s.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="Unsupported --input file"):
        read_condition_inputs(str(tmp_path / "s.csv"))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(UserError, match="holds no sources"):
        read_condition_inputs(str(tmp_path / "empty.txt"))


# ---------------------------------------------------------------------------
# `elfctl sample --input` on a tiny-translate model


SMALL = [
    "model.hidden_size=32",
    "model.depth=2",
    "model.num_heads=2",
    "model.bottleneck=16",
    "train.global_batch=8",
    "train.log_every=1",
    "optim.warmup_steps=1",
]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """tiny-translate (made smaller) trained for two steps by the ordinary trainer."""
    from elfctl.training import make_accelerator, train

    run = tmp_path_factory.mktemp("tiny-translate")
    result = train(
        resolve("tiny-translate", sets=SMALL + ["train.max_steps=2"]),
        run,
        accelerator=make_accelerator(cpu=True),
    )
    assert result.step == 2 and result.last_record["loss"] > 0
    return run


@pytest.fixture(scope="module")
def random_run(trained_run, tmp_path_factory):
    """The same config with random weights everywhere, so no zero-initialised head hides a bug."""
    loaded = load_for_sampling(str(trained_run))
    model = randomize_(ELF(loaded.config.model), seed=3, std=0.15)
    folder = tmp_path_factory.mktemp("random") / "step_00000001"
    return save_model_checkpoint(folder, model.state_dict(), loaded.config, step=1)


SOURCES = [
    {
        "input": "the big dog chases this cat quickly .",
        "target": "lo kanu grano ita mipo rapi kasa .",
    },
    {"input": "every fox sleeps .", "target": "oku rena dormi ."},
    {"input": "that bird runs near the old child .", "target": "eso avi lo bimo veku ape kuri ."},
    {"input": " ".join(["the cat sees the dog ."] * 3), "target": "lo mipo lo kanu vida ."},
]


def sample(*args):
    return runner.invoke(app, ["sample", *map(str, args)])


def test_sample_input_writes_rows_that_score_bleu_reads(trained_run, tmp_path):
    file = write_jsonl(tmp_path / "sources.jsonl", SOURCES)
    out = tmp_path / "out"
    result = sample("--repo", trained_run, "--input", file, "--steps", 3, "--out", out)
    assert result.exit_code == 0, result.output
    assert "1 of 4 sources are longer than max_input_length (16 tokens)" in result.output
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2, 3]
    assert [r["condition"] for r in rows] == [s["input"] for s in SOURCES]
    assert [r["reference"] for r in rows] == [s["target"] for s in SOURCES]
    assert all(len(r["tokens"]) <= 32 - 16 for r in rows)
    info = json.loads((out / "run.json").read_text())
    assert info["sampler"]["setting"] == "ode-cfg2" and info["sampler"]["cfg"] == 2.0
    assert info["conditioning"] == {
        "max_length": 32,
        "max_input_length": 16,
        "output_length": 16,
        "truncated_sources": 1,
        "condition_ids": "tokenized",  # a JSONL file has only text
        "condition_ids_from_dataset": 0,
        "condition_ids_tokenized": 4,
    }
    scored = runner.invoke(app, ["score-bleu", str(out), "--json"])
    assert scored.exit_code == 0, scored.output
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["metric"] == "bleu" and metrics[-1]["n"] == 4

    limited = sample(
        "--repo", trained_run, "--input", file, "--steps", 2, "--num-samples", 2, "--out",
        tmp_path / "two", "--setting", "ode-cfg1",
    )  # fmt: skip
    assert limited.exit_code == 0, limited.output
    two = (tmp_path / "two" / "samples.jsonl").read_text().splitlines()
    assert [json.loads(line)["condition"] for line in two] == [s["input"] for s in SOURCES[:2]]


class ForwardSpy:
    """Records the inputs of every ELF forward, wherever the model lives (global hook)."""

    def __enter__(self):
        self.inputs: list[torch.Tensor] = []

        def spy(module, args):
            if isinstance(module, ELF):
                self.inputs.append(args[0].detach().clone())

        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(spy)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_sampling_keeps_the_encoded_condition_and_batches_cfg_in_one_forward(random_run, tmp_path):
    file = write_jsonl(tmp_path / "sources.jsonl", SOURCES[:3])
    steps = 4
    with ForwardSpy() as spy:
        result = sample(
            "--repo", random_run, "--input", file, "--steps", steps, "--sampler", "sde",
            "--gamma", 1.0, "--cfg", 2.0, "--out", tmp_path / "o",
        )  # fmt: skip
    assert result.exit_code == 0, result.output
    # One forward per step over both CFG branches (2B rows), then one decode (B rows).
    assert [x.shape[0] for x in spy.inputs] == [6] * steps + [3]

    loaded = load_for_sampling(str(random_run), with_encoder=True)
    sources = [s["input"] for s in SOURCES[:3]]
    condition, _ = encode_conditions(loaded.encoder, loaded.tokenizer, sources, 32, 16)
    m, C = condition.mask, 64
    for inputs in spy.inputs[:steps]:
        cond_rows, uncond_rows = inputs[:3], inputs[3:]
        torch.testing.assert_close(cond_rows[..., :C][m], condition.latents[m])  # z
        torch.testing.assert_close(cond_rows[..., C:][m], condition.latents[m])  # x_prev
        assert torch.count_nonzero(uncond_rows[m]) == 0  # the label-dropped branch
        # Off the condition, both branches see the same noisy sequence.
        torch.testing.assert_close(cond_rows[..., :C][~m], uncond_rows[..., :C][~m])


def test_cli_outputs_equal_two_separate_forwards_per_step(random_run, tmp_path):
    """The CLI's tokens equal a slow loop with the conditional and unconditional forwards
    run one after the other, from the same noise and time grid."""
    file = write_jsonl(tmp_path / "sources.jsonl", SOURCES[:3])
    steps, g = 5, 2.0
    args = ["--repo", random_run, "--input", file, "--steps", steps, "--cfg", g, "--seed", 4]
    result = sample(*args, "--precision", "fp32", "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    rows = [
        json.loads(line) for line in (tmp_path / "o" / "samples.jsonl").read_text().splitlines()
    ]

    loaded = load_for_sampling(str(random_run), with_encoder=True)
    model, S, C = loaded.model, 32, 64
    sources = [s["input"] for s in SOURCES[:3]]
    condition, _ = encode_conditions(loaded.encoder, loaded.tokenizer, sources, S, 16)
    # Each sample's own stream, keyed by (seed 4, its id): its noise, then its grid.
    z = []
    for i in range(3):
        gen = torch.Generator().manual_seed(sample_key(4, i))
        eps = torch.randn(1, S, C, generator=gen)
        inner = torch.sigmoid(torch.randn(steps - 1, generator=gen) * 0.8 - 1.5).sort().values
        time_grid = torch.cat([torch.zeros(1), inner, torch.ones(1)])
        with torch.no_grad():
            z.append(slow_sample(
                model, eps, steps, "ode", 0.0, 1.0, 2.0, time_grid, None,
                cond=(condition.latents[i : i + 1], condition.mask[i : i + 1]), g=g,
            ))  # fmt: skip
    z = torch.cat(z)
    with torch.no_grad():
        _, logits = model(
            torch.cat([z, torch.zeros_like(z)], -1), torch.ones(3), sc_scale=1.0, decode=True
        )
    tokens = logits.argmax(-1)
    for i, row in enumerate(rows):
        n = int(condition.lengths[i])
        target = mask_after_eos(tokens[i, n : n + 16][None], eos_id=1, pad_id=0)[0].tolist()
        while target and target[-1] == 0:
            target.pop()
        assert row["tokens"] == target


def test_sample_input_refusals_are_one_sentence(trained_run, tmp_path):
    file = write_jsonl(tmp_path / "sources.jsonl", SOURCES[:1])
    with_length = sample("--repo", trained_run, "--input", file, "--length", 8)
    assert with_length.exit_code == 2 and "--length does not apply" in with_length.output
    # A model described as unconditional (an official checkpoint without a preset).
    loaded = load_for_sampling(str(trained_run))
    loaded.config.data.conditional = False
    plain = save_model_checkpoint(
        tmp_path / "plain" / "step_00000002", loaded.model.state_dict(), loaded.config, 2
    )
    refused = sample("--repo", plain, "--input", file, "--out", tmp_path / "x")
    assert refused.exit_code == 2 and "not described as a conditional model" in refused.output
    assert "Traceback" not in refused.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a"}\n{"target": "b"}\n')
    missing = sample("--repo", trained_run, "--input", bad, "--out", tmp_path / "y")
    assert missing.exit_code == 2 and "bad.jsonl, line 2" in missing.output


def test_unconditional_sampling_never_loads_the_encoder(trained_run):
    assert load_for_sampling(str(trained_run)).encoder is None
    assert load_for_sampling(str(trained_run), with_encoder=True).encoder is not None


# ---------------------------------------------------------------------------
# A dataset's own condition ids (the official *_validation_t5 sets carry them)

# Stored ids that re-tokenizing the text would NOT give back: another sentence's ids.
STORED = ["every fox sleeps .", "the old child runs .", "that bird sees every cat ."]


def save_sources(folder, tokenizer, with_ids: bool):
    from datasets import Dataset

    columns = {
        "input": [s["input"] for s in SOURCES[:3]],
        "target": [s["target"] for s in SOURCES[:3]],
    }
    if with_ids:
        columns["condition_input_ids"] = [
            tokenizer(text, add_special_tokens=False)["input_ids"] for text in STORED
        ]
    Dataset.from_dict(columns).save_to_disk(str(folder))
    return folder


def test_dataset_condition_ids_are_read_as_they_are(word_tokenizer, tmp_path):
    from datasets import Dataset

    Dataset.from_dict(
        {"input": ["the cat", "a dog"], "target": ["x", "y"], "condition_input_ids": [[7], [9, 3]]}
    ).save_to_disk(str(tmp_path / "ids"))
    rows = read_condition_rows(str(tmp_path / "ids"))
    assert rows.texts == ["the cat", "a dog"] and rows.token_ids == [[7], [9, 3]]
    # The stored ids, not the text, fill the condition positions.
    batch = condition_batch(word_tokenizer, rows.texts, 4, 2, token_ids=rows.token_ids)
    assert batch["input_ids"].tolist() == [[7, 1, 1, 1], [9, 3, 1, 1]]
    text_only = condition_batch(word_tokenizer, rows.texts, 4, 2)
    assert text_only["input_ids"].tolist() == [[3, 5, 1, 1], [4, 6, 1, 1]]
    assert read_condition_rows(str(write_jsonl(tmp_path / "s.jsonl", SOURCES))).token_ids == [
        None
    ] * len(SOURCES)
    Dataset.from_dict({"input": ["a"], "condition_input_ids": [["x"]]}).save_to_disk(
        str(tmp_path / "bad")
    )
    with pytest.raises(UserError, match="'condition_input_ids' must be a list of token ids"):
        read_condition_rows(str(tmp_path / "bad"))
    with pytest.raises(UserError, match="outside the tokenizer's 18 entries"):
        condition_batch(word_tokenizer, ["the"], 4, 2, token_ids=[[3, 99]])


@pytest.mark.parametrize("with_ids", [True, False])
def test_sampling_a_dataset_conditions_on_its_own_ids_or_else_on_its_text(
    random_run, tmp_path, with_ids
):
    loaded = load_for_sampling(str(random_run), with_encoder=True)
    tok = loaded.tokenizer
    folder = save_sources(tmp_path / "set", tok, with_ids)
    texts = [s["input"] for s in SOURCES[:3]]
    stored = [tok(t, add_special_tokens=False)["input_ids"] for t in STORED]
    assert stored != [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    with ForwardSpy() as spy:
        result = sample(
            "--repo", random_run, "--input", folder, "--steps", 2, "--out", tmp_path / "o"
        )
    assert result.exit_code == 0, result.output

    expected, _ = encode_conditions(
        loaded.encoder, tok, texts, 32, 16, token_ids=stored if with_ids else None
    )
    other, _ = encode_conditions(
        loaded.encoder, tok, texts, 32, 16, token_ids=None if with_ids else stored
    )
    first = spy.inputs[0][:3, :, :64]  # z of the conditional branch at the first step
    torch.testing.assert_close(first[expected.mask], expected.latents[expected.mask])
    assert not torch.allclose(first[other.mask], other.latents[other.mask])

    rows = [
        json.loads(line) for line in (tmp_path / "o" / "samples.jsonl").read_text().splitlines()
    ]
    assert [r["condition"] for r in rows] == texts  # the text is still what rows show
    conditioning = json.loads((tmp_path / "o" / "run.json").read_text())["conditioning"]
    assert conditioning["condition_ids"] == ("dataset" if with_ids else "tokenized")
    assert conditioning["condition_ids_from_dataset"] == (3 if with_ids else 0)


def test_a_missing_input_is_reported_before_anything_is_loaded(tmp_path):
    # The checkpoint does not exist either: the input is checked first, so that is the error.
    result = sample("--repo", tmp_path / "no-run", "--input", tmp_path / "missing.jsonl")
    assert result.exit_code == 2
    assert "--input not found" in result.output and "missing.jsonl" in result.output
    assert "Traceback" not in result.output
