"""CORD-v2 metrics as Donut's JSONParseEvaluator defines them."""

from __future__ import annotations

import random

import pytest

from vlm_sweep.donut import json2token
from vlm_sweep.data.synthetic_receipts import _make_parse
from vlm_sweep.metrics.cord import cord_scores, field_f1, flatten, normalize_dict, ted_accuracy

ANSWER = {
    "menu": [{"nm": "cake", "cnt": "2"}, {"nm": "juice", "cnt": "1"}],
    "total": {"total_price": "30,000"},
}


def test_flatten_matches_donut_docstring():
    data = {"menu": [{"name": ["cake"], "count": ["2"]}, {"name": ["juice"], "count": ["1"]}]}
    assert flatten(data) == [("menu.name", "cake"), ("menu.count", "2"), ("menu.name", "juice"), ("menu.count", "1")]


def test_normalize_dict_sorts_and_wraps():
    assert normalize_dict({"price": "1", "nm": " a ", "x": "", "y": {}}) == {"nm": ["a"], "price": ["1"]}
    assert list(normalize_dict({"bb": "1", "a": "2", "c": "3"})) == ["a", "c", "bb"]  # (len, key)


def test_perfect_prediction_scores_one():
    assert ted_accuracy(ANSWER, ANSWER) == 1.0
    assert field_f1([ANSWER], [ANSWER]) == 1.0
    # Key order and "x" vs ["x"] do not matter after normalisation.
    reordered = {"total": {"total_price": ["30,000"]}, "menu": [{"cnt": "2", "nm": "cake"}, {"cnt": "1", "nm": "juice"}]}
    assert ted_accuracy(reordered, ANSWER) == 1.0
    tokens = json2token(ANSWER)
    assert cord_scores([tokens], [tokens]) == {"ted_accuracy": 1.0, "field_f1": 1.0}


def test_empty_prediction_scores_zero():
    assert ted_accuracy({}, ANSWER) == 0.0
    assert field_f1([{}], [ANSWER]) == 0.0
    assert cord_scores([""], [json2token(ANSWER)]) == {"ted_accuracy": 0.0, "field_f1": 0.0}
    assert cord_scores(["garbage without tags"], [json2token(ANSWER)])["field_f1"] == 0.0


def test_one_of_two_fields_wrong_by_hand():
    answer = {"nm": "ab", "price": "12"}
    pred = {"nm": "ab", "price": "13"}
    # F1: flattened pred [(nm, ab), (price, 13)] vs answer [(nm, ab), (price, 12)]:
    #   tp = 1, fp = 1, fn = 1  ->  1 / (1 + (1 + 1) / 2) = 0.5
    assert field_f1([pred], [answer]) == pytest.approx(0.5)
    # TED trees: <root> -> nm -> <leaf>ab, <root> -> price -> <leaf>12 (vs <leaf>13).
    #   TED(pred, answer) = update <leaf>13 -> <leaf>12 = edit_distance("13", "12") = 1
    #   TED({}, answer) = insert nm (1) + "ab" (2) + price (1) + "12" (2) = 6
    #   accuracy = 1 - 1/6 = 5/6
    assert ted_accuracy(pred, answer) == pytest.approx(5 / 6)
    assert cord_scores([json2token(pred)], [json2token(answer)]) == pytest.approx(
        {"ted_accuracy": 5 / 6, "field_f1": 0.5}
    )


def test_missing_and_extra_fields_by_hand():
    answer = {"nm": "ab", "price": "12"}
    # Missing price: TED = remove price (1) + "12" (2) = 3 -> 1 - 3/6 = 0.5; F1 = 1 / (1 + 1/2) = 2/3.
    assert ted_accuracy({"nm": "ab"}, answer) == pytest.approx(0.5)
    assert field_f1([{"nm": "ab"}], [answer]) == pytest.approx(2 / 3)
    # A duplicated correct field matches only once (Donut removes matched answers): tp=1, fp=1, fn=1.
    assert field_f1([{"nm": ["ab", "ab"]}], [{"nm": "ab", "cnt": "1"}]) == pytest.approx(0.5)


def test_field_f1_is_micro_averaged():
    # Sample 1: 2/2 right; sample 2: 0/1 right with one wrong prediction. tp=2, fp=1, fn=1 -> 2 / (2 + 1) = 2/3.
    preds = [{"a": "1", "b": "2"}, {"c": "x"}]
    answers = [{"a": "1", "b": "2"}, {"c": "y"}]
    assert field_f1(preds, answers) == pytest.approx(2 / 3)


def test_ted_accuracy_is_clamped_at_zero():
    assert ted_accuracy({"zzz": "a very long wrong leaf value " * 4}, {"a": "1"}) == 0.0


def _donut_cal_acc(pred, answer) -> float:
    """Donut's ``cal_acc`` expression verbatim: zss gives numpy floats, so x/0 is nan or inf, not an error."""
    import numpy as np

    from vlm_sweep.metrics.cord import _ted, construct_tree_from_dict

    tree = lambda data: construct_tree_from_dict(normalize_dict(data))  # noqa: E731
    with np.errstate(divide="ignore", invalid="ignore"):
        return max(0, 1 - (_ted(tree(pred), tree(answer)) / _ted(tree({}), tree(answer))))


@pytest.mark.parametrize("pred", [{}, {"a": "1"}, {"text_sequence": ""}])
def test_an_answer_without_fields_scores_zero_as_in_donut(pred):
    assert _donut_cal_acc(pred, {}) == 0
    assert ted_accuracy(pred, {}) == 0.0
    assert ted_accuracy(pred, {"text_sequence": " "}) == 0.0  # normalises to no fields
    # Where Donut's expression is defined, it is what we compute.
    assert ted_accuracy(pred, ANSWER) == pytest.approx(_donut_cal_acc(pred, ANSWER))


def test_cord_scores_of_answers_without_fields():
    # An empty answer string parses to {"text_sequence": ""}: no fields, so TED accuracy 0 even for "".
    assert cord_scores([""], [""])["ted_accuracy"] == 0.0
    assert cord_scores(["<s_a>1</s_a>", ""], ["", json2token(ANSWER)])["ted_accuracy"] == 0.0
    assert cord_scores([json2token(ANSWER), ""], [json2token(ANSWER), ""])["ted_accuracy"] == 0.5
    assert field_f1([{}], [{}]) == 1.0  # nothing expected, nothing predicted: no field was missed


def test_cord_scores_on_mutated_outputs_never_raises():
    rng = random.Random(7)
    answers, preds = [], []
    for _ in range(20):
        tokens = json2token(_make_parse(rng))
        cut = rng.randrange(len(tokens))
        answers.append(tokens)
        preds.append(tokens[:cut] + "<sep/></s_menu>" + tokens[cut:][::-1])
    scores = cord_scores(preds, answers)
    assert 0.0 <= scores["ted_accuracy"] <= 1.0 and 0.0 <= scores["field_f1"] <= 1.0


def test_cord_scores_validates_lengths():
    with pytest.raises(ValueError):
        cord_scores(["a"], [])
    with pytest.raises(ValueError):
        cord_scores([], [])
