"""Answer-matching metrics for question answering: free text and multiple choice.

* Free text is compared after SQuAD's normalisation (lower case, punctuation and
  the articles a/an/the removed, whitespace collapsed): ``exact_match`` and the
  token-overlap ``token_f1`` (both 0..1 per sample, averaged).
* ``anls`` (DocVQA's official metric, Biten et al. 2019): 1 - normalised edit distance to
  the closest accepted answer, 0 from distance 0.5 on; for sets that list several answers.
* A multiple-choice reference is an option letter, alone or leading its text
  (``"B"``, ``"(B)"``, ``"B."``, ``"B. the red one"``, ``"Answer: B"``); the
  prediction scores when the letter it gives is the same. A reference that is not
  in that form is free text, so one metric serves a split that mixes both.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Any, Dict, List, Optional, Sequence, Union

from vlm_sweep.metrics.edit_distance import edit_distance

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)
# "Answer:", "The answer is", "Option", "Correct option:" ... in front of the letter.
_LEAD_IN = re.compile(r"^\s*(?:the\s+)?(?:correct\s+)?(?:answer|option|choice)(?:\s+is)?\s*[:\-]?\s*",
                      re.IGNORECASE)
# A letter alone, or followed by . : ) and then text: "B", "(B)", "B.", "B: x". Not "A man ...".
_OPTION = re.compile(r"^\(?([A-Z])\)?(?:[.:)]\s*(.*))?$", re.DOTALL)
_OPTION_IN_TEXT = re.compile(r"\b(?i:answer|option|choice)\s*(?i:is\s*)?[:\-]?\s*\(?([A-Z])\b")


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall after normalisation (SQuAD's F1)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def _leading_letter(text: str) -> Optional[str]:
    """The letter of an answer that IS an option ("B", "(B)", "Answer: B. red"), else None."""
    match = _OPTION.match(_LEAD_IN.sub("", text.strip(), count=1).strip())
    return match.group(1) if match else None


def option_letter(text: str) -> Optional[str]:
    """The option letter a text gives as its answer (``"I think the answer is C"`` -> ``"C"``), else None."""
    letter = _leading_letter(text)
    if letter is None:
        match = _OPTION_IN_TEXT.search(text)
        letter = match.group(1) if match else None
    return letter


def is_option_answer(reference: str) -> bool:
    """Whether a reference answer is in multiple-choice form (see the module doc)."""
    return _leading_letter(reference) is not None


def choice_or_exact(prediction: str, reference: str) -> float:
    """1.0 if the prediction picks the reference's option (or, for free text, matches exactly)."""
    if is_option_answer(reference):
        return float(option_letter(prediction) == option_letter(reference))
    return exact_match(prediction, reference)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _check(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} answers")
    if not predictions:
        raise ValueError("scoring needs at least one sample")


def free_text_scores(predictions: List[str], references: List[str]) -> Dict[str, float]:
    """``exact_match`` and ``token_f1``, averaged over samples."""
    _check(predictions, references)
    return {"exact_match": _mean([exact_match(p, r) for p, r in zip(predictions, references)]),
            "token_f1": _mean([token_f1(p, r) for p, r in zip(predictions, references)])}


def choice_scores(predictions: List[str], references: List[str]) -> Dict[str, float]:
    """``accuracy`` over all samples; ``mc_accuracy`` over the multiple-choice ones and
    ``open_exact_match`` / ``open_token_f1`` over the free-text ones, when the split has them."""
    _check(predictions, references)
    pairs = list(zip(predictions, references))
    scores = {"accuracy": _mean([choice_or_exact(p, r) for p, r in pairs])}
    choice = [(p, r) for p, r in pairs if is_option_answer(r)]
    free = [(p, r) for p, r in pairs if not is_option_answer(r)]
    if choice:
        scores["mc_accuracy"] = _mean([choice_or_exact(p, r) for p, r in choice])
    if free:
        scores["open_exact_match"] = _mean([exact_match(p, r) for p, r in free])
        scores["open_token_f1"] = _mean([token_f1(p, r) for p, r in free])
    return scores


# ANLS's threshold: a normalised edit distance at or above it scores 0.
ANLS_THRESHOLD = 0.5


def anls_one(prediction: str, references: Union[str, Sequence[str]]) -> float:
    """Best similarity over the accepted answers: 1 - normalised edit distance, 0 at or above the
    threshold; compared lower-cased with surrounding and repeated spaces removed, as the official script."""
    pred = " ".join(prediction.lower().split())
    best = 0.0
    for reference in [references] if isinstance(references, str) else references:
        ref = " ".join(reference.lower().split())
        distance = edit_distance(pred, ref) / max(len(pred), len(ref), 1)
        best = max(best, 1.0 - distance if distance < ANLS_THRESHOLD else 0.0)
    return best


def anls(predictions: List[str], references: List[Any]) -> Dict[str, float]:
    """``anls`` averaged over samples; each reference is one answer or the list of accepted answers."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"{len(predictions)} predictions for {len(references)} samples (need >= 1)")
    return {"anls": sum(anls_one(p, r) for p, r in zip(predictions, references)) / len(predictions)}
