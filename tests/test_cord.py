"""Donut token format for CORD-v2: serialisation, inverse, robustness."""

from __future__ import annotations

import json
import random
import re

import pytest
from PIL import Image

from vlm_sweep.donut import (
    cord_record_to_conversation,
    json2token,
    parse_ground_truth,
    token2json,
)
from vlm_sweep.data.synthetic_receipts import _make_parse, generate_synthetic_receipts

RECEIPT = {
    "menu": [
        {"nm": "NASI GORENG", "cnt": "2", "price": "50,000"},
        {"nm": "ES TEH", "cnt": "1", "price": "8,000"},
    ],
    "sub_total": {"subtotal_price": "58,000", "tax_price": "5,800"},
    "total": {"total_price": "63,800"},
}
RECEIPT_TOKENS = (
    "<s_total><s_total_price>63,800</s_total_price></s_total>"
    "<s_sub_total><s_tax_price>5,800</s_tax_price><s_subtotal_price>58,000</s_subtotal_price></s_sub_total>"
    "<s_menu><s_price>50,000</s_price><s_nm>NASI GORENG</s_nm><s_cnt>2</s_cnt>"
    "<sep/><s_price>8,000</s_price><s_nm>ES TEH</s_nm><s_cnt>1</s_cnt></s_menu>"
)


@pytest.fixture(scope="module")
def synthetic_parses(tmp_path_factory):
    import datasets

    root = generate_synthetic_receipts(tmp_path_factory.mktemp("cord") / "synth", 32, 8, 8, seed=3)
    cache = tmp_path_factory.mktemp("hf_cache")
    parses = []
    for split in ("train", "validation", "test"):
        ds = datasets.load_dataset(str(root), split=split, cache_dir=str(cache))
        parses += [parse_ground_truth(gt)[0] for gt in ds["ground_truth"]]
    return parses


def test_json2token_reverse_key_order_and_sep():
    assert json2token(RECEIPT) == RECEIPT_TOKENS


def test_json2token_without_sorting_keeps_insertion_order():
    assert json2token({"b": "1", "a": "2"}, sort_json_key=False) == "<s_b>1</s_b><s_a>2</s_a>"
    assert json2token({"a": "2", "b": "1"}) == "<s_b>1</s_b><s_a>2</s_a>"


def test_json2token_single_menu_item_dict_and_string_list():
    single = {"menu": {"nm": "KOPI", "cnt": "1", "price": "9,000"}}
    assert json2token(single) == "<s_menu><s_price>9,000</s_price><s_nm>KOPI</s_nm><s_cnt>1</s_cnt></s_menu>"
    assert json2token({"nm": ["A", "B"]}) == "<s_nm>A<sep/>B</s_nm>"
    assert json2token({"cnt": 2}) == "<s_cnt>2</s_cnt>"


def test_json2token_text_sequence_rule():
    assert json2token({"text_sequence": "hello world"}) == "hello world"
    assert json2token({"menu": {"text_sequence": "x"}}) == "<s_menu>x</s_menu>"
    # Only a dict holding text_sequence alone is emitted bare.
    assert json2token({"text_sequence": "x", "a": "1"}) == "<s_text_sequence>x</s_text_sequence><s_a>1</s_a>"


def test_token2json_inverts_hand_written_receipt():
    assert token2json(RECEIPT_TOKENS) == RECEIPT


def test_token2json_documented_collapses():
    assert token2json(json2token({"menu": [{"nm": "A"}]})) == {"menu": {"nm": "A"}}
    assert token2json(json2token({"nm": ["A"]})) == {"nm": "A"}
    assert token2json(json2token({"cnt": 2})) == {"cnt": "2"}
    assert token2json(json2token({"roi": {}})) == {"roi": ""}
    assert token2json(json2token({"text_sequence": "plain"})) == {"text_sequence": "plain"}


def test_token2json_inverts_every_synthetic_receipt(synthetic_parses):
    assert len(synthetic_parses) == 48
    for parse in synthetic_parses:
        assert token2json(json2token(parse)) == parse
    rng = random.Random(0)
    for _ in range(300):  # many more shapes than the built split holds
        parse = _make_parse(rng)
        assert token2json(json2token(parse)) == parse


