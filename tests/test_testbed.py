"""The offline test bed: the synthetic language, its translation task, measures and assets."""

from __future__ import annotations

import json
import math
import os
import random
from collections import Counter
from pathlib import Path

import pytest

from elfctl.errors import UserError
from elfctl.testbed import assets, grammar, quality, translate
from elfctl.testbed.grammar import accepts, generate_corpus, generate_sentence
from elfctl.testbed.translate import make_pairs, target_accepts

# --- the language --------------------------------------------------------------------------


def test_generated_sentences_are_always_accepted_across_many_seeds():
    for seed in range(40):
        rng = random.Random(seed)
        for _ in range(150):
            sentence = generate_sentence(rng)
            assert accepts(sentence), sentence
            assert sentence.endswith(" .") and 4 <= len(sentence.split()) <= 9


def test_generate_corpus_depends_only_on_the_seed():
    assert generate_corpus(50, seed=7) == generate_corpus(50, seed=7)
    assert generate_corpus(50, seed=7) != generate_corpus(50, seed=8)


@pytest.mark.parametrize(
    "sentence",
    [
        "the dog sleeps .",
        "every old farmer runs quickly .",
        "this cat sings under that red bird .",
        "that fox chases the child .",
        "the quiet child likes every big dog often .",
        "the  dog\tsleeps .",  # any whitespace separates words
    ],
)
def test_hand_written_sentences_of_the_language_are_accepted(sentence):
    assert accepts(sentence)


@pytest.mark.parametrize(
    "text",
    [
        "",
        ".",
        "the dog sleeps",  # no full stop
        "the dog sleeps.",  # "sleeps." is not a word
        "The dog sleeps .",  # case matters
        "dog sleeps .",  # noun phrase without determiner
        "the dog red sleeps .",  # adjective after the noun
        "the big old dog sleeps .",  # two adjectives
        "the dog sees .",  # transitive verb without object
        "the dog sleeps the cat .",  # intransitive verb with object
        "the dog sees the cat near the fox .",  # PP only after intransitive verbs
        "the dog sleeps quickly near the cat .",  # adverb and PP
        "the dog sleeps . the cat runs .",  # two sentences
        "the dog sleeps . .",
        "the zebra sleeps .",  # unknown word
        "the dog sleeps . </s>",  # an eos token is not part of the text
        "lo kanu dormi .",  # target-language words
    ],
)
def test_hand_written_non_sentences_are_rejected(text):
    assert not accepts(text)


def test_word_classes_are_disjoint_and_the_vocabulary_has_28_entries():
    words = [w for ws in grammar.WORD_CLASSES.values() for w in ws]
    assert len(words) == len(set(words)) == 28
    assert grammar.VOCABULARY == words
    assert grammar.word_class("fox") == "NOUN" and grammar.word_class("zebra") is None


def test_the_language_has_the_hand_counted_number_of_sentences():
    noun_phrases = 4 * 6 + 4 * 5 * 6  # DET NOUN | DET ADJ NOUN
    verb_phrases = 3 + 3 * 2 + 3 * 3 * noun_phrases + 4 * noun_phrases + 4 * noun_phrases * 2
    assert grammar.count_sentences() == noun_phrases * verb_phrases == 436_752


def test_allowed_class_bigrams_are_exactly_the_hand_listed_pairs():
    assert grammar.allowed_bigrams() == {
        ("DET", "NOUN"),
        ("DET", "ADJ"),
        ("ADJ", "NOUN"),
        ("NOUN", "IVERB"),
        ("NOUN", "TVERB"),
        ("NOUN", "ADV"),
        ("NOUN", "END"),
        ("IVERB", "END"),
        ("IVERB", "ADV"),
        ("IVERB", "PREP"),
        ("PREP", "DET"),
        ("TVERB", "DET"),
        ("ADV", "END"),
    }


def test_mean_sentence_length_matches_the_rule_probabilities():
    # E[NP] = 2 + 0.4; E[VP] = .15*1 + .15*2 + .2*(2 + NP) + .3*(1 + NP) + .2*(2 + NP); + "."
    noun_phrase = 2.4
    verb_phrase = 0.15 + 0.3 + 0.2 * (2 + noun_phrase) + 0.3 * (1 + noun_phrase)
    verb_phrase += 0.2 * (2 + noun_phrase)
    expected = noun_phrase + verb_phrase + 1  # 6.63
    shapes = grammar.SOURCE.shape_probabilities()
    assert sum(shapes.values()) == pytest.approx(1.0)
    assert sum(p * len(s) for s, p in shapes.items()) == pytest.approx(expected)
    lengths = [len(s.split()) for s in generate_corpus(20_000, seed=3)]
    assert sum(lengths) / len(lengths) == pytest.approx(expected, abs=0.04)


