"""Synthetic CORD-v2 look-alike: hub schema, determinism, atomic/concurrent builds."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time

import pytest
from PIL import Image

from vlm_sweep.donut import json2token, parse_ground_truth, token2json
from vlm_sweep.data.synthetic_receipts import MARKER_NAME, generate_synthetic_receipts

COUNTS = {"train": 12, "validation": 4, "test": 5}


def _build(path, seed=0, **kw):
    return generate_synthetic_receipts(
        path, num_train=COUNTS["train"], num_validation=COUNTS["validation"], num_test=COUNTS["test"], seed=seed, **kw
    )


def _load(root, split, cache):
    import datasets

    return datasets.load_dataset(str(root), split=split, cache_dir=str(cache))


def _digest(root):
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_hub_layout_and_schema(tmp_path):
    import datasets

    root = _build(tmp_path / "cord", image_size=(200, 300))
    assert sorted(p.name for p in (root / "data").iterdir()) == [
        "test-00000-of-00001.parquet", "train-00000-of-00001.parquet", "validation-00000-of-00001.parquet"
    ]
    assert (root / MARKER_NAME).is_file()
    for split, count in COUNTS.items():
        ds = _load(root, split, tmp_path / "cache")
        assert len(ds) == count
        assert ds.features == datasets.Features({"image": datasets.Image(), "ground_truth": datasets.Value("string")})
        for i, row in enumerate(ds):
            assert isinstance(row["image"], Image.Image) and row["image"].size == (200, 300)
            gt = json.loads(row["ground_truth"])
            assert list(gt) == ["gt_parse", "meta", "valid_line", "roi", "repeating_symbol", "dontcare"]
            assert gt["meta"] == {
                "version": "2.0.0", "split": split, "image_id": i, "image_size": {"width": 200, "height": 300}
            }
            parse = parse_ground_truth(row["ground_truth"])[0]
            assert set(parse) == {"menu", "sub_total", "total"}
            assert "subtotal_price" in parse["sub_total"] and "total_price" in parse["total"]
            items = parse["menu"] if isinstance(parse["menu"], list) else [parse["menu"]]
            assert isinstance(parse["menu"], dict) == (len(items) == 1)  # CORD: one item is a dict
            for item in items:
                assert {"nm", "cnt", "price"} <= set(item) <= {"nm", "cnt", "price", "unitprice"}
            assert token2json(json2token(parse)) == parse
            categories = {line["category"] for line in gt["valid_line"]}
            assert {"menu.nm", "menu.cnt", "menu.price", "total.total_price"} <= categories


def test_prices_are_consistent(tmp_path):
    root = _build(tmp_path / "cord")
    ds = _load(root, "train", tmp_path / "cache")

    def num(s):
        return int(s.replace(",", ""))

    for gt in ds["ground_truth"]:
        parse = parse_ground_truth(gt)[0]
        items = parse["menu"] if isinstance(parse["menu"], list) else [parse["menu"]]
        for item in items:
            if "unitprice" in item:
                assert num(item["unitprice"]) * num(item["cnt"]) == num(item["price"])
        sub = parse["sub_total"]
        assert sum(num(i["price"]) for i in items) == num(sub["subtotal_price"])
        extra = sum(num(sub.get(k, "0")) for k in ("tax_price", "service_price"))
        assert num(parse["total"]["total_price"]) == num(sub["subtotal_price"]) + extra


def test_deterministic_for_a_seed(tmp_path):
    a, b, c = _build(tmp_path / "a", seed=5), _build(tmp_path / "b", seed=5), _build(tmp_path / "c", seed=6)
    assert _digest(a) == _digest(b)
    assert _load(a, "test", tmp_path / "ca")["ground_truth"] != _load(c, "test", tmp_path / "cc")["ground_truth"]


def test_reuses_complete_build_and_rejects_mismatch(tmp_path):
    root = _build(tmp_path / "cord")
    stamp = (root / MARKER_NAME).stat().st_mtime_ns
    time.sleep(0.01)
    assert _build(tmp_path / "cord") == root
    assert (root / MARKER_NAME).stat().st_mtime_ns == stamp  # not rebuilt
    with pytest.raises(ValueError, match="not the requested"):
        _build(tmp_path / "cord", seed=1)


def test_empty_dir_is_filled_but_foreign_dir_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    assert (_build(tmp_path / "empty") / MARKER_NAME).is_file()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        _build(foreign)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "foreign"]  # no temp dirs left


@pytest.mark.slow
def test_concurrent_builders_agree(tmp_path):
    target = tmp_path / "shared"
    code = (
        "import sys; from vlm_sweep.data.synthetic_receipts import generate_synthetic_receipts as g; "
        "print(g(sys.argv[1], num_train=24, num_validation=4, num_test=4, seed=9))"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE) for _ in range(4)]
    outs = [p.communicate(timeout=120)[0].decode().strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert set(outs) == {str(target.resolve())}
    assert [p.name for p in tmp_path.iterdir()] == ["shared"]
    assert len(_load(target, "train", tmp_path / "cache")) == 24
