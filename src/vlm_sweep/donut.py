"""CORD-v2 ground truth <-> Donut token sequence.

The target text a model learns for CORD-v2 is Donut's token sequence, e.g.
``<s_total><s_total_price>75,000</s_total_price></s_total><s_menu>...</s_menu>``.
``json2token`` / ``token2json`` follow clovaai/donut (``donut/model.py``), which
NeMo Automodel's CORD-v2 recipe also uses, so scores are comparable with theirs.

Round trip: ``token2json(json2token(x)) == x`` holds for receipt-shaped ``x``
(nested dicts whose leaves are stripped, non-empty strings; lists of dicts with
>= 2 items; lists of strings with >= 2 items). It does NOT hold, by Donut's
design, for:

* a one-item list: ``{"menu": [{...}]}`` comes back as ``{"menu": {...}}`` and
  ``{"nm": ["x"]}`` as ``{"nm": "x"}`` (CORD itself stores one menu item as a dict);
* non-string leaves: ``2`` comes back as ``"2"``, ``None`` as ``"None"``;
* empty values: ``{}``, ``[]`` and ``""`` all come back as ``""``;
* leaves with surrounding whitespace (stripped) or containing ``<s_``/``</s_``/
  ``<sep/>`` text;
* a key nested inside a value under the same key (Donut's non-greedy match),
  or a key containing ``>``;
* key order, when ``sort_json_key`` is on (dict equality ignores order anyway).

Deviations from Donut's ``token2json``, all to make it total on model output:
the key is regex-escaped and found without a ReDoS-prone pattern (as in
``transformers.DonutProcessor``), content may span newlines, ``<sep/>``-chained
list items are collected iteratively instead of recursively, and a too-deep
nesting (> ``MAX_DEPTH`` levels) returns ``{"text_sequence": tokens}``. Donut's
"categorical special token" leaves (``<foo/>`` in the tokenizer's added vocab)
are not decoded because there is no tokenizer here; CORD does not use them.
"""

from __future__ import annotations

import json
import re
from typing import Any

SEP = "<sep/>"
MAX_DEPTH = 64  # deeper nesting is degenerate output; also keeps the metrics' recursion bounded
_START_RE = re.compile(r"<s_", re.IGNORECASE)


