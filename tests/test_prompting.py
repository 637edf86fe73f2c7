"""Prompting and infilling: templates, the known-token layout, the hold rule, exact outputs."""

from __future__ import annotations

import pytest
import torch

from elfctl.data import collate
from elfctl.errors import UserError
from elfctl.model import ELF, encoder_pair_mask
from elfctl.sampling import (
    KnownTokens,
    SamplerSettings,
    check_fits,
    generate,
    known_tokens,
    lay_out,
    parse_prompt,
    parse_template,
    read_prompts,
    sample_latents,
)
from tests.conftest import randomize_, tiny_model_config


@pytest.fixture(scope="module")
def grammar_assets():
    from elfctl.model import FrozenEncoder, load_tokenizer
    from elfctl.testbed.assets import ensure_assets

    paths = ensure_assets("grammar")
    encoder = FrozenEncoder.from_pretrained(paths["encoder"], latent_mean=0.1, latent_std=0.5)
    return load_tokenizer(paths["tokenizer"]), encoder


def grammar_model(tokenizer, seed=0):
    torch.manual_seed(seed)
    cfg = tiny_model_config(vocab_size=len(tokenizer), latent_dim=64)
    return randomize_(ELF(cfg), seed=seed, std=0.15).eval()


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------
# Templates and layouts


def test_a_template_puts_known_tokens_around_gaps_of_the_given_length(word_tokenizer):
    layout = parse_template(word_tokenizer, "the dog [gap:3] the cat .")
    the, dog, cat, stop = (ids(word_tokenizer, w)[0] for w in ("the", "dog", "cat", "."))
    assert layout.ids == (the, dog, None, None, None, the, cat, stop)
    assert layout.span == 8 and layout.record() == {"template": "the dog [gap:3] the cat ."}
    both_ends = parse_template(word_tokenizer, "[gap:2] cat [gap:1]")
    assert both_ends.ids == (None, None, cat, None)


def test_a_prompt_is_a_prefix_layout(word_tokenizer):
    layout = parse_prompt(word_tokenizer, "the big dog")
    assert layout.ids == tuple(ids(word_tokenizer, "the big dog"))
    assert layout.record() == {"prompt": "the big dog"}


@pytest.mark.parametrize(
    "template, message",
    [
        ("the dog runs .", "has no gap"),
        ("the [gap:0] dog", "at least 1"),
        ("the [gap:x] dog", "at least 1"),
        ("[gap:3]", "no known tokens"),
    ],
)
def test_bad_templates_are_one_sentence_errors(word_tokenizer, template, message):
    with pytest.raises(UserError, match=message):
        parse_template(word_tokenizer, template)


def test_prompts_and_templates_longer_than_the_sequence_are_refused(word_tokenizer):
    check_fits([parse_prompt(word_tokenizer, "the big dog")], 3)  # exactly fits
    with pytest.raises(UserError, match="has 3 tokens but samples have only 2"):
        check_fits([parse_prompt(word_tokenizer, "the big dog")], 2)
    with pytest.raises(UserError, match="covers 12 tokens"):
        check_fits([parse_template(word_tokenizer, "the [gap:10] dog")], 8)


def test_lay_out_numbers_known_runs_and_starts_after_the_offset(word_tokenizer):
    layout = parse_template(word_tokenizer, "the dog [gap:2] cat")
    id_grid, known, segment = lay_out([layout, layout], 8, [0, 3], pad_id=0)
    assert known[0].tolist() == [1, 1, 0, 0, 1, 0, 0, 0]
    assert known[1].tolist() == [0, 0, 0, 1, 1, 0, 0, 1]
    assert segment[0].tolist() == [0, 0, -1, -1, 1, -1, -1, -1]
    assert id_grid[1, 3:5].tolist() == ids(word_tokenizer, "the dog")


def test_read_prompts_from_txt_and_jsonl(tmp_path):
    (tmp_path / "p.txt").write_text("the dog\n\n a cat \n")
    assert read_prompts(tmp_path / "p.txt") == ["the dog", "a cat"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "the dog"}\n{"prompt": "a cat"}\n')
    assert read_prompts(tmp_path / "p.jsonl") == ["the dog", "a cat"]
    (tmp_path / "bad.jsonl").write_text('{"text": "the dog"}\n')
    with pytest.raises(UserError, match="line 1.*'prompt'"):
        read_prompts(tmp_path / "bad.jsonl")
    with pytest.raises(UserError, match="not found"):
        read_prompts(tmp_path / "missing.txt")


# ---------------------------------------------------------------------------
# Clean latents of the known tokens


