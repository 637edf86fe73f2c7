"""The frozen encoder, its per-pair mask, and latent normalisation (docs/method.md sections 1-2).

A small random T5 encoder is saved to a temp folder and loaded back with the same
`from_pretrained(path)` call that loads hub ids. Every encoder test runs on both
attention backends: eager adds a 4-D mask to the scores, SDPA reads a bool one,
and a bool mask sent to eager would be silently wrong.
"""

from __future__ import annotations

import pytest
import torch

from elfctl.config import EncoderConfig
from elfctl.errors import UserError
from elfctl.model import (
    FrozenEncoder,
    encoder_pair_mask,
    load_encoder,
    load_tokenizer,
    pair_masks_unsupported,
    t5_attention_mask,
)
from tests.conftest import build_word_tokenizer

VOCAB = 24
BACKENDS = ["sdpa", "eager"]
needs_pair_masks = pytest.mark.skipif(
    pair_masks_unsupported(), reason="transformers < 5 takes no per-pair T5 mask"
)


def grid(*rows: str) -> list[list[bool]]:
    """["110", "011"] -> [[True, True, False], [False, True, True]]."""
    return [[c == "1" for c in row] for row in rows]


def masks(lengths: list[tuple[int, int]], seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond_len, total_len) per row -> attention_mask, cond_seq_mask (B, S) bool."""
    positions = torch.arange(seq)
    cond = torch.tensor([c for c, _ in lengths])
    total = torch.tensor([t for _, t in lengths])
    return positions < total[:, None], positions < cond[:, None]


# ---------------------------------------------------------------------------
# The pair mask, by hand


def test_pair_mask_matches_hand_built_mask_with_label_drop():
    # rows: conditional (cond 2, total 4), the same with label drop, unconditional (total 3)
    attention_mask, cond_seq_mask = masks([(2, 4), (2, 4), (0, 3)], seq=5)
    drop = torch.tensor([False, True, False])
    expected = torch.tensor(
        [
            # condition queries see the condition; target and padding queries see all valid
            grid("11000", "11000", "11110", "11110", "11110"),
            # label drop: target and padding queries no longer see the condition
            grid("11000", "11000", "00110", "00110", "00110"),
            # no condition: the padding mask, for every query (padding queries included)
            grid("11100", "11100", "11100", "11100", "11100"),
        ]
    )
    assert torch.equal(encoder_pair_mask(attention_mask, cond_seq_mask, drop), expected)
    no_drop = expected.clone()
    no_drop[1] = expected[0]
    assert torch.equal(encoder_pair_mask(attention_mask, cond_seq_mask), no_drop)


def test_pair_mask_gives_a_query_without_keys_itself():
    # an empty row, and a dropped row whose target is empty (condition 2, nothing after it)
    attention_mask, cond_seq_mask = masks([(0, 0), (2, 2)], seq=4)
    drop = torch.tensor([False, True])
    expected = torch.tensor(
        [
            grid("1000", "0100", "0010", "0001"),
            grid("1100", "1100", "0010", "0001"),
        ]
    )
    assert torch.equal(encoder_pair_mask(attention_mask, cond_seq_mask, drop), expected)


def test_t5_mask_is_bool_for_sdpa_and_additive_for_eager():
    pair = torch.tensor([grid("10", "11")])
    assert torch.equal(t5_attention_mask(pair, "sdpa", torch.float32), pair[:, None])
    additive = t5_attention_mask(pair, "eager", torch.float32)
    minimum = torch.finfo(torch.float32).min
    assert additive.shape == (1, 1, 2, 2)
    assert torch.equal(additive, torch.tensor([[[[0.0, minimum], [0.0, 0.0]]]]))


# ---------------------------------------------------------------------------
# A real (tiny, random) T5 encoder loaded from a folder


@pytest.fixture(scope="module")
def encoder_folder(tmp_path_factory):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=VOCAB,
        d_model=16,
        d_kv=4,
        d_ff=32,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        is_encoder_decoder=False,
        use_cache=False,
    )
    folder = tmp_path_factory.mktemp("t5_encoder")
    T5EncoderModel(config).save_pretrained(str(folder))
    return str(folder)


def load(folder: str, backend: str, mean: float = 0.0, std: float = 1.0) -> FrozenEncoder:
    from transformers import T5EncoderModel

    if backend == "sdpa" and not T5EncoderModel._supports_sdpa:
        pytest.skip("this transformers version's T5 has no SDPA attention")
    encoder = FrozenEncoder.from_pretrained(folder, mean, std, attn_implementation=backend)
    assert encoder.t5.config._attn_implementation == backend
    return encoder


def random_ids(batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@needs_pair_masks
@pytest.mark.parametrize("backend", BACKENDS)
def test_pair_mask_path_equals_padding_mask_path_for_plain_padding(encoder_folder, backend):
    encoder = load(encoder_folder, backend)
    input_ids = random_ids(3, 7, seed=1)
    attention_mask, cond_seq_mask = masks([(0, 7), (0, 4), (0, 1)], seq=7)
    with_padding_mask = encoder.encode(input_ids, attention_mask_2d=attention_mask)
    pair = encoder_pair_mask(attention_mask, cond_seq_mask)
    with_pair_mask = encoder.encode(input_ids, pair_mask=pair)
    torch.testing.assert_close(with_pair_mask, with_padding_mask, rtol=0, atol=1e-6)
    # the padding really is masked: changing padded tokens leaves valid latents alone
    changed = input_ids.clone()
    changed[1, 4:] = 3
    again = encoder.encode(changed, pair_mask=pair)
    torch.testing.assert_close(again[1, :4], with_pair_mask[1, :4], rtol=0, atol=1e-6)


@needs_pair_masks
@pytest.mark.parametrize("backend", BACKENDS)
def test_condition_latents_ignore_the_target(encoder_folder, backend):
    encoder = load(encoder_folder, backend)
    input_ids = random_ids(2, 8, seed=2)
    attention_mask, cond_seq_mask = masks([(3, 7), (3, 7)], seq=8)
    pair = encoder_pair_mask(attention_mask, cond_seq_mask)
    x = encoder.encode(input_ids, pair_mask=pair)
    other_target = input_ids.clone()
    other_target[:, 3:7] = random_ids(2, 4, seed=3)
    assert not torch.equal(other_target, input_ids)
    x_other = encoder.encode(other_target, pair_mask=pair)
    torch.testing.assert_close(x_other[:, :3], x[:, :3], rtol=0, atol=1e-6)
    # ...while the target's latents do depend on the target
    assert (x_other[:, 3:7] - x[:, 3:7]).abs().max() > 1e-3


@needs_pair_masks
@pytest.mark.parametrize("backend", BACKENDS)
def test_label_drop_hides_the_condition_from_the_target(encoder_folder, backend):
    encoder = load(encoder_folder, backend)
    input_ids = random_ids(2, 8, seed=4)
    attention_mask, cond_seq_mask = masks([(3, 6), (3, 6)], seq=8)
    drop = torch.tensor([True, False])
    pair = encoder_pair_mask(attention_mask, cond_seq_mask, drop)
    x = encoder.encode(input_ids, pair_mask=pair)
    other_condition = input_ids.clone()
    other_condition[:, :3] = random_ids(2, 3, seed=5)
    x_other = encoder.encode(other_condition, pair_mask=pair)
    # dropped row: target and padding latents are those of the target alone
    torch.testing.assert_close(x_other[0, 3:], x[0, 3:], rtol=0, atol=1e-6)
    # kept row: the target sees the condition
    assert (x_other[1, 3:6] - x[1, 3:6]).abs().max() > 1e-3


@needs_pair_masks
@pytest.mark.parametrize("backend", BACKENDS)
def test_queries_without_keys_give_finite_latents(encoder_folder, backend):
    encoder = load(encoder_folder, backend)
    attention_mask, cond_seq_mask = masks([(0, 0), (2, 2)], seq=4)
    pair = encoder_pair_mask(attention_mask, cond_seq_mask, torch.tensor([False, True]))
    x = encoder.encode(random_ids(2, 4, seed=6), pair_mask=pair)
    assert torch.isfinite(x).all()


def test_latents_are_normalised_with_mean_and_std(encoder_folder):
    from transformers import T5EncoderModel

    encoder = FrozenEncoder.from_pretrained(encoder_folder, latent_mean=0.3, latent_std=0.5)
    raw = T5EncoderModel.from_pretrained(encoder_folder).eval()
    input_ids = random_ids(2, 5, seed=7)
    attention_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        hidden = raw(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    x = encoder.encode(input_ids, attention_mask_2d=attention_mask)
    torch.testing.assert_close(x, (hidden - 0.3) / 0.5, rtol=0, atol=1e-6)


def test_encoder_is_frozen_and_stays_in_eval_mode(encoder_folder):
    encoder = load_encoder(
        EncoderConfig(encoder=encoder_folder, latent_mean=0.0, latent_std=0.2), "cpu"
    )
    assert encoder.width == 16
    assert encoder.latent_std == 0.2
    assert all(not p.requires_grad for p in encoder.parameters())
    assert all(p.dtype == torch.float32 for p in encoder.parameters())
    parent = torch.nn.Sequential(encoder).train()
    assert parent.training and not encoder.training and not encoder.t5.training
    x = encoder.encode(random_ids(1, 4, seed=8))
    assert x.shape == (1, 4, 16) and not x.requires_grad


# ---------------------------------------------------------------------------
# Loading errors and the tokenizer


def test_tokenizer_loads_from_a_folder_with_its_full_vocabulary(tmp_path):
    build_word_tokenizer(tmp_path / "tok", words=["alpha", "beta"])
    tokenizer = load_tokenizer(str(tmp_path / "tok"))
    assert len(tokenizer) == 5
    assert tokenizer("alpha beta", add_special_tokens=False)["input_ids"] == [3, 4]


@pytest.mark.parametrize("loader", ["tokenizer", "encoder"])
def test_missing_or_empty_folders_are_user_errors(tmp_path, loader):
    def call(path: str):
        if loader == "tokenizer":
            return load_tokenizer(path)
        return FrozenEncoder.from_pretrained(path)

    with pytest.raises(UserError, match="the folder .* does not exist"):
        call(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=f"Could not load {loader}"):
        call(str(tmp_path / "empty"))
