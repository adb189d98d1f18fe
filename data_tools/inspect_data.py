"""``albef-data inspect DIR``: what is in a converted dataset.

Prints pairs per source, caption-length (words) and image-size (longer side) histograms
from ``manifest.parquet``, the skip counts, the rejects file and (for a download folder's
conversion) the URL list's lines accounted for from ``stats.json``, and draws a contact
sheet of randomly sampled pairs (image + caption) read back from the MDS shards, captions
drawn per character with the fonts of :mod:`data_tools.fonts`.
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
import random
import sys
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

from data_tools import rejects
from data_tools.fonts import FontChain

THUMB = 160          # contact-sheet cell image side, px
CAPTION_LINES = 4    # caption lines under each thumbnail
COLUMNS = 6
#: caption font size, px: about 26 characters of DejaVuSans fit under a thumbnail
FONT_SIZE = 10


def _font_candidates() -> list[str]:
    """TrueType fonts with accented letters, best first: matplotlib's bundled DejaVuSans
    (found without importing matplotlib), then DejaVuSans or Arial from the system font
    folders (ImageFont.truetype searches them for a bare file name)."""
    found = []
    spec = importlib.util.find_spec("matplotlib")
    if spec is not None and spec.submodule_search_locations:
        found.append(os.path.join(list(spec.submodule_search_locations)[0], "mpl-data", "fonts", "ttf",
                                  "DejaVuSans.ttf"))
    return found + ["DejaVuSans.ttf", "Arial.ttf", "arial.ttf"]


def caption_font(font_path: str | None = None, size: int = FONT_SIZE):
    """(font, its path or None). ``font_path`` first (an error if it does not load); None
    means Pillow's built-in font, which covers ASCII only (accents are drawn as boxes)."""
    if font_path is not None:
        return _load_given(font_path, size), font_path
    for candidate in _font_candidates():
        try:
            return ImageFont.truetype(candidate, size), candidate
        except OSError:
            continue
    return ImageFont.load_default(size=size), None


def _load_given(font_path: str, size: int):
    try:
        return ImageFont.truetype(font_path, size)
    except OSError as e:
        raise FileNotFoundError(f"--font {font_path}: cannot load it as a TrueType font ({e})") from e


def caption_fonts(font_paths: list[str] | str | None = None, size: int = FONT_SIZE) -> tuple[FontChain, str | None]:
    """The chain the captions are drawn with: each ``--font`` in order, then the default
    (DejaVuSans, else Pillow's font); and the default's path (None: Pillow's font)."""
    if isinstance(font_paths, str):
        font_paths = [font_paths]
    given = [_load_given(p, size) for p in font_paths or []]
    default, found = caption_font(None, size)
    return FontChain(given + [default], size), found


def _histogram(values, edges) -> list[tuple[str, int]]:
    counts, _ = np.histogram(values, bins=edges)
    labels = [f"{int(edges[i])}-{int(edges[i + 1]) - 1}" for i in range(len(edges) - 2)] + [f">={int(edges[-2])}"]
    return list(zip(labels, counts.tolist()))


def _bars(title: str, hist) -> str:
    top = max((c for _, c in hist), default=0) or 1
    lines = [title]
    for label, c in hist:
        lines.append(f"  {label:>10} {c:>9} {'#' * round(40 * c / top)}")
    return "\n".join(lines)


def summarise(dir_: str) -> dict:
    manifest = os.path.join(dir_, "manifest.parquet")
    if not os.path.exists(manifest):
        raise FileNotFoundError(f"no manifest.parquet in {dir_} (run `albef-data merge {dir_}`?)")
    t = pq.read_table(manifest, columns=["source", "caption", "width", "height", "bytes"]).to_pydict()
    words = [len(c.split()) for c in t["caption"]]
    sides = [max(w, h) for w, h in zip(t["width"], t["height"])]
    out = {"pairs": len(words), "per_source": dict(Counter(t["source"]).most_common()),
           "caption_words": _histogram(words, [0, 5, 10, 15, 20, 30, 50, 10**9]),
           "image_side": _histogram(sides, [0, 64, 128, 256, 384, 512, 1024, 10**9]),
           "mean_bytes": float(np.mean(t["bytes"])) if t["bytes"] else 0.0}
    stats_path = os.path.join(dir_, "stats.json")
    if os.path.exists(stats_path):
        with open(stats_path, encoding="utf-8") as f:
            out["stats"] = json.load(f)
    return out