def test_generator_counts_are_plausible_for_the_shape_probabilities():
    shapes = grammar.SOURCE.shape_probabilities()
    counts = Counter(
        tuple(grammar.word_class(w) for w in s.split()) for s in generate_corpus(20_000, seed=6)
    )
    for shape, probability in shapes.items():
        expected = 20_000 * probability
        assert abs(counts[shape] - expected) < 5 * math.sqrt(expected) + 5


# --- the translation task ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "target"),
    [
        ("the dog sleeps .", "lo kanu dormi ."),
        ("every old farmer runs quickly .", "oku agro veku rapi kuri ."),
        ("this cat sings under that red bird .", "ita mipo eso avi rossa suba kanta ."),
        ("that fox chases the child .", "eso rena lo bimo kasa ."),
        ("the big dog chases this cat quickly .", "lo kanu grano ita mipo rapi kasa ."),
    ],
)
def test_translation_maps_words_and_reorders_on_hand_examples(source, target):
    assert translate.translate(source) == target
    assert target_accepts(target)
    assert not accepts(target) and not target_accepts(source)


def test_translation_of_a_non_sentence_is_an_error():
    with pytest.raises(ValueError, match="not a sentence"):
        translate.translate("the dog sees .")


def test_target_words_are_a_bijection_disjoint_from_the_source_words():
    mapping = translate.TARGET_WORD
    assert set(mapping) == set(grammar.VOCABULARY)
    assert len(set(mapping.values())) == len(mapping)
    assert set(mapping.values()) & set(grammar.VOCABULARY) == {"."}


def test_target_recognizer_rejects_source_word_order():
    assert not target_accepts("lo grano kanu dormi .")  # adjective before the noun
    assert not target_accepts("lo kanu kasa ita mipo .")  # verb before the object


def test_pairs_are_seeded_sentences_with_their_translations():
    pairs = make_pairs(300, seed=5)
    assert [s for s, _ in pairs] == generate_corpus(300, seed=5)
    for source, target in pairs:
        assert translate.translate(source) == target and target_accepts(target)
        assert len(source.split()) == len(target.split()) <= 9


# --- graded measures -----------------------------------------------------------------------


def test_unigram_entropy_is_the_pooled_word_entropy_in_nats():
    # counts a:2 b:2 c:1 .:1 of 6 words
    expected = 2 * (1 / 3) * math.log(3) + 2 * (1 / 6) * math.log(6)
    assert quality.unigram_entropy(["a a b", "b c ."]) == pytest.approx(expected)
    assert quality.unigram_entropy([]) == 0.0


def test_measures_of_a_hand_made_list_equal_the_hand_computed_values():
    training = [
        "the dog runs .",
        "the big cat sees this small fox quickly .",
        "every bird sleeps .",
    ]
    samples = [
        "the dog runs .",  # accepted, copied, short
        "the dog  runs .",  # the same text again (whitespace does not matter)
        "that fox sleeps near the old cat .",  # accepted, novel, 7 words
        "the big cat sees this small fox quickly .",  # accepted, copied, 8 words
        "dog the runs .",  # pairs NOUN-DET no, DET-IVERB no, IVERB-END yes
        "the dog runs . the cat",  # sentences: one good, one unfinished; END-DET no
        "the zebra runs .",  # unknown word: two bad pairs
    ]
    m = quality.evaluate_samples(samples, training)
    assert m["n"] == 7
    assert m["accepted"] == pytest.approx(4 / 7)
    assert m["sentence_acceptance"] == pytest.approx(5 / 8)
    assert m["bigram_validity"] == pytest.approx(27 / 32)  # (3+3+7+8+1+4+1) of (3+3+7+8+3+5+3)
    assert m["duplicate_share"] == pytest.approx(1 / 7)
    assert m["novel_accepted_share"] == pytest.approx(1 / 4)
    assert m["accepted_novel"] == pytest.approx(1 / 7)
    assert m["long_samples"] == 2
    assert m["long_copy_share"] == pytest.approx(1 / 2)
    assert m["mean_words"] == pytest.approx((4 + 4 + 8 + 9 + 4 + 6 + 4) / 7)
    assert m["data_mean_words"] == pytest.approx(17 / 3)
    assert m["entropy"] == pytest.approx(quality.unigram_entropy(samples))
    assert m["data_entropy"] == pytest.approx(quality.unigram_entropy(training))


