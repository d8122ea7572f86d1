"""Synthetic CORD-v2 look-alike, for the demo, CI and smoke runs without the hub.

The output directory is laid out like ``naver-clova-ix/cord-v2`` on the hub
(``data/{split}-00000-of-00001.parquet`` with ``image`` / ``ground_truth``
columns), so ``datasets.load_dataset(str(path), split=...)`` and the real-data
code path are exercised unchanged.

The receipts are made to be *readable* by a small model trained for minutes: one shop's
price list (a fixed unit price per item, as on a real menu), caps and digits in a font
scaled to the image width (~24 characters per line, so a receipt drawn at the processor's own
resolution is legible without resampling: 12 px type at 160 px), and one line per field.
Validation and test receipts never repeat a training receipt's parse.
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

from vlm_sweep.rundir import install_build

MARKER_NAME = ".complete.json"  # written last; hidden so datasets ignores it
SPLITS = ("train", "validation", "test")
FORMAT = 3  # bump when the output for the same parameters changes: older builds are then rebuilt

# One shop's price list (IDR): a receipt's unit prices come from here, as on a real menu. Eight dishes
# with distinct initials and prices: a model trained for minutes learns to tell them apart.
MENU = {
    "AYAM BAKAR": 32_000, "BAKSO": 20_000, "ES JERUK": 9_000, "GADO GADO": 22_000,
    "KOPI SUSU": 15_000, "MIE AYAM": 18_000, "NASI GORENG": 25_000, "TEH TARIK": 11_500,
}
_SHOPS = ["WARUNG SEDERHANA", "KEDAI KOPI 88", "RM PADANG", "CAFE SENJA", "BAKMI JAYA"]
_LABELS = {
    "subtotal_price": "SUBTOTAL", "tax_price": "TAX 10%", "service_price": "SERVICE 5%",
    "total_price": "TOTAL", "cashprice": "CASH", "changeprice": "CHANGE",
}
_WIDTH_IN_FONT_SIZES = 13.5  # font size = image width / this: ~24 characters of caps and digits per line
_MIN_LINES = 5  # shop name, one item, subtotal, total and the two half-line gaps


def _fmt(amount: int) -> str:
    """Indonesian receipt style: ``75000`` -> ``"75,000"``."""
    return f"{amount:,}"


def _draw_parse(rng: random.Random, max_items: int) -> dict[str, Any]:
    """One random, arithmetically consistent receipt parse in CORD's key names."""
    menu = []
    for name in rng.sample(sorted(MENU), rng.randint(1, max(1, min(max_items, len(MENU))))):
        cnt, unit = rng.randint(1, 3), MENU[name]
        item = {"nm": name, "cnt": str(cnt), "price": _fmt(cnt * unit)}
        if cnt > 1:  # CORD receipts print the unit price for multi-quantity lines
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


def _menu_items(parse: dict[str, Any]) -> list[dict[str, Any]]:
    return parse["menu"] if isinstance(parse["menu"], list) else [parse["menu"]]


def _lines(parse: dict[str, Any]) -> float:
    """Text lines the receipt takes: shop name, one per field line, two half-line gaps."""
    items = _menu_items(parse)
    return 1 + len(items) + sum("unitprice" in i for i in items) + len(parse["sub_total"]) + len(parse["total"]) + 1


def _make_parse(rng: random.Random, max_items: int = 5, max_lines: float | None = None) -> dict[str, Any]:
    """Random receipt parse with 1..``max_items`` items that fits in ``max_lines`` lines (redrawn until it does)."""
    if max_lines is not None and max_lines < _MIN_LINES:
        raise ValueError(f"a receipt needs {_MIN_LINES} lines, not {max_lines}")
    while True:
        parse = _draw_parse(rng, max_items)
        if max_lines is None or _lines(parse) <= max_lines:
            return parse