def test_token2json_donut_best_effort_cases():
    assert token2json("") == {"text_sequence": ""}
    assert token2json("", is_inner_value=True) == []
    assert token2json("no tags at all") == {"text_sequence": "no tags at all"}
    # Unclosed tag is dropped, the rest still parses.
    assert token2json("<s_total><s_total_price>1,000</s_total_price>") == {"total_price": "1,000"}
    # Text outside fields is ignored once a field parsed; tags are case-insensitive.
    assert token2json("junk <s_nm>A</S_NM> trailing") == {"nm": "A"}
    # A top-level <sep/> between fields yields a list, as in Donut.
    assert token2json("<s_nm>A</s_nm><sep/><s_nm>B</s_nm>") == [{"nm": "A"}, {"nm": "B"}]
    # Regex metacharacters in a key must not raise (Donut's original did).
    assert token2json("<s_(>x</s_(>") == {"(": "x"}
    assert token2json("<s_a.b+>x</s_a.b+><s_[>") == {"a.b+": "x"}


def test_token2json_long_sep_chain_and_deep_nesting_do_not_raise():
    chain = "<s_menu>" + "<sep/>".join(["<s_nm>A</s_nm>"] * 3000) + "</s_menu>"
    assert token2json(chain) == {"menu": [{"nm": "A"}] * 3000}
    deep = "".join(f"<s_k{i}>" for i in range(2000)) + "x" + "".join(f"</s_k{i}>" for i in reversed(range(2000)))
    out = token2json(deep)
    assert out == {"text_sequence": deep}


def _mutations(tokens: str, rng: random.Random) -> list[str]:
    parts = [p for p in re.split(r"(<[^>]*>)", tokens) if p]
    shuffled = parts[:]
    rng.shuffle(shuffled)
    dropped = [p for p in parts if rng.random() > 0.2]
    noise = ["<s_", "</s_", "<sep/>", ">", "<", "<s_nm>", "</s_nm>", "</s_menu>", "\n", "é", "<s_>", "</s_>"]
    injected = parts[:]
    for _ in range(rng.randint(1, 6)):
        injected.insert(rng.randrange(len(injected) + 1), rng.choice(noise))
    cut_a, cut_b = sorted(rng.randrange(len(tokens) + 1) for _ in range(2))
    return [
        tokens[: rng.randrange(len(tokens) + 1)],  # truncated generation
        tokens[rng.randrange(len(tokens) + 1):],
        tokens[:cut_a] + tokens[cut_b:],
        "".join(shuffled),
        "".join(dropped),
        "".join(injected),
        tokens.replace("</s_", "<s_", 1),
        tokens * 2,
    ]


def test_token2json_fuzz_never_raises(synthetic_parses):
    rng = random.Random(1234)
    for parse in synthetic_parses:
        tokens = json2token(parse)
        for _ in range(10):
            for mutated in _mutations(tokens, rng):
                out = token2json(mutated)
                assert isinstance(out, (dict, list))
                json.dumps(out)  # plain JSON-able values only


def test_parse_ground_truth_variants():
    assert parse_ground_truth(json.dumps({"gt_parse": {"a": "1"}})) == [{"a": "1"}]
    multi = {"gt_parses": [{"a": "1"}, {"a": "2"}], "gt_parse": {"a": "x"}}
    assert parse_ground_truth(json.dumps(multi)) == [{"a": "1"}, {"a": "2"}]


@pytest.mark.parametrize(
    "bad",
    ["{not json", "", json.dumps({"meta": {}}), json.dumps([1]), json.dumps({"gt_parse": "x"}),
     json.dumps({"gt_parses": []})],
)
def test_parse_ground_truth_rejects(bad):
    with pytest.raises(ValueError):
        parse_ground_truth(bad)


def test_cord_record_to_conversation():
    image = Image.new("RGB", (8, 8))
    record = {"image": image, "ground_truth": json.dumps({"gt_parse": RECEIPT, "meta": {}})}
    conv = cord_record_to_conversation(record, prompt="Read the receipt.")
    assert conv == [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Read the receipt."}]},
        {"role": "assistant", "content": [{"type": "text", "text": RECEIPT_TOKENS}]},
    ]
    assert cord_record_to_conversation(record)[0]["content"][1]["text"] == "Describe this image."


def test_cord_record_to_conversation_rejects_empty_target():
    with pytest.raises(ValueError, match="empty"):
        cord_record_to_conversation({"image": None, "ground_truth": json.dumps({"gt_parse": {}})})
    with pytest.raises(ValueError):
        cord_record_to_conversation({"image": None, "ground_truth": "{oops"})