def test_measures_of_no_samples_are_zero():
    m = quality.evaluate_samples([], ["the dog runs ."])
    assert m["n"] == 0 and m["accepted"] == m["bigram_validity"] == m["duplicate_share"] == 0.0


def test_generator_text_scores_perfectly_on_the_grammar_measures():
    m = quality.evaluate_samples(generate_corpus(500, seed=11), generate_corpus(2000, seed=1))
    assert m["accepted"] == m["sentence_acceptance"] == m["bigram_validity"] == 1.0


def test_baselines_are_shuffled_real_sentences_and_random_words():
    real = generate_corpus(200, seed=4)
    shuffled = quality.shuffled_samples(200, seed=4)
    assert [sorted(s.split()) for s in shuffled] == [sorted(s.split()) for s in real]
    random_words = quality.random_word_samples(200, seed=4)
    assert [len(s.split()) for s in random_words] == [len(s.split()) for s in real]
    assert {w for s in random_words for w in s.split()} <= set(grammar.VOCABULARY)

    baselines = quality.baseline_measures(generate_corpus(5000, seed=1), n=300)
    assert baselines["generator"]["bigram_validity"] == 1.0
    for name in ("shuffled", "random"):
        assert baselines[name]["accepted"] < 0.05
        assert 0.1 < baselines[name]["bigram_validity"] < 0.5


def test_target_side_measures_use_the_target_grammar():
    targets = [t for _, t in make_pairs(100, seed=9)]
    m = quality.evaluate_samples(targets, targets, grammar=translate.TARGET)
    assert m["accepted"] == m["bigram_validity"] == 1.0


# --- assets --------------------------------------------------------------------------------


def test_vocabulary_has_specials_first_then_both_languages():
    words = assets.vocabulary()
    assert words[:3] == ["<pad>", "</s>", "<unk>"] and words[-1] == "."
    assert len(words) == len(set(words)) == 3 + 27 + 27 + 1
    assert set(grammar.VOCABULARY) | set(translate.TARGET_VOCABULARY) == set(words[3:])


def test_cache_root_defaults_to_the_home_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("ELFCTL_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert assets.cache_root() == tmp_path / ".cache" / "elfctl"
    monkeypatch.setenv("ELFCTL_CACHE", str(tmp_path / "x"))
    assert assets.asset_folder("grammar") == tmp_path / "x" / "testbed" / "grammar-v1"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Both test beds built once into a fresh cache root (ELFCTL_CACHE set for the module)."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ELFCTL_CACHE", str(root))
        yield {name: assets.ensure_assets(name) for name in ("grammar", "translate")}


def _files(folder: str) -> dict[str, bytes]:
    base = Path(folder)
    return {
        str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()
    }


def test_two_builds_in_two_cache_roots_give_identical_files(built, tmp_path, monkeypatch):
    monkeypatch.setenv("ELFCTL_CACHE", str(tmp_path))
    for name in ("grammar", "translate"):
        again = assets.ensure_assets(name)
        assert again["root"].startswith(str(tmp_path))
        first, second = _files(built[name]["root"]), _files(again["root"])
        assert set(first) >= {"encoder/model.safetensors", "train/data-00000-of-00001.arrow"}
        assert first == second


def test_tokenizer_loads_with_auto_tokenizer_and_adds_no_special_tokens(built):
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(built["translate"]["tokenizer"])
    assert len(tokenizer) == 58
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    rows = load_from_disk(built["translate"]["train"])[:20]
    for source, target, source_ids, target_ids in zip(
        rows["input"], rows["target"], rows["condition_input_ids"], rows["input_ids"], strict=True
    ):
        assert tokenizer(source)["input_ids"] == source_ids
        assert tokenizer(target)["input_ids"] == target_ids
        assert tokenizer.decode(target_ids + [1, 0, 0], skip_special_tokens=True) == target
    assert tokenizer("the zebra .")["input_ids"][1] == tokenizer.unk_token_id


def test_datasets_hold_the_seeded_corpus_as_token_ids(built):
    from datasets import load_from_disk

    train = load_from_disk(built["grammar"]["train"])
    validation = load_from_disk(built["grammar"]["validation"])
    assert (len(train), len(validation)) == (50_000, 2_000)
    assert train[:100]["text"] == generate_corpus(100, seed=1)
    assert validation[:100]["text"] == generate_corpus(100, seed=2)
    index = {w: i for i, w in enumerate(assets.vocabulary())}
    assert train[5]["input_ids"] == [index[w] for w in train[5]["text"].split()]

    pairs = load_from_disk(built["translate"]["validation"])
    assert len(pairs) == 1_000
    assert list(zip(pairs[:50]["input"], pairs[:50]["target"], strict=True)) == make_pairs(
        50, seed=4
    )