def test_a_prefix_prompt_is_encoded_as_the_prompt_alone(grammar_assets):
    tokenizer, encoder = grammar_assets
    layout = parse_prompt(tokenizer, "the big dog")
    got = known_tokens(encoder, tokenizer, [layout], 12)
    alone = encoder.encode(torch.tensor([ids(tokenizer, "the big dog")]))
    torch.testing.assert_close(got.latents[0, :3], alone[0], rtol=1e-5, atol=1e-5)
    assert (got.latents[0, 3:] == 0).all() and got.end.tolist() == [3]


def test_masked_encoding_sees_all_known_tokens_and_segments_see_only_their_own(grammar_assets):
    tokenizer, encoder = grammar_assets
    layout = parse_template(tokenizer, "the big dog [gap:2] every cat")
    masked = known_tokens(encoder, tokenizer, [layout], 10, encoding="masked")
    segments = known_tokens(encoder, tokenizer, [layout], 10, encoding="segments")
    # masked: the layout in one pass with the gap positions' keys switched off
    row = torch.tensor([ids(tokenizer, "the big dog") + [0, 0] + ids(tokenizer, "every cat")])
    keys = torch.tensor([[1, 1, 1, 0, 0, 1, 1]])
    full = encoder.encode(row, attention_mask_2d=keys)
    torch.testing.assert_close(masked.latents[0, :7], full[0] * keys[0, :, None].float())
    # segments: each run encoded as a text of its own (T5's position bias is relative)
    first = encoder.encode(torch.tensor([ids(tokenizer, "the big dog")]))[0]
    second = encoder.encode(torch.tensor([ids(tokenizer, "every cat")]))[0]
    torch.testing.assert_close(segments.latents[0, :3], first, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(segments.latents[0, 5:7], second, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(masked.latents[0, 5:7], second, atol=1e-3)


def test_conditional_known_tokens_are_encoded_as_training_encodes_a_target(grammar_assets):
    tokenizer, encoder = grammar_assets
    source, prompt = "the dog sees every cat .", "that bird"
    layout = parse_prompt(tokenizer, prompt)
    got = known_tokens(
        encoder, tokenizer, [layout], 12, sources=[source], max_input_length=7, pad_token="eos"
    )
    # training: condition + target in one row, per-pair mask (docs/method.md sections 1-2)
    row = {"condition_input_ids": ids(tokenizer, source), "input_ids": ids(tokenizer, prompt)}
    batch = collate([row], 12, 7, "eos", 0, 1)
    pair = encoder_pair_mask(batch["attention_mask"], batch["cond_seq_mask"])
    want = encoder.encode(batch["input_ids"], pair_mask=pair)
    cond_len = len(ids(tokenizer, source))
    torch.testing.assert_close(got.latents[0, cond_len : cond_len + 2], want[0, cond_len:][:2])
    assert got.mask[0].nonzero().flatten().tolist() == [cond_len, cond_len + 1]
    assert got.end.tolist() == [cond_len + 2]


# ---------------------------------------------------------------------------
# The hold rule inside the sampler


def make_known(B=2, S=6, C=16, hold="noised", seed=0):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, S, dtype=torch.bool)
    mask[:, :2] = True
    mask[1, 4] = True
    latents = torch.randn(B, S, C, generator=gen) * mask[..., None]
    return KnownTokens(
        ids=torch.full((B, S), 5) * mask,
        mask=mask,
        latents=latents,
        end=torch.tensor([2, 5]),
        hold=hold,
    )


class Spy(torch.nn.Module):
    """Records every network input (z and x_prev halves) and time."""

    def __init__(self, model):
        super().__init__()
        self.model, self.cfg, self.calls = model, model.cfg, []

    def forward(self, inputs, t, sc_scale=None, decode=False):
        self.calls.append((inputs.clone(), t.clone()))
        return self.model(inputs, t, sc_scale=sc_scale, decode=decode)


@pytest.mark.parametrize("method", ["ode", "sde"])
def test_noised_hold_keeps_known_positions_on_their_noising_path_at_every_step(method):
    torch.manual_seed(0)
    spy = Spy(randomize_(ELF(tiny_model_config()), std=0.15).eval())
    known, s = make_known(), 2.0
    noise = torch.randn(2, 6, 16)
    settings = SamplerSettings(steps=5, method=method, gamma=1.5, sc_cfg=2.0, noise_scale=s)
    z = sample_latents(spy, settings, noise, torch.Generator().manual_seed(1), known=known)
    m = known.mask
    assert len(spy.calls) == 5
    for step, (inputs, t) in enumerate(spy.calls):
        z_in, x_prev = inputs[..., :16], inputs[..., 16:]
        path = t[0] * known.latents + (1 - t[0]) * s * noise
        torch.testing.assert_close(z_in[m], path[m])  # z = t x + (1 - t) s eps
        torch.testing.assert_close(x_prev[m], known.latents[m])  # x_hat there = x
        if step > 0:  # the other positions move with the model (at t = 0 all are noise)
            assert not torch.allclose(z_in[~m], path[~m])
    torch.testing.assert_close(z[m], known.latents[m])  # t = 1: the clean latent


def test_clean_hold_keeps_known_positions_at_their_clean_latent():
    torch.manual_seed(0)
    spy = Spy(randomize_(ELF(tiny_model_config()), std=0.15).eval())
    known = make_known(hold="clean")
    settings = SamplerSettings(steps=4, method="sde", gamma=1.5, sc_cfg=2.0)
    sample_latents(spy, settings, torch.randn(2, 6, 16), torch.Generator(), known=known)
    for inputs, _ in spy.calls:
        torch.testing.assert_close(inputs[..., :16][known.mask], known.latents[known.mask])
        torch.testing.assert_close(inputs[..., 16:][known.mask], known.latents[known.mask])


def test_the_step_loop_with_known_tokens_never_reads_a_tensor_back(monkeypatch):
    model = randomize_(ELF(tiny_model_config()), std=0.15).eval()
    known = make_known()
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, lambda *a, _n=name, **k: pytest.fail(_n))
    settings = SamplerSettings(steps=3, method="sde", sc_cfg=2.0)
    with torch.no_grad():
        z = sample_latents(model, settings, torch.randn(2, 6, 16), torch.Generator(), None, known)
    monkeypatch.undo()
    assert torch.isfinite(z).all()


