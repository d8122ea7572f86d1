"""The demo: example predictions a person can look at, and a shortened demo run that learns to read receipts."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from vlm_sweep.data.synthetic_receipts import FORMAT, MARKER_NAME, generate_synthetic_receipts
from vlm_sweep.donut import json2token
from vlm_sweep.inference.examples import Example, as_json, format_examples, rows_of, show_examples, write_examples

TRUTH = {"menu": {"nm": "KOPI SUSU", "cnt": "2", "price": "30,000", "unitprice": "15,000"},
         "sub_total": {"subtotal_price": "30,000"}, "total": {"total_price": "30,000"}}
ANSWER = {"menu": {"nm": "KOPI SUSU", "cnt": "1", "price": "30,000"},
          "sub_total": {"subtotal_price": "30,000"}, "total": {"total_price": "33,000"}}


def _sample(record_id: str, color: tuple[int, int, int]) -> SimpleNamespace:
    image = Image.new("RGB", (40, 30), color)
    return SimpleNamespace(record_id=record_id, conversation=[
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Describe."}]},
        {"role": "assistant", "content": [{"type": "text", "text": json2token(TRUTH)}]},
    ])


def _rows(n: int) -> list[dict]:
    """Sorted by record id as text, as the evaluation writes them (test[10] before test[2])."""
    rows = [{"record_id": f"receipts/test[{i}]", "prediction": json2token(ANSWER), "reference": json2token(TRUTH)}
            for i in range(n)]
    return sorted(rows, key=lambda r: r["record_id"])


def test_examples_save_the_images_and_print_truth_and_answer_as_json(tmp_path: Path) -> None:
    samples = [_sample(f"receipts/test[{i}]", (10 * i, 200, 30)) for i in range(12)]
    predictions = tmp_path / "predictions.jsonl"
    text = show_examples(_rows(12), samples, tmp_path / "examples", num=3, predictions_path=predictions)

    saved = sorted((tmp_path / "examples").iterdir())
    assert [p.name for p in saved] == [f"receipts_test_{i}.png" for i in range(3)]  # the first three in data order
    for i, path in enumerate(saved):
        with Image.open(path) as image:
            assert image.format == "PNG" and image.getpixel((0, 0)) == (10 * i, 200, 30)
        assert str(path) in text
    assert "3 of 12 records" in text and f"All predictions: {predictions}" in text
    # 3 of the truth's 6 fields are right: nm, price and subtotal_price (cnt, total_price wrong, unitprice missing).
    assert text.count("3 of 6 fields right") == 3
    assert 'total      truth  {"total_price": "30,000"}' in text and 'model  {"total_price": "33,000"}' in text
    assert not list(tmp_path.glob("examples/.*"))  # no temp files left behind


def test_examples_handle_plain_answers_missing_images_and_jsonl(tmp_path: Path) -> None:
    two = {"menu": [{"nm": "BAKSO", "cnt": "1"}, {"nm": "ES JERUK", "cnt": "2"}], "total": {"total_price": "38,000"}}
    one = {"menu": {"nm": "BAKSO", "cnt": "1"}, "total": {"total_price": "38,000"}}
    text = format_examples([Example("r/test[0]", None, two, one)])
    assert "r/test[0]: 3 of 5 fields right" in text and "image: (no image)" in text
    lines = text.splitlines()
    assert lines[4:8] == ['    menu[0]  truth  {"cnt": "1", "nm": "BAKSO"}',  # one pair of lines per menu item,
                          '             model  {"cnt": "1", "nm": "BAKSO"}',  # a single item (a dict) as item 0
                          '    menu[1]  truth  {"cnt": "2", "nm": "ES JERUK"}',
                          '             model  -']  # the item the answer lacks
    assert as_json("a red square") == "a red square"
    assert as_json(json2token(TRUTH)) == TRUTH
    rows = [{"record_id": "vqa/test[0]", "prediction": "red", "reference": "blue"}]
    examples = write_examples(rows, [], tmp_path / "ex")  # the sample (and so its image) is not there
    assert examples[0].image_path is None and not (tmp_path / "ex").exists()
    lines = [{"model": "base", **rows[0]}, {"model": "fine-tuned", **rows[0], "prediction": "blue"}]
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert [r["prediction"] for r in rows_of(path)] == ["blue"]
    assert [r["prediction"] for r in rows_of(path, "base")] == ["red"]


def _parses(root: Path, split: str, cache: Path) -> list[str]:
    import datasets

    rows = datasets.load_dataset(str(root), split=split, cache_dir=str(cache))["ground_truth"]
    return [json.dumps(json.loads(gt)["gt_parse"], sort_keys=True) for gt in rows]


def test_held_out_receipts_are_never_training_receipts(tmp_path: Path) -> None:
    """The demo's test score is on unseen receipts: with one shop's short menu, single-item receipts repeat often,
    so validation and test redraw any parse that training holds."""
    root = generate_synthetic_receipts(tmp_path / "r", num_train=300, num_validation=20, num_test=60, seed=0,
                                       image_size=(160, 160))
    train = set(_parses(root, "train", tmp_path / "c"))
    assert len(train) < 300  # training itself repeats receipts: the draw above is not vacuous
    held_out = _parses(root, "validation", tmp_path / "c") + _parses(root, "test", tmp_path / "c")
    assert not train & set(held_out)


def test_a_build_from_an_older_generator_is_rebuilt_not_reused(tmp_path: Path) -> None:
    """A cache left by an older version of the generator must not break or silently feed the demo."""
    root = generate_synthetic_receipts(tmp_path / "r", num_train=4, num_validation=2, num_test=2)
    marker = root / MARKER_NAME
    old = {**json.loads(marker.read_text()), "format": 1}
    marker.write_text(json.dumps(old))
    (root / "data" / "train-00000-of-00001.parquet").write_bytes(b"old")
    assert generate_synthetic_receipts(tmp_path / "r", num_train=4, num_validation=2, num_test=2) == root
    assert json.loads(marker.read_text())["format"] == FORMAT
    assert len(_parses(root, "train", tmp_path / "c")) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "r"]  # no temp or stale dirs left


SHORT_STEPS = 300  # of the demo's 1000: ~1 minute on one core


@pytest.mark.slow
def test_shortened_demo_reads_held_out_receipts_better_than_the_base_model(tmp_path: Path) -> None:
    """`make demo` in short: train the demo experiment, then score base and fine-tuned model on test receipts
    (never seen in training) and show examples (300 steps score ~0.6 TED and ~0.4 field F1 on one core)."""
    from conftest import compose
    from vlm_sweep.cli.evaluate import main as evaluate
    from vlm_sweep.inference.score import load_eval_samples
    from vlm_sweep.train import run

    data = [f"dataset.path={tmp_path / 'receipts'}", "dataset.synthetic.num_train=800",
            "dataset.synthetic.num_validation=4", "dataset.synthetic.num_test=16"]
    result = run(compose(["experiment=receipts_demo", *data, "tracking=none",
                          f"step_scheduler.max_steps={SHORT_STEPS}", f"step_scheduler.val_every_steps={SHORT_STEPS}",
                          f"step_scheduler.ckpt_every_steps={SHORT_STEPS}"]), tmp_path / "run")
    assert result.status == "FINISHED" and result.final_loss < 0.1 * result.first_loss

    out = tmp_path / "eval"
    assert evaluate(["--checkpoint", str(tmp_path / "run"), "--compare-base", "--output-dir", str(out),
                     "experiment=receipts_demo"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["dataset_path"], summary["split"], summary["num_samples"]) == (str(tmp_path / "receipts"),
                                                                                 "test", 16)
    base, tuned = summary["metrics"]["base"], summary["metrics"]["fine-tuned"]
    assert base == {"ted_accuracy": 0.0, "field_f1": 0.0}  # the untrained model emits no receipt fields
    # Reading, not just the answer's format: a model that never looks at the receipt gets ~0.2 field F1.
    assert tuned["ted_accuracy"] >= 0.5 and tuned["field_f1"] >= 0.3, tuned

    samples = load_eval_samples(compose(["experiment=receipts_demo", *data]).dataset, 2)
    examples = write_examples(rows_of(out / "predictions.jsonl"), samples, out / "examples")
    assert [e.record_id for e in examples] == [f"synthetic_receipts/test[{i}]" for i in range(3)]
    assert [e.image_path is not None for e in examples] == [True, True, False]  # images of the samples given
    with Image.open(examples[0].image_path) as image:
        assert image.size == (160, 160)
    assert all(isinstance(e.reference, dict) and "menu" in e.reference for e in examples)


def test_a_plain_answer_is_right_or_wrong_and_a_rambling_one_is_cut_short():
    """VQA answers are not receipts: no "0 of 1 fields right", and 2,000 characters of an untrained model's
    output do not flood the console (predictions.jsonl keeps them)."""
    from vlm_sweep.inference.examples import Example, format_examples

    examples = [Example("docvqa/heldout[0]", None, ["woman", "WOMAN"], "Woman"),
                Example("docvqa/heldout[1]", None, ["dog"], "x" * 2000)]
    text = format_examples(examples)
    assert "docvqa/heldout[0]: right" in text and "docvqa/heldout[1]: wrong" in text and "fields" not in text
    assert "... (2,002 characters)" in text and "x" * 400 not in text