def contact_sheet(dir_: str, png: str, samples: int = 24, seed: int = 0,
                  font_paths: list[str] | str | None = None) -> str:
    """Draw ``samples`` random pairs (read through streaming's reader) into one PNG;
    ``font_paths``: fonts tried before the default for each character (``--font``)."""
    from streaming import StreamingDataset

    ds = StreamingDataset(local=dir_, shuffle=False, batch_size=1)
    idx = sorted(random.Random(seed).sample(range(ds.num_samples), min(samples, ds.num_samples)))
    items = [ds.get_item(i) for i in idx]
    cols = min(COLUMNS, len(idx)) or 1
    rows = (len(idx) + cols - 1) // cols
    chain, found = caption_fonts(font_paths)
    if found is None and not font_paths:
        print("contact sheet: no TrueType font with accented letters found (DejaVuSans from "
              "matplotlib or the system); non-ASCII letters show as boxes: pass --font FILE.ttf",
              file=sys.stderr)
    chain.cover([s["caption"] for s in items])  # fonts for what the first ones lack, before the layout
    if (missing := chain.missing_message()) is not None:
        print(missing, file=sys.stderr)
    line_h = chain.line_height()
    cell_w, cell_h = THUMB + 10, THUMB + 10 + line_h * CAPTION_LINES
    sheet = Image.new("RGB", (cols * cell_w, max(rows, 1) * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for n, s in enumerate(items):
        x, y = (n % cols) * cell_w + 5, (n // cols) * cell_h + 5
        try:
            with Image.open(io.BytesIO(s["image"])) as im:
                im = im.convert("RGB")
                scale = THUMB / max(im.size)  # small images are enlarged (pixels kept sharp)
                im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                               Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BICUBIC)
                sheet.paste(im, (x + (THUMB - im.width) // 2, y + (THUMB - im.height) // 2))
        except Exception:
            chain.draw(draw, (x, y), "unreadable image", fill="red")
        for k, line in enumerate(chain.wrap(s["caption"], THUMB)[:CAPTION_LINES]):
            chain.draw(draw, (x, y + THUMB + 2 + k * line_h), line, fill="black")
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    sheet.save(png)
    return png


def inspect_dataset(dir_: str, png: str | None = None, samples: int = 24, seed: int = 0,
                    font_paths: list[str] | str | None = None) -> dict:
    if not os.path.isdir(dir_):
        raise FileNotFoundError(f"no such dataset folder: {dir_}")
    s = summarise(dir_)
    print(f"{dir_}: {s['pairs']} pairs, mean image {s['mean_bytes'] / 1024:.1f} KiB")
    print("pairs per source:")
    for src, n in s["per_source"].items():
        print(f"  {src:>20} {n:>9}")
    if "stats" in s:
        skipped = {k: v for k, v in s["stats"].get("skipped", {}).items() if v}
        print(f"read {s['stats'].get('read')}, kept {s['stats'].get('kept')}, skipped: "
              f"{', '.join(f'{k} {v}' for k, v in skipped.items()) or 'none'}")
        listed = s["stats"].get("rejects")
        if listed is not None:  # merged by this version: every reject, of every stage, in one file
            print(f"rejects: {listed['rows']} rows in {os.path.join(dir_, rejects.FILE_NAME)}"
                  + (f" ({rejects.count_text(listed['by_reason'])})" if listed["rows"] else ""))
        for url_list in s["stats"].get("url_lists", []):
            print(f"URL list {url_list['path']}: {url_list['accounting']}")
    print(_bars("caption length (words):", s["caption_words"]))
    print(_bars("image size (longer side, px):", s["image_side"]))
    png = png or os.path.join(dir_, "contact_sheet.png")
    contact_sheet(dir_, png, samples, seed, font_paths)
    print(f"contact sheet: {png}")
    s["png"] = png
    return s