def test_finish_writes_known_tokens_back_and_an_eos_in_a_gap_does_not_end_the_text():
    eos, pad = 1, 0
    known = KnownTokens(
        ids=torch.tensor([[7, 8, 0, 0, 9, 0, 0]]),
        mask=torch.tensor([[1, 1, 0, 0, 1, 0, 0]], dtype=torch.bool),
        latents=torch.zeros(1, 7, 4),
        end=torch.tensor([5]),
    )
    decoded = torch.tensor([[3, 3, 1, 4, 3, 5, 1]])
    assert known.finish(decoded, eos, pad).tolist() == [[7, 8, 0, 4, 9, 5, 0]]
    decoded = torch.tensor([[3, 3, 4, 4, 3, 1, 6]])
    assert known.finish(decoded, eos, pad).tolist() == [[7, 8, 4, 4, 9, 0, 0]]


# ---------------------------------------------------------------------------
# generate(..., prompt=..., infill=...)


@pytest.mark.parametrize("hold", ["noised", "clean"])
def test_every_prompted_output_starts_with_the_prompt_tokens_exactly(grammar_assets, hold):
    tokenizer, encoder = grammar_assets
    model = grammar_model(tokenizer)
    prompts = ["the big dog", "every cat"]
    out = generate(
        model,
        tokenizer,
        steps=4,
        num_samples=5,
        batch_size=2,
        length=10,
        prompt=prompts,
        encoder=encoder,
        hold=hold,
    )
    for i, (tokens, text) in enumerate(zip(out.tokens, out.texts, strict=True)):
        want = ids(tokenizer, prompts[i % 2])
        assert tokens[: len(want)] == want
        assert text.startswith(prompts[i % 2])


@pytest.mark.parametrize("encoding", ["masked", "segments"])
def test_every_infilled_output_has_the_known_tokens_at_their_positions(grammar_assets, encoding):
    tokenizer, encoder = grammar_assets
    model = grammar_model(tokenizer, seed=1)
    template = "the [gap:2] dog [gap:3] cat ."
    layout = parse_template(tokenizer, template)
    out = generate(
        model,
        tokenizer,
        steps=4,
        num_samples=4,
        length=12,
        infill=template,
        encoder=encoder,
        known_encoding=encoding,
    )
    for tokens in out.tokens:
        assert len(tokens) >= layout.span
        for p, known in enumerate(layout.ids):
            if known is not None:
                assert tokens[p] == known


def test_prompting_a_sample_run_is_deterministic_and_differs_from_unprompted(grammar_assets):
    tokenizer, encoder = grammar_assets
    model = grammar_model(tokenizer)
    common = dict(steps=3, num_samples=3, length=8, seed=4)
    a = generate(model, tokenizer, prompt="the dog", encoder=encoder, **common)
    b = generate(model, tokenizer, prompt="the dog", encoder=encoder, **common)
    free = generate(model, tokenizer, **common)
    assert a.tokens == b.tokens and a.tokens != free.tokens


def test_generate_refuses_prompts_it_cannot_honour(grammar_assets):
    tokenizer, encoder = grammar_assets
    model = grammar_model(tokenizer)
    with pytest.raises(ValueError, match="encoder"):
        generate(model, tokenizer, steps=2, num_samples=1, length=8, prompt="the dog")
    with pytest.raises(UserError, match="has 3 tokens but samples have only 2"):
        generate(
            model,
            tokenizer,
            steps=2,
            num_samples=1,
            length=2,
            prompt="the big dog",
            encoder=encoder,
        )
