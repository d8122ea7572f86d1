"""Every PIL image mode reaches the model as the RGB a person sees: transparency on white, 16-bit scaled."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import compose
from vlm_sweep.data.media import open_image, to_rgb


def _rgb(image: Image.Image) -> list:
    converted = to_rgb(image)
    assert converted.mode == "RGB" and converted.size == image.size
    return [tuple(int(v) for v in px) for px in np.asarray(converted).reshape(-1, 3)]


def _row(mode: str, values: list) -> Image.Image:
    """A 1-row image of ``mode`` holding ``values`` (one per pixel)."""
    image = Image.new(mode, (len(values), 1))
    for x, value in enumerate(values):
        image.putpixel((x, 0), value)
    return image


def _palette(mode: str = "P") -> Image.Image:
    image = Image.new(mode, (3, 1))
    image.putpalette([255, 0, 0, 10, 20, 30, 0, 0, 255] + [0] * (256 - 3) * 3)
    return image


# ---------------------------------------------------------------- 8-bit modes, no transparency


def test_1_l_and_rgb():
    assert _rgb(_row("1", [0, 1])) == [(0, 0, 0), (255, 255, 255)]
    assert _rgb(_row("L", [0, 77, 255])) == [(0, 0, 0), (77, 77, 77), (255, 255, 255)]
    assert _rgb(_row("RGB", [(1, 2, 3)])) == [(1, 2, 3)]


def test_p():
    image = _palette()
    for x, index in enumerate((1, 0, 2)):
        image.putpixel((x, 0), index)
    assert _rgb(image) == [(10, 20, 30), (255, 0, 0), (0, 0, 255)]


def test_cmyk():
    assert _rgb(_row("CMYK", [(0, 0, 0, 0), (0, 0, 0, 255), (255, 0, 0, 0)])) == \
        [(255, 255, 255), (0, 0, 0), (0, 255, 255)]


def test_ycbcr():
    colours = [(255, 0, 0), (0, 128, 0), (250, 250, 250)]
    ycbcr = _row("RGB", colours).convert("YCbCr")
    assert ycbcr.mode == "YCbCr"
    for got, want in zip(_rgb(ycbcr), colours):
        assert max(abs(g - w) for g, w in zip(got, want)) <= 3, (got, want)


# ---------------------------------------------------------------- transparency: composited on white


def test_rgba_black_ink_on_a_transparent_page_stays_readable():
    page = _row("RGBA", [(0, 0, 0, 0), (0, 0, 0, 255), (200, 0, 0, 128)])
    white, ink, half = _rgb(page)
    assert white == (255, 255, 255) and ink == (0, 0, 0)
    # 50 % red over white: 200 * 128/255 + 255 * 127/255 = 227, 255 * 127/255 = 127.
    assert max(abs(g - w) for g, w in zip(half, (227, 127, 127))) <= 1, half


def test_la():
    assert _rgb(_row("LA", [(0, 0), (0, 255), (0, 128)])) == [(255, 255, 255), (0, 0, 0), (127, 127, 127)]


def test_pa():
    image = _palette("PA")
    for x, pixel in enumerate(((1, 255), (0, 0), (2, 255))):
        image.putpixel((x, 0), pixel)
    assert _rgb(image) == [(10, 20, 30), (255, 255, 255), (0, 0, 255)]


def test_p_with_a_transparent_palette_entry():
    image = _palette()
    for x, index in enumerate((1, 0, 2)):
        image.putpixel((x, 0), index)
    image.info["transparency"] = 0  # palette entry 0 (red) is transparent, as a GIF/PNG tRNS says
    assert _rgb(image) == [(10, 20, 30), (255, 255, 255), (0, 0, 255)]


# ---------------------------------------------------------------- 16/32-bit and float: scaled to 8 bits


def test_i16_is_scaled_not_clipped():
    image = _row("I;16", [0, 257 * 100, 65535, 200])
    assert image.mode == "I;16"
    assert _rgb(image) == [(0, 0, 0), (100, 100, 100), (255, 255, 255), (1, 1, 1)]


def test_i_within_16_bits_is_16_bit_else_stretched():
    assert _rgb(_row("I", [0, 257 * 40, 65535])) == [(0, 0, 0), (40, 40, 40), (255, 255, 255)]
    assert _rgb(_row("I", [-100, 99_900, 199_900])) == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_f_is_0_to_1_when_it_fits_else_0_to_255():
    assert _rgb(_row("F", [0.0, 0.5, 1.0])) == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]
    assert _rgb(_row("F", [-3.0, 77.0, 300.0])) == [(0, 0, 0), (77, 77, 77), (255, 255, 255)]


# ---------------------------------------------------------------- every way an image comes in


def _png(image: Image.Image, path: Path) -> Path:
    image.save(path, format="PNG")
    return path


def _gradient16() -> Image.Image:
    """A 16-bit greyscale gradient 0..65535: what a scanner or a medical export writes."""
    return Image.fromarray((np.arange(256, dtype=np.uint32) * 257).astype(np.uint16).reshape(16, 16))


def test_open_image_on_16_bit_and_transparent_pngs(tmp_path):
    grey = open_image(_png(_gradient16(), tmp_path / "grey16.png"))
    assert np.array_equal(np.asarray(grey)[..., 0].ravel(), np.arange(256))
    document = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    document.putpixel((3, 3), (0, 0, 0, 255))
    pixels = np.asarray(open_image(_png(document, tmp_path / "doc.png")))
    assert (pixels == 255).sum() == 63 * 3 and pixels[3, 3].tolist() == [0, 0, 0]


def test_custom_records_and_hub_image_columns_use_the_same_conversion(tmp_path, monkeypatch):
    import datasets

    from vlm_sweep.data.datasets import ConversationDataset, build_datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    _png(_gradient16(), tmp_path / "grey16.png")
    _png(Image.new("RGBA", (4, 4), (0, 0, 0, 0)), tmp_path / "clear.png")
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "image": name},
                                                        {"type": "text", "text": "q"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "a"}]}]}
            for name in ("grey16.png", "clear.png")]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = compose(["dataset=custom", f"dataset.path={data}", "dataset.carve_val_fraction=null",
                   "dataset.val_split=null"]).dataset
    train = build_datasets(cfg)["train"]
    grey, clear = (train[i].conversation[0]["content"][0]["image"] for i in range(2))
    assert np.array_equal(np.asarray(grey)[..., 0].ravel(), np.arange(256))
    assert (np.asarray(clear) == 255).all()

    # An image column (decoded by datasets, as for hub data sets) goes through the same conversion.
    buf = io.BytesIO()
    _gradient16().save(buf, format="PNG")
    features = datasets.Features({"image_id": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    split = datasets.Dataset.from_dict({"image_id": [{"bytes": buf.getvalue(), "path": None}],
                                        "question": ["q"], "answer": ["a"]}, features=features)
    medpix = compose(["dataset=medpix_vqa", f"dataset.path={tmp_path / 'none'}"]).dataset
    image = ConversationDataset(split, medpix, "train")[0].conversation[0]["content"][0]["image"]
    assert image.mode == "RGB" and np.array_equal(np.asarray(image)[..., 0].ravel(), np.arange(256))


@pytest.mark.parametrize("mode", ["1", "L", "P", "PA", "LA", "RGBA", "I;16", "I", "F", "CMYK", "YCbCr", "RGB"])
def test_every_mode_converts_to_rgb(mode):
    assert to_rgb(Image.new(mode, (3, 2))).mode == "RGB"
