"""Built-in scorers: exact/numeric match, regex, length, classifier, weighted sum, spec errors."""

from __future__ import annotations

import re

import pytest
import torch
from protege.configs import parse_config
from protege.errors import InvalidArgument
from protege.reward import RewardSample
from protege.services.reward.config import RewardConfig
from protege.services.reward.scorers import build_scorer, extract_answer, parse_specs


def s(completion: str, prompt: str = "Q: ", **metadata) -> RewardSample:
    return RewardSample(id="x", prompt=prompt, completion=completion, metadata=metadata)


def one(spec: dict, *samples: RewardSample) -> list:
    """Values of a single (unweighted) scorer."""
    scorer = build_scorer([spec]).parts[0][1]
    return scorer.score_batch(list(samples))


def test_answer_extraction():
    assert extract_answer("  42\nbecause...") == "42"
    assert extract_answer("42<eos>junk") == "42"
    assert extract_answer("so the answer is 17.", pattern=re.compile(r"answer is (\d+)")) == "17"
    assert extract_answer("nothing here", pattern=re.compile(r"answer is (\d+)")) is None


def test_exact_match():
    values = one({"kind": "exact_match"}, s(" 42\nmore", answer="42"), s("41", answer="42"),
                 s("42", answer=42), s("Paris", answer="paris"))
    assert values == [1.0, 0.0, 1.0, 0.0]
    assert one({"kind": "exact_match", "ignore_case": True}, s("Paris", answer="paris")) == [1.0]
    assert one({"kind": "exact_match", "key": "gold"}, s("a", gold="a")) == [1.0]
    pattern = {"kind": "exact_match", "answer_pattern": r"#### (\S+)"}
    assert one(pattern, s("work... #### 7", answer="7"), s("no marker 7", answer="7")) == [1.0, 0.0]
    missing = one({"kind": "exact_match"}, s("42", other="1"))[0]
    assert isinstance(missing, InvalidArgument) and "metadata has no 'answer'" in str(missing)


def test_numeric_match_with_tolerance():
    spec = {"kind": "numeric", "tolerance": 0.01}
    values = one(spec, s("1,234.005", answer="1234"), s("3.2", answer="3.0"), s("abc", answer="1"))
    assert values == [1.0, 0.0, 0.0]  # an unparsable completion is a wrong answer, not an error
    bad = one(spec, s("1", answer="one"))[0]
    assert isinstance(bad, InvalidArgument) and "not a number" in str(bad)
    assert one({"kind": "exact_match", "numeric": True}, s("2.0", answer="2")) == [1.0]


def test_regex_format_reward():
    search = {"kind": "regex", "pattern": r"<answer>.*</answer>"}
    assert one(search, s("x <answer>4</answer> y"), s("4")) == [1.0, 0.0]
    full = {"kind": "regex", "pattern": r"\d+", "mode": "fullmatch", "match_score": 2.0,
            "miss_score": -1.0}
    assert one(full, s("123"), s("123 apples")) == [2.0, -1.0]
    on_prompt = {"kind": "regex", "pattern": "^q", "field": "prompt", "ignore_case": True}
    assert one(on_prompt, s("", prompt="Q: hi"), s("", prompt="hi")) == [1.0, 0.0]


def test_length_penalty():
    assert one({"kind": "length", "target": 5, "coef": 0.5}, s("abc"), s("abcdefgh")) == [0.0, -1.5]
    words = {"kind": "length", "target": 2, "coef": 1.0, "unit": "words"}
    assert one(words, s("a b c d")) == [-2.0]


def test_weighted_sum_reports_components_and_failures():
    scorer = build_scorer([{"kind": "exact_match", "weight": 2.0},
                           {"kind": "length", "target": 1, "coef": 0.1, "name": "brevity"}])
    assert scorer.name == "exact_match+brevity"
    assert "2*exact_match" in scorer.description and "1*brevity" in scorer.description
    good, failed = scorer.score_batch([s("42", answer="42"), s("42")])
    total, parts = good
    assert total == pytest.approx(2.0 - 0.1) and parts == {"exact_match": 1.0,
                                                           "brevity": pytest.approx(-0.1)}
    assert isinstance(failed, Exception) and str(failed).startswith("exact_match: metadata has no")


