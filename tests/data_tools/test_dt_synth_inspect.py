"""synth is deterministic by seed (and by nothing else: not the worker count); its output
has the documented layout; inspect writes a PNG contact sheet."""
import hashlib
import json
import os
import shutil

import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

import tests.support.formats as F
from data_tools.cli import main


def synth(out, seed, workers=1, n=300):
    assert main(["synth", "--out", str(out), "--seed", str(seed), "--num-train", str(n), "--num-val", "6",
                 "--num-test", "10", "--captions-per-image", "5", "--image-size", "64",
                 "--workers", str(workers), "--no-progress"]) == 0


def fingerprint(out):
    """Hash of everything a consumer reads: pairs (key, image bytes, caption, image_id),
    the retrieval annotations, the eval images and captions.txt."""
    got, keys = F.read_dataset(str(out / "train"))
    h = hashlib.sha1(json.dumps(sorted(got.items())).encode())
    for name in ("val.json", "test.json", "captions.txt"):
        h.update((out / name).read_bytes())
    for img in sorted(os.listdir(out / "images")):
        h.update((out / "images" / img).read_bytes())
    return h.hexdigest()


def test_synth_deterministic_by_seed_and_layout(tmp_path):
    synth(tmp_path / "a", seed=7, workers=1)
    synth(tmp_path / "b", seed=7, workers=2)
    synth(tmp_path / "c", seed=8, workers=1)
    a = tmp_path / "a"
    assert fingerprint(a) == fingerprint(tmp_path / "b")
    assert fingerprint(a) != fingerprint(tmp_path / "c")

    # layout: MDS train with manifest and stats, retrieval JSON, images, captions.txt
    for f in ("train/index.json", "train/manifest.parquet", "train/stats.json", "val.json", "test.json",
              "captions.txt"):
        assert (a / f).exists(), f
    assert json.loads((a / "train" / "stats.json").read_text())["kept"] == 300
    test = json.loads((a / "test.json").read_text())
    assert len(test) == 10 and [e["image_id"] for e in test] == list(range(10))
    for e in test:
        assert len(e["caption"]) == 5 and len(set(e["caption"])) == 5  # distinct paraphrases
        im = Image.open(a / e["image"])
        assert im.size == (64, 64)
    assert len((a / "captions.txt").read_text().splitlines()) == 300
    m = pq.read_table(a / "train" / "manifest.parquet").to_pydict()
    assert len(set(m["image_id"])) == 300


def test_synth_captions_describe_the_picture(tmp_path):
    """Relations are true: in 'X to the left of Y' images, X's colour lies left of Y's."""
    from data_tools.synth import COLOURS, draw_example
    import io
    import numpy as np
    checked = 0
    for i in range(200):
        png, caps = draw_example(0, "train", i, 64)
        for c in caps:
            if " to the left of " not in c:
                continue
            left, right = c.split(" to the left of ")  # "a red circle" / "a blue square ..."
            lc, rc = left.split()[1], right.split()[1]
            if lc == rc:
                continue
            px = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)

            def mean_x(name):
                mask = np.abs(px - np.array(COLOURS[name])).sum(-1) < 30
                return np.nonzero(mask)[1].mean()
            assert mean_x(lc) < mean_x(rc), c
            checked += 1
    assert checked > 10


def test_inspect_writes_a_png(tmp_path, capsys):
    synth(tmp_path / "s", seed=1, n=40)
    png = tmp_path / "sheet.png"
    assert main(["inspect", str(tmp_path / "s" / "train"), "--png", str(png), "--samples", "12"]) == 0
    im = Image.open(png)
    assert im.format == "PNG" and im.width > 100 and im.height > 100
    out = capsys.readouterr().out
    assert "synth" in out and "caption length" in out


def _glyph(font, text):
    mask = font.getmask(text)
    return mask.size, bytes(mask)


def test_contact_sheet_draws_accented_letters_not_boxes(tmp_path, capsys):
    """The caption font has glyphs for accented letters (not its box for a missing one),
    and the contact sheet draws captions with exactly that font."""
    from data_tools.inspect_data import THUMB, caption_font
    font, path = caption_font()
    if path is None:
        pytest.skip("no TrueType font with accents here (DejaVuSans from matplotlib or the system)")
    box = _glyph(font, "\U0010fffd")  # a private-use code point no font draws: its .notdef box
    for ch in "éïÜöü":
        assert _glyph(font, ch) != box, ch
    assert _glyph(font, "é") != _glyph(font, "e")

    caption = "café naïve Ünïcödé"
    F.write_file(str(tmp_path / "img" / "a.png"), F.jpeg(1, fmt="PNG"))
    (tmp_path / "a.json").write_text(json.dumps([{"image": "img/a.png", "caption": caption}]))
    assert main(["convert", str(tmp_path / "a.json"), "--out", str(tmp_path / "ds"), "--no-progress"]) == 0
    png = tmp_path / "sheet.png"
    assert main(["inspect", str(tmp_path / "ds"), "--png", str(png), "--samples", "1"]) == 0
    assert "no TrueType font" not in capsys.readouterr().err
    sheet = Image.open(png).convert("RGB")
    y = 5 + THUMB + 2
    strip = (0, y, sheet.width, sheet.height)
    expected = Image.new("RGB", sheet.size, "white")
    ImageDraw.Draw(expected).text((5, y), caption, fill="black", font=font)
    assert expected.crop(strip).getextrema()[0][0] == 0  # the caption has dark pixels to compare
    assert sheet.crop(strip).tobytes() == expected.crop(strip).tobytes()


