"""Tiny synthetic CORD-v2 look-alike, for CI and smoke runs without the hub.

The output directory is laid out like ``naver-clova-ix/cord-v2`` on the hub
(``data/{split}-00000-of-00001.parquet`` with ``image`` / ``ground_truth``
columns), so ``datasets.load_dataset(str(path), split=...)`` and the real-data
code path are exercised unchanged.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

MARKER_NAME = ".complete.json"  # written last; hidden so datasets ignores it
SPLITS = ("train", "validation", "test")

_ITEMS = [
    "NASI GORENG", "MIE AYAM", "ES TEH MANIS", "KOPI SUSU", "AYAM BAKAR", "SATE AYAM",
    "BAKSO", "GADO GADO", "TAHU GORENG", "ES JERUK", "SOTO BETAWI", "NASI UDUK",
    "PISANG GORENG", "AIR MINERAL", "RENDANG", "CAP CAY", "TEH TARIK", "ROTI BAKAR",
]
_SHOPS = ["WARUNG MAKAN SEDERHANA", "KEDAI KOPI 88", "RUMAH MAKAN PADANG", "CAFE SENJA", "BAKMI JAYA"]


def _fmt(amount: int) -> str:
    """Indonesian receipt style: ``75000`` -> ``"75,000"``."""
    return f"{amount:,}"


def _make_parse(rng: random.Random, max_items: int = 5) -> dict[str, Any]:
    """Random, arithmetically consistent receipt parse in CORD's key names."""
    menu = []
    for name in rng.sample(_ITEMS, rng.randint(1, max(1, max_items))):
        cnt = rng.randint(1, 4)
        unit = rng.randrange(5_000, 80_000, 500)
        item = {"nm": name, "cnt": str(cnt), "price": _fmt(cnt * unit)}
        if cnt > 1 or rng.random() < 0.3:
            item["unitprice"] = _fmt(unit)
        menu.append((item, cnt * unit))
    subtotal = sum(amount for _, amount in menu)
    sub_total = {"subtotal_price": _fmt(subtotal)}
    total_amount = subtotal
    if rng.random() < 0.5:
        tax = subtotal // 10
        sub_total["tax_price"] = _fmt(tax)
        total_amount += tax
    if rng.random() < 0.3:
        service = subtotal * 5 // 100
        sub_total["service_price"] = _fmt(service)
        total_amount += service
    total = {"total_price": _fmt(total_amount)}
    if rng.random() < 0.5:
        cash = -(-total_amount // 50_000) * 50_000 + rng.choice([0, 50_000])
        total["cashprice"] = _fmt(cash)
        total["changeprice"] = _fmt(cash - total_amount)
    items = [item for item, _ in menu]
    # CORD stores a single menu item as a dict, several as a list.
    return {"menu": items[0] if len(items) == 1 else items, "sub_total": sub_total, "total": total}


def _quad(box: tuple[float, float, float, float]) -> dict[str, int]:
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    return {"x1": x1, "y1": y1, "x2": x2, "y2": y1, "x3": x2, "y3": y2, "x4": x1, "y4": y2}


class _Painter:
    """Draws text lines and records them as CORD ``valid_line`` entries."""

    def __init__(self, size: tuple[int, int], rng: random.Random) -> None:
        self.width, self.height = size
        shade = rng.randint(238, 255)
        self.image = Image.new("RGB", size, (shade, shade, shade - rng.randint(0, 12)))
        self.draw = ImageDraw.Draw(self.image)
        self.font = ImageFont.load_default()
        self.line_h = int(self.font.getbbox("Ag")[3]) + 3
        self.margin = max(4, self.width // 24)
        self.y = self.margin + rng.randint(0, 4)
        self.valid_line: list[dict[str, Any]] = []
        self.group_id = 0

    def _words(self, text: str, x: float, category: str, is_key: int, row: int) -> None:
        words = []
        for word in text.split():
            pos = text.index(word)
            text = text[:pos] + " " * len(word) + text[pos + len(word):]  # don't re-find this word
            wx = x + self.draw.textlength(text[:pos], font=self.font)
            box = self.draw.textbbox((wx, self.y), word, font=self.font)
            words.append({"quad": _quad(box), "is_key": is_key, "row_id": row, "text": word})
        self.valid_line.append(
            {"words": words, "category": category, "group_id": self.group_id, "sub_group_id": 0}
        )

    def put(self, text: str, category: str | None, align: str = "left", is_key: int = 0, indent: int = 0) -> None:
        if align == "left":
            x = self.margin + indent
        elif align == "right":
            x = self.width - self.margin - self.draw.textlength(text, font=self.font)
        else:
            x = (self.width - self.draw.textlength(text, font=self.font)) / 2
        self.draw.text((x, self.y), text, fill=(20, 20, 20), font=self.font)
        if category is not None:
            self._words(text, x, category, is_key, row=self.y // self.line_h)

    def newline(self, n: float = 1.0) -> None:
        self.y += int(self.line_h * n)

    def rule(self) -> None:
        self.put("-" * 80, None)
        self.newline()


def _render(parse: dict[str, Any], size: tuple[int, int], rng: random.Random) -> tuple[Image.Image, list]:
    """Draw the receipt; returns the image and its CORD-style ``valid_line``."""
    p = _Painter(size, rng)
    p.put(rng.choice(_SHOPS), None, align="center")
    p.newline(1.5)
    p.rule()
    menu = parse["menu"] if isinstance(parse["menu"], list) else [parse["menu"]]
    indent = 3 * p.line_h // 2
    for item in menu:
        p.group_id += 1
        p.put(item["cnt"], "menu.cnt")
        p.put(item["nm"], "menu.nm", indent=indent)
        p.put(item["price"], "menu.price", align="right")
        p.newline()
        if "unitprice" in item:
            p.put(item["unitprice"], "menu.unitprice", indent=indent)
            p.newline()
    p.rule()
    labels = {
        "subtotal_price": "SUBTOTAL", "tax_price": "TAX 10%", "service_price": "SERVICE 5%",
        "total_price": "TOTAL", "cashprice": "CASH", "changeprice": "CHANGE",
    }
    for section in ("sub_total", "total"):
        for key, value in parse[section].items():
            p.group_id += 1
            p.put(labels[key], f"{section}.{key}", is_key=1)
            p.put(value, f"{section}.{key}", align="right")
            p.newline()
        p.newline(0.5)
    p.put("TERIMA KASIH", None, align="center")
    return p.image, p.valid_line


def _max_items(size: tuple[int, int]) -> int:
    """Menu items that fit (2 lines each worst case) besides ~12 fixed lines, so no text is cut off."""
    line_h = int(ImageFont.load_default().getbbox("Ag")[3]) + 3
    lines = (size[1] - 2 * max(4, size[0] // 24) - 4) // line_h
    return max(1, min(5, (lines - 12) // 2))


def _record(seed: int, split: str, index: int, size: tuple[int, int]) -> dict[str, Any]:
    # Seeded per (seed, split, index): changing one split's size leaves the others alone.
    rng = random.Random(f"{seed}/{split}/{index}")
    parse = _make_parse(rng, _max_items(size))
    image, valid_line = _render(parse, size, rng)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    ground_truth = {
        "gt_parse": parse,
        "meta": {
            "version": "2.0.0",
            "split": split,
            "image_id": index,
            "image_size": {"width": size[0], "height": size[1]},
        },
        "valid_line": valid_line,
        "roi": {},
        "repeating_symbol": [],
        "dontcare": [],
    }
    return {"image": {"bytes": buf.getvalue(), "path": None}, "ground_truth": json.dumps(ground_truth)}


def _write_split(root: Path, split: str, records: list[dict[str, Any]]) -> None:
    from datasets import Dataset, Features, Image as ImageFeature, Value
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    features = Features({"image": ImageFeature(), "ground_truth": Value("string")})
    columns = {"image": [r["image"] for r in records], "ground_truth": [r["ground_truth"] for r in records]}
    path = root / "data" / f"{split}-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    quiet = are_progress_bars_disabled()
    disable_progress_bars()  # one bar per tiny split is just noise
    try:
        Dataset.from_dict(columns, features=features).to_parquet(str(path))
    finally:
        if not quiet:
            enable_progress_bars()


def generate_synthetic_receipts(
    output_dir: str | os.PathLike,
    num_train: int = 64,
    num_validation: int = 16,
    num_test: int = 16,
    seed: int = 0,
    image_size: tuple[int, int] = (256, 384),
) -> Path:
    """Build (or reuse) a synthetic CORD-v2 dataset directory and return its path.

    ``image_size`` is (width, height); receipts hold 1-5 menu items, fewer
    when the height cannot fit five (below ~330 px), and text is drawn with
    ``ImageFont.load_default()`` (legible from ~200 px wide). The build goes to a temp dir next to
    ``output_dir`` and is renamed into place with the marker already inside, so
    readers never see a partial build and concurrent callers are safe: the
    loser of the rename race discards its copy. A complete build made with
    different parameters raises ``ValueError`` rather than being silently reused.
    """
    out = Path(output_dir).resolve()
    params = {
        "num_train": num_train, "num_validation": num_validation, "num_test": num_test,
        "seed": seed, "image_size": [int(image_size[0]), int(image_size[1])], "format": 1,
    }
    if any(n < 0 for n in (num_train, num_validation, num_test)):
        raise ValueError(f"split sizes must be >= 0, got {params}")
    if _complete(out, params):
        return out

    size = (params["image_size"][0], params["image_size"][1])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the renamed build should be shareable
        counts = {"train": num_train, "validation": num_validation, "test": num_test}
        for split in SPLITS:
            _write_split(tmp, split, [_record(seed, split, i, size) for i in range(counts[split])])
        (tmp / MARKER_NAME).write_text(json.dumps(params, sort_keys=True))
        try:
            os.rename(tmp, out)  # atomic; also replaces an empty directory
        except OSError:
            if _complete(out, params):  # another process won the race
                return out
            raise FileExistsError(f"{out} exists and is not a complete synthetic receipts build; remove it")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _complete(out: Path, params: dict[str, Any]) -> bool:
    """True if ``out`` holds a finished build with ``params``; raise if other params."""
    marker = out / MARKER_NAME
    if not marker.is_file():
        return False
    found = json.loads(marker.read_text())
    if found != params:
        raise ValueError(f"{out} holds a synthetic build with {found}, not the requested {params}")
    return True