@pytest.mark.parametrize(("specs", "match"), [
    ([{"kind": "bleu"}], r"unknown scorer kind 'bleu'; valid kinds: \['classifier', 'exact_match'"),
    ([{}], "unknown scorer kind None"),
    ([{"kind": "exact_match", "keyy": "a"}],
     r"unknown option\(s\) \['keyy'\]; valid options: .*'key'"),
    ([{"kind": "exact_match", "tolerance": "small"}], "tolerance='small' should be of type"),
    ([{"kind": "regex"}], "'pattern' option is required"),
    ([{"kind": "regex", "pattern": "("}], "bad regex"),
    ([{"kind": "regex", "pattern": "a", "mode": "any"}], "mode must be"),
    ([{"kind": "length", "unit": "tokens"}], "unit must be chars or words"),
    ([{"kind": "classifier"}], "'path' option"),
    ([{"kind": "length", "weight": "heavy"}], "weight must be a finite number"),
    ([], "non-empty list"),
    (["exact_match"], "must be a mapping"),
])
def test_bad_specs_name_what_is_valid(specs, match):
    with pytest.raises(InvalidArgument, match=match):
        parse_specs(specs)


def test_duplicate_names_are_made_unique():
    names = [c.name for c in parse_specs([{"kind": "length"}, {"kind": "length", "target": 9}])]
    assert names == ["length", "length_2"]


def test_config_parses_scorers_json_and_refuses_bad_specs():
    config = parse_config(RewardConfig, ["--scorers", '[{"kind": "regex", "pattern": "a"}]',
                                         "--max-batch-size", "8"], "reward")
    assert config.scorers == [{"kind": "regex", "pattern": "a"}] and config.port == 50053
    assert parse_config(RewardConfig, [], "reward").scorers == [{"kind": "exact_match"}]
    with pytest.raises(InvalidArgument, match="valid kinds"):
        parse_config(RewardConfig, ["--scorers", '[{"kind": "nope"}]'], "reward")
    with pytest.raises(InvalidArgument, match="max_concurrency must be >= 1"):
        parse_config(RewardConfig, ["--max-concurrency", "0"], "reward")


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    """A tiny LlamaForSequenceClassification (num_labels=1) with the char tokenizer, saved."""
    from protege.services.common.tiny import build_char_tokenizer
    from transformers import LlamaConfig, LlamaForSequenceClassification

    out = tmp_path_factory.mktemp("rm")
    tokenizer = build_char_tokenizer(out)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
                         num_labels=1, pad_token_id=tokenizer.pad_token_id,
                         max_position_embeddings=128)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config).eval()
    model.save_pretrained(str(out))
    return out, model, tokenizer


def test_classifier_scores_equal_single_forwards(reward_model):
    path, model, tokenizer = reward_model
    samples = [s("4"), s("four, definitely four", prompt="2+2="), s("5 ", prompt="2+2=")]
    scorer = build_scorer([{"kind": "classifier", "path": str(path), "batch_size": 2}])
    values = [v for v, _ in scorer.score_batch(samples)]
    with torch.inference_mode():
        expected = [float(model(**tokenizer(x.prompt + x.completion, return_tensors="pt"))
                          .logits[0, 0]) for x in samples]
    assert values == pytest.approx(expected, abs=1e-5)
    only = build_scorer([{"kind": "classifier", "path": str(path), "input": "completion",
                          "label": 0}]).score_batch(samples[:1])
    with torch.inference_mode():
        alone = float(model(**tokenizer("4", return_tensors="pt")).logits[0, 0])
    assert only[0][0] == pytest.approx(alone, abs=1e-5)


def test_classifier_label_and_path_errors(reward_model, tmp_path):
    path = str(reward_model[0])
    with pytest.raises(InvalidArgument, match=r"label index 3 is outside \[0, 1\)"):
        build_scorer([{"kind": "classifier", "path": path, "label": 3}])
    with pytest.raises(InvalidArgument, match="unknown label 'good'"):
        build_scorer([{"kind": "classifier", "path": path, "label": "good"}])
    with pytest.raises(LookupError, match="no model at"):
        build_scorer([{"kind": "classifier", "path": str(tmp_path / "missing")}])