def _convert_one(tmp_path, caption):
    """A one-pair dataset whose caption is ``caption``."""
    F.write_file(str(tmp_path / "img" / "a.png"), F.jpeg(1, fmt="PNG"))
    (tmp_path / "a.json").write_text(json.dumps([{"image": "img/a.png", "caption": caption}]))
    assert main(["convert", str(tmp_path / "a.json"), "--out", str(tmp_path / "ds"), "--no-progress"]) == 0
    return tmp_path / "ds"


def _fontconfig_with(monkeypatch, tmp_path, font_dir):
    """fontconfig (fc-list) made to see only the fonts in ``font_dir``, whatever this machine has."""
    font_dir.mkdir(parents=True, exist_ok=True)
    conf = tmp_path / "fonts.conf"
    conf.write_text(f'<?xml version="1.0"?>\n<!DOCTYPE fontconfig SYSTEM "fonts.dtd">\n<fontconfig>'
                    f"<dir>{font_dir}</dir><cachedir>{tmp_path / 'fc-cache'}</cachedir></fontconfig>\n")
    monkeypatch.setenv("FONTCONFIG_FILE", str(conf))


def _font_with_blocks(path, chars):
    """A TrueType font (fontTools) that draws each of ``chars`` as a filled block of its own
    width, and nothing else."""
    from fontTools.fontBuilder import FontBuilder
    from fontTools.pens.ttGlyphPen import TTGlyphPen

    path.parent.mkdir(parents=True, exist_ok=True)
    names = [".notdef"] + [f"uni{ord(c):04X}" for c in chars]
    glyphs = {".notdef": TTGlyphPen(None).glyph()}
    for i, name in enumerate(names[1:]):
        pen = TTGlyphPen(None)
        right = 500 + 150 * i
        pen.moveTo((100, 0))
        pen.lineTo((100, 700))
        pen.lineTo((right, 700))
        pen.lineTo((right, 0))
        pen.closePath()
        glyphs[name] = pen.glyph()
    fb = FontBuilder(1000, isTTF=True)
    fb.setupGlyphOrder(names)
    fb.setupCharacterMap({ord(c): n for c, n in zip(chars, names[1:])})
    fb.setupGlyf(glyphs)
    fb.setupHorizontalMetrics({n: (1000, 100 if n != ".notdef" else 0) for n in names})
    fb.setupHorizontalHeader(ascent=800, descent=-200)
    fb.setupNameTable({"familyName": "Blocks Test", "styleName": "Regular"})
    fb.setupOS2(sTypoAscender=800, sTypoDescender=-200, usWinAscent=800, usWinDescent=200)
    fb.setupPost()
    fb.save(str(path))


def test_cjk_and_emoji_that_no_font_here_draws_are_named_with_how_to_add_one(tmp_path, capsys, monkeypatch):
    _fontconfig_with(monkeypatch, tmp_path, tmp_path / "no-fonts")  # no fallback to find
    ds = _convert_one(tmp_path, "a cat \U0001F600 中文 \U0001F363")  # DejaVuSans has 😀 but not 🍣
    assert main(["inspect", str(ds), "--png", str(tmp_path / "sheet.png"), "--samples", "1"]) == 0
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if "no font on this machine draws" in line]
    assert len(said) == 1, err
    assert "draws 中 文 \U0001F363 (3 characters, drawn as boxes): pass --font FILE" in said[0], said
    assert "fonts-noto-cjk" in said[0]


def test_cjk_caption_is_drawn_with_an_installed_font_that_has_it_not_as_boxes(tmp_path, capsys, monkeypatch):
    pytest.importorskip("fontTools.fontBuilder")
    if shutil.which("fc-list") is None:
        pytest.skip("no fontconfig (fc-list) here: installed fonts cannot be listed")
    from data_tools.fonts import NOTDEF_PROBE
    from data_tools.inspect_data import THUMB, caption_fonts

    _font_with_blocks(tmp_path / "installed" / "blocks.ttf", "中文")
    _fontconfig_with(monkeypatch, tmp_path, tmp_path / "installed")
    caption = "café 中文"
    ds = _convert_one(tmp_path, caption)
    png = tmp_path / "sheet.png"
    assert main(["inspect", str(ds), "--png", str(png), "--samples", "1"]) == 0
    assert "no font on this machine draws" not in capsys.readouterr().err

    chain, _ = caption_fonts()
    chain.cover([caption])
    default, fallback = chain.font_for("é"), chain.font_for("中")
    assert fallback is not default and chain.font_for("文") is fallback  # found through fontconfig
    lines = chain.wrap("中文" * 40, THUMB)  # no spaces: cut where a line reaches the thumbnail's width
    assert len(lines) > 1 and max(chain.length(line) for line in lines) <= THUMB
    assert _glyph(default, "中") == _glyph(default, NOTDEF_PROBE)      # the default's box ...
    assert _glyph(fallback, "中") != _glyph(fallback, NOTDEF_PROBE)    # ... not the fallback's
    # the sheet's caption is that: "café " in the default font, 中文 in the fallback
    sheet = Image.open(png).convert("RGB")
    y = 5 + THUMB + 2
    strip = (0, y, sheet.width, sheet.height)
    expected = Image.new("RGB", sheet.size, "white")
    chain.draw(ImageDraw.Draw(expected), (5, y), caption, fill="black")
    boxes = Image.new("RGB", sheet.size, "white")
    ImageDraw.Draw(boxes).text((5, y), caption, fill="black", font=default)
    assert sheet.crop(strip).tobytes() == expected.crop(strip).tobytes()
    assert sheet.crop(strip).tobytes() != boxes.crop(strip).tobytes()
