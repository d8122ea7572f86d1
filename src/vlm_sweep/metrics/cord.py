"""CORD-v2 scores exactly as Donut reports them (clovaai/donut ``JSONParseEvaluator``).

* ``ted_accuracy``: normalised tree-edit-distance accuracy per sample,
  ``max(0, 1 - TED(pred, answer) / TED({}, answer))``, averaged over samples.
* ``field_f1``: micro F1 over flattened ``(key.path, value)`` pairs of all samples.

Both normalise first with Donut's ``normalize_dict`` (keys sorted by
``(len, key)``, empty values dropped, scalars turned into one-item string
lists), so key order and ``"x"`` vs ``["x"]`` do not matter. An answer with no fields
scores 0.0 whatever the prediction, as in Donut: there ``zss`` returns numpy
floats, so ``TED/0`` is nan (or inf) rather than an error, and ``max(0, 1 - nan)``
is 0. ``field_f1`` with nothing predicted and nothing expected is 1.0 (Donut
divides ints by zero there and raises).
"""

from __future__ import annotations

from typing import Any

import zss

from vlm_sweep.donut import token2json
from vlm_sweep.metrics.edit_distance import edit_distance

LEAF = "<leaf>"


def flatten(data: Any) -> list[tuple[str, Any]]:
    """``(dotted key path, leaf value)`` pairs; list items share their parent's path.

    ``{"menu": [{"nm": ["a"]}, {"nm": ["b"]}]}`` -> ``[("menu.nm", "a"), ("menu.nm", "b")]``.
    """
    pairs: list[tuple[str, Any]] = []

    def _flatten(value: Any, key: str = "") -> None:
        if type(value) is dict:
            for child_key, child_value in value.items():
                _flatten(child_value, f"{key}.{child_key}" if key else child_key)
        elif type(value) is list:
            for item in value:
                _flatten(item, key)
        else:
            pairs.append((key, value))

    _flatten(data)
    return pairs


def normalize_dict(data: Any) -> Any:
    """Donut's canonical form: sorted keys, leaves as lists of stripped strings, empties dropped."""
    if not data:
        return {}
    if isinstance(data, dict):
        new_data: Any = {}
        for key in sorted(data.keys(), key=lambda k: (len(k), k)):
            value = normalize_dict(data[key])
            if value:
                new_data[key] = value if isinstance(value, list) else [value]
    elif isinstance(data, list):
        if all(isinstance(item, dict) for item in data):
            new_data = [n for n in (normalize_dict(item) for item in data) if n]
        else:
            new_data = [str(i).strip() for i in data if type(i) in {str, int, float} and str(i).strip()]
    else:
        new_data = [str(data).strip()]
    return new_data


def field_f1(preds: list[Any], answers: list[Any]) -> float:
    """Micro F1 over all samples' flattened fields (Donut's ``cal_f1``).

    A predicted field matches at most one identical answer field (matched ones
    are removed), so duplicated predictions are not rewarded twice.
    """
    if len(preds) != len(answers):
        raise ValueError(f"{len(preds)} predictions but {len(answers)} answers")
    total_tp, total_fn_or_fp = 0, 0
    for pred, answer in zip(preds, answers):
        pred_fields, answer_fields = flatten(normalize_dict(pred)), flatten(normalize_dict(answer))
        for field in pred_fields:
            if field in answer_fields:
                total_tp += 1
                answer_fields.remove(field)
            else:
                total_fn_or_fp += 1
        total_fn_or_fp += len(answer_fields)
    if total_tp + total_fn_or_fp == 0:  # nothing predicted, nothing expected
        return 1.0
    return total_tp / (total_tp + total_fn_or_fp / 2)


def _update_cost(node1: zss.Node, node2: zss.Node) -> int:
    """Leaf-leaf: edit distance of the texts; leaf-vs-key: 1 + text length; key-key: 0/1."""
    label1, label2 = node1.label, node2.label
    leaf1, leaf2 = LEAF in label1, LEAF in label2
    if leaf1 and leaf2:
        return edit_distance(label1.replace(LEAF, ""), label2.replace(LEAF, ""))
    if leaf2:
        return 1 + len(label2.replace(LEAF, ""))
    if leaf1:
        return 1 + len(label1.replace(LEAF, ""))
    return int(label1 != label2)


def _insert_remove_cost(node: zss.Node) -> int:
    """A leaf costs its text length, any other node 1."""
    return len(node.label.replace(LEAF, "")) if LEAF in node.label else 1


def construct_tree_from_dict(data: Any, node_name: str | None = None) -> zss.Node:
    """Donut's tree: keys are nodes, list-of-dict items are ``<subtree>`` nodes, leaves ``<leaf>text``."""
    node = zss.Node("<root>" if node_name is None else node_name)
    if isinstance(data, dict):
        for key, value in data.items():
            node.addkid(construct_tree_from_dict(value, key))
    elif isinstance(data, list):
        if all(isinstance(item, dict) for item in data):
            for item in data:
                node.addkid(construct_tree_from_dict(item, "<subtree>"))
        else:
            for item in data:
                node.addkid(zss.Node(f"{LEAF}{item}"))
    else:  # unreachable after normalize_dict; Donut raises too
        raise TypeError(f"cannot build a tree from {type(data).__name__} at {node_name!r}")
    return node


def _ted(a: zss.Node, b: zss.Node) -> float:
    return zss.distance(
        a, b, get_children=zss.Node.get_children, insert_cost=_insert_remove_cost,
        remove_cost=_insert_remove_cost, update_cost=_update_cost,
    )


def ted_accuracy(pred: Any, answer: Any) -> float:
    """``max(0, 1 - TED(pred, answer) / TED({}, answer))`` on normalised trees (Donut's ``cal_acc``)."""
    pred_tree = construct_tree_from_dict(normalize_dict(pred))
    answer_tree = construct_tree_from_dict(normalize_dict(answer))
    worst = _ted(construct_tree_from_dict(normalize_dict({})), answer_tree)
    if worst == 0:  # no fields to find: Donut's numpy 0/0 (or x/0) gives max(0, nan or -inf) == 0
        return 0.0
    return max(0.0, 1.0 - _ted(pred_tree, answer_tree) / worst)


def cord_scores(pred_texts: list[str], answer_texts: list[str]) -> dict[str, float]:
    """Score generated Donut token strings against reference token strings.

    Both sides go through ``token2json`` (which never raises on malformed
    output). Returns the mean per-sample ``ted_accuracy`` and the micro
    ``field_f1``, the two numbers Donut reports for CORD-v2.
    """
    if len(pred_texts) != len(answer_texts):
        raise ValueError(f"{len(pred_texts)} predictions but {len(answer_texts)} answers")
    if not pred_texts:
        raise ValueError("cord_scores needs at least one sample")
    preds = [token2json(text) for text in pred_texts]
    answers = [token2json(text) for text in answer_texts]
    teds = [ted_accuracy(p, a) for p, a in zip(preds, answers)]
    return {"ted_accuracy": sum(teds) / len(teds), "field_f1": field_f1(preds, answers)}