def parse_ground_truth(ground_truth: str) -> list[dict]:
    """Return every parse in a CORD-style ``ground_truth`` JSON string.

    ``gt_parses`` (several acceptable answers, e.g. DocVQA) wins over
    ``gt_parse``, as in Donut. Raises ``ValueError`` so the caller can name the
    bad record instead of getting an ``AssertionError`` from deep inside.
    """
    try:
        data = json.loads(ground_truth)
    except (TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"ground_truth is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"ground_truth must be a JSON object, got {type(data).__name__}")
    if "gt_parses" in data:
        parses = data["gt_parses"]
        if not isinstance(parses, list) or not parses:
            raise ValueError("ground_truth['gt_parses'] must be a non-empty list")
        return parses
    if "gt_parse" not in data:
        raise ValueError("ground_truth has neither 'gt_parse' nor 'gt_parses'")
    if not isinstance(data["gt_parse"], dict):
        raise ValueError(f"ground_truth['gt_parse'] must be an object, got {type(data['gt_parse']).__name__}")
    return [data["gt_parse"]]


def json2token(obj: Any, sort_json_key: bool = True) -> str:
    """Serialise a parse into Donut's ``<s_key>value</s_key>`` sequence.

    Keys are emitted in reverse-sorted order when ``sort_json_key`` (Donut's
    default, so ``total`` precedes ``sub_total`` precedes ``menu``); list items
    are joined by ``<sep/>``; a dict holding only ``text_sequence`` emits its
    value bare.
    """
    if isinstance(obj, dict):
        if len(obj) == 1 and "text_sequence" in obj:
            return str(obj["text_sequence"])
        keys = sorted(obj.keys(), reverse=True) if sort_json_key else obj.keys()
        return "".join(f"<s_{k}>{json2token(obj[k], sort_json_key)}</s_{k}>" for k in keys)
    if isinstance(obj, list):
        return SEP.join(json2token(item, sort_json_key) for item in obj)
    return str(obj)


def token2json(tokens: str, is_inner_value: bool = False) -> dict | list:
    """Parse a (generated) Donut token sequence back into JSON, best effort.

    Never raises: unmatched opening tags are dropped, text outside tags is
    ignored once any field was parsed, and a sequence with no fields comes back
    as ``{"text_sequence": <remaining text>}`` (``[]`` when ``is_inner_value``).
    A top-level ``<sep/>`` between fields yields a list of dicts, as in Donut.
    """
    try:
        return _token2json(tokens, is_inner_value, 0)
    except (_TooDeep, RecursionError):
        return [] if is_inner_value else {"text_sequence": tokens}


class _TooDeep(Exception):
    """Nesting beyond ``MAX_DEPTH``: give up on structure rather than recurse on."""


def _find_start(tokens: str) -> str | None:
    """The first ``<s_key>`` tag, found without Donut's ReDoS-prone regex."""
    match = _START_RE.search(tokens)
    if match is None:
        return None
    rest = tokens[match.start():]
    close = rest.find(">")
    return None if close < 0 else rest[: close + 1]


def _token2json(tokens: str, is_inner_value: bool, depth: int) -> dict | list:
    if depth > MAX_DEPTH:
        raise _TooDeep
    # Donut's loop. Where Donut recurses on "<sep/>" between sibling dicts
    # (``[output] + token2json(rest, True)``), we append to ``items`` instead.
    items: list[dict] = []
    in_list = False
    output: dict[str, Any] = {}
    while tokens:
        start_token = _find_start(tokens)
        if start_token is None:
            break
        key = start_token[len("<s_"): -len(">")]
        end_match = re.search(rf"</s_{re.escape(key)}>", tokens, re.IGNORECASE)
        if end_match is None:
            tokens = tokens.replace(start_token, "")
            continue
        end_token = end_match.group()
        content = re.search(
            f"{re.escape(start_token)}(.*?){re.escape(end_token)}", tokens, re.IGNORECASE | re.DOTALL
        )
        if content is not None:
            inner = content.group(1).strip()
            if "<s_" in inner and "</s_" in inner:  # non-leaf node
                value = _token2json(inner, True, depth + 1)
                if value:
                    output[key] = value[0] if len(value) == 1 else value
            else:  # leaf node(s)
                leaves = [leaf.strip() for leaf in inner.split(SEP)]
                output[key] = leaves[0] if len(leaves) == 1 else leaves
        tokens = tokens[tokens.find(end_token) + len(end_token):].strip()
        if tokens[: len(SEP)] == SEP:  # next sibling dict of a list
            items.append(output)
            output = {}
            in_list = True
            is_inner_value = True
            tokens = tokens[len(SEP):]
    if in_list:
        return items + ([output] if output else [])
    if output:
        return [output] if is_inner_value else output
    return [] if is_inner_value else {"text_sequence": tokens}


def cord_record_to_conversation(record: dict, prompt: str = "Describe this image.") -> list[dict]:
    """Turn a CORD-v2 row into the user/assistant chat a VLM processor expects.

    The assistant turn is the Donut token sequence of the first parse (NeMo
    Automodel picks a random one; CORD has exactly one, so this is the same and
    deterministic). Raises ``ValueError`` on bad ground truth or an empty target.
    """
    if "image" not in record or "ground_truth" not in record:
        raise ValueError("CORD record needs 'image' and 'ground_truth'")
    token_string = json2token(parse_ground_truth(record["ground_truth"])[0], sort_json_key=True)
    if not token_string.strip():
        raise ValueError("ground truth parse serialises to an empty token string")
    return [
        {
            "role": "user",
            "content": [{"type": "image", "image": record["image"]}, {"type": "text", "text": prompt}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": token_string}]},
    ]