def _font(width: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font scaled to the width (the fixed bitmap font where FreeType is missing)."""
    return ImageFont.load_default(size=max(8, round(width / _WIDTH_IN_FONT_SIZES)))


def _geometry(size: tuple[int, int]) -> tuple[Any, int, int, int]:
    """(font, line height, margin, lines that fit) for an image of ``size``."""
    font = _font(size[0])
    line_h = int(font.getbbox("0AQ@%,")[3]) + 2  # caps and digits only: no descender room needed
    margin = max(3, size[0] // 40)
    return font, line_h, margin, (size[1] - 2 * margin) // line_h


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
        self.font, self.line_h, self.margin, _ = _geometry(size)
        self.y = self.margin
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

    def put(self, text: str, category: str | None, align: str = "left", is_key: int = 0, indent: float = 0,
            prefix: str = "") -> None:
        """Draw ``prefix + text`` on the current line; ``text`` alone is the field's words (``@`` is not a price)."""
        drawn = prefix + text
        if align == "left":
            x = self.margin + indent
        elif align == "right":
            x = self.width - self.margin - self.draw.textlength(drawn, font=self.font)
        else:
            x = (self.width - self.draw.textlength(drawn, font=self.font)) / 2
        self.draw.text((x, self.y), drawn, fill=(20, 20, 20), font=self.font)
        if category is not None:
            x += self.draw.textlength(prefix, font=self.font)
            self._words(text, x, category, is_key, row=self.y // self.line_h)

    def newline(self, n: float = 1.0) -> None:
        self.y += int(self.line_h * n)

    def rule(self) -> None:
        """A dashed rule in half a line (drawn, not text: it is no field)."""
        y = self.y + self.line_h // 4
        for x in range(self.margin, self.width - self.margin, 4):
            self.draw.line([(x, y), (x + 1, y)], fill=(90, 90, 90))
        self.newline(0.5)


def _render(parse: dict[str, Any], size: tuple[int, int], rng: random.Random) -> tuple[Image.Image, list]:
    """Draw the receipt; returns the image and its CORD-style ``valid_line``."""
    p = _Painter(size, rng)
    p.put(rng.choice(_SHOPS), None, align="center")
    p.newline()
    p.rule()
    indent = p.draw.textlength("3 ", font=p.font)
    for item in _menu_items(parse):
        p.group_id += 1
        p.put(item["cnt"], "menu.cnt")
        p.put(item["nm"], "menu.nm", indent=indent)
        p.put(item["price"], "menu.price", align="right")
        p.newline()
        if "unitprice" in item:
            p.put(item["unitprice"], "menu.unitprice", indent=indent, prefix="@")
            p.newline()
    p.rule()
    for section in ("sub_total", "total"):
        for key, value in parse[section].items():
            p.group_id += 1
            p.put(_LABELS[key], f"{section}.{key}", is_key=1)
            p.put(value, f"{section}.{key}", align="right")
            p.newline()
    return p.image, p.valid_line


def _max_items(size: tuple[int, int]) -> int:
    """Menu items that fit with the shortest summary (subtotal and total), at most 5."""
    lines = _geometry(size)[3]
    if lines < _MIN_LINES:
        raise ValueError(f"image_size {list(size)} is too small for a receipt (fits {lines} lines, needs {_MIN_LINES})")
    return max(1, min(5, lines - 4))


def _draw_record(seed: int, split: str, index: int, size: tuple[int, int],
                 seen: set[str]) -> tuple[dict[str, Any], random.Random]:
    """The record's parse and the RNG to render it with; redrawn while its parse is in ``seen``."""
    lines = _geometry(size)[3]
    for attempt in range(1000):
        # Seeded per (seed, split, index): changing one split's size leaves the others alone
        # (except that validation/test redraw a parse that training holds).
        rng = random.Random(f"{seed}/{split}/{index}" + (f"/{attempt}" if attempt else ""))
        parse = _make_parse(rng, _max_items(size), max_lines=lines)
        if json.dumps(parse, sort_keys=True) not in seen:
            return parse, rng
    raise ValueError(f"cannot draw a {split} receipt unseen in training; use fewer training receipts")


def _record(parse: dict[str, Any], rng: random.Random, split: str, index: int,
            size: tuple[int, int]) -> dict[str, Any]:
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


def _split_records(seed: int, counts: dict[str, int], size: tuple[int, int]) -> dict[str, list[dict[str, Any]]]:
    """Every split's records; no validation or test parse equals a training parse (an honest held-out split)."""
    seen: set[str] = set()
    records: dict[str, list[dict[str, Any]]] = {}
    for split in SPLITS:  # train first
        records[split] = []
        for index in range(counts[split]):
            parse, rng = _draw_record(seed, split, index, size, seen if split != "train" else set())
            records[split].append(_record(parse, rng, split, index, size))
            if split == "train":
                seen.add(json.dumps(parse, sort_keys=True))
    return records


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

    ``image_size`` is (width, height); receipts hold 1-5 menu items, fewer when the
    height cannot fit them (the text scales with the width). The build goes to a temp
    dir next to ``output_dir`` and is renamed into place with the marker already inside,
    so readers never see a partial build and concurrent callers are safe: the loser of
    the rename race discards its copy. A complete build made with different parameters
    raises ``ValueError`` rather than being silently reused; one made by an older
    version of this generator (``FORMAT``) is rebuilt.
    """
    out = Path(output_dir).resolve()
    params = {
        "num_train": num_train, "num_validation": num_validation, "num_test": num_test,
        "seed": seed, "image_size": [int(image_size[0]), int(image_size[1])], "format": FORMAT,
    }
    if any(n < 0 for n in (num_train, num_validation, num_test)):
        raise ValueError(f"split sizes must be >= 0, got {params}")
    if _state(out, params) == "current":
        return out

    size = (params["image_size"][0], params["image_size"][1])
    _max_items(size)  # too small an image: one line, before anything is written
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the renamed build should be shareable
        counts = {"train": num_train, "validation": num_validation, "test": num_test}
        for split, records in _split_records(seed, counts, size).items():
            _write_split(tmp, split, records)
        (tmp / MARKER_NAME).write_text(json.dumps(params, sort_keys=True))
        install_build(tmp, out, lambda path: _state(path, params),
                      f"{out} exists and is not a complete synthetic receipts build; remove it")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _state(out: Path, params: dict[str, Any]) -> str:
    """'current' (a finished build with ``params``), 'stale' (an older FORMAT's) or 'absent'; raise if other params."""
    marker = out / MARKER_NAME
    if not marker.is_file():
        return "absent"
    found = json.loads(marker.read_text())
    if {k: v for k, v in found.items() if k != "format"} != {k: v for k, v in params.items() if k != "format"}:
        raise ValueError(f"{out} holds a synthetic build with {found}, not the requested {params}")
    return "current" if found.get("format") == params["format"] else "stale"