def test_encoder_is_a_small_t5_loaded_with_from_pretrained(built):
    import torch
    from transformers import T5EncoderModel

    encoder = T5EncoderModel.from_pretrained(built["grammar"]["encoder"]).eval()
    config = encoder.config
    assert (config.vocab_size, config.d_model, config.num_layers, config.num_heads) == (
        58,
        64,
        2,
        4,
    )
    with torch.no_grad():
        hidden = encoder(input_ids=torch.tensor([[3, 10, 20, 57]])).last_hidden_state
    assert hidden.shape == (1, 4, 64)


def _slow_latent_stats(encoder_folder, sequences):
    """Each sequence alone, unpadded; then mean and population std of every value."""
    import torch
    from transformers import T5EncoderModel

    encoder = T5EncoderModel.from_pretrained(encoder_folder).eval()
    with torch.no_grad():
        hidden = [encoder(input_ids=torch.tensor([s])).last_hidden_state[0] for s in sequences]
    values = torch.cat(hidden).double()
    return values.mean().item(), values.std(unbiased=False).item()


def test_latent_stats_match_a_slow_per_sentence_computation(built):
    from datasets import load_from_disk

    paths = built["grammar"]
    rows = load_from_disk(paths["train"])[:12]["input_ids"]
    slow = _slow_latent_stats(paths["encoder"], [r[:6] for r in rows])
    fast = assets.measure_latent_stats(paths["encoder"], paths["train"], 6, n=12, batch_size=5)
    assert fast == pytest.approx(slow, abs=1e-5)


def test_latent_stats_lay_out_condition_then_target_like_the_collator(built):
    from datasets import load_from_disk

    paths = built["translate"]
    rows = load_from_disk(paths["train"])[:8]
    sequences = [
        (c[:3] + t)[:10]
        for c, t in zip(rows["condition_input_ids"], rows["input_ids"], strict=True)
    ]
    slow = _slow_latent_stats(paths["encoder"], sequences)
    fast = assets.measure_latent_stats(
        paths["encoder"], paths["train"], 10, n=8, max_input_length=3
    )
    assert fast == pytest.approx(slow, abs=1e-5)


def test_stats_json_holds_the_measured_latent_stats(built):
    for name, paths in built.items():
        stats = json.loads(Path(paths["stats"]).read_text())
        spec = assets.SPECS[name]
        measured = assets.measure_latent_stats(
            paths["encoder"],
            paths["train"],
            spec.stats_max_length,
            max_input_length=spec.stats_max_input_length,
        )
        assert (stats["latent_mean"], stats["latent_std"]) == pytest.approx(measured)
        # A random T5 ends in an RMSNorm with unit weights: values have RMS close to 1.
        assert 0.9 < stats["latent_std"] < 1.1 and abs(stats["latent_mean"]) < 0.1


def test_testbed_uris_resolve_to_the_built_folders(built):
    for name, paths in built.items():
        for part in assets.PARTS:
            assert assets.resolve_testbed_uri(f"testbed:{name}/{part}") == paths[part]
            assert os.path.exists(paths[part])


@pytest.mark.parametrize(
    "uri",
    ["grammar/train", "testbed:", "testbed:grammar", "testbed:poems/train", "testbed:grammar/x"],
)
def test_bad_testbed_uris_are_user_errors(uri):
    with pytest.raises(UserError):
        assets.resolve_testbed_uri(uri)


def test_unknown_testbed_name_is_a_user_error():
    with pytest.raises(UserError, match="poems"):
        assets.ensure_assets("poems")


def test_an_aborted_build_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("ELFCTL_CACHE", str(tmp_path))

    def failing_build(name, folder):
        (folder / "tokenizer").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(assets, "_build", failing_build)
    with pytest.raises(KeyboardInterrupt):
        assets.ensure_assets("grammar")
    assert list((tmp_path / "testbed").iterdir()) == []


def test_a_build_that_loses_the_race_keeps_the_winners_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("ELFCTL_CACHE", str(tmp_path))
    final = assets.asset_folder("grammar")

    def build_while_another_finishes(name, folder):
        (folder / "mine").write_text("loser")
        final.mkdir()  # the other builder renames its complete folder into place first
        (final / "theirs").write_text("winner")

    monkeypatch.setattr(assets, "_build", build_while_another_finishes)
    paths = assets.ensure_assets("grammar")
    assert paths["root"] == str(final)
    assert sorted(p.name for p in (tmp_path / "testbed").iterdir()) == ["grammar-v1"]
    assert [p.name for p in final.iterdir()] == ["theirs"]
