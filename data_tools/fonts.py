"""Fonts for the captions of ``albef-data inspect``'s contact sheet, tried per character.

No one font draws every script: DejaVuSans (the default) has Latin, Greek and Cyrillic
but no CJK, and draws a character it lacks as its ``.notdef`` box. A :class:`FontChain`
holds the fonts given with ``--font`` (in order), then the default, then, for each
character that none of those has, an installed font that fontconfig says covers it
(``fc-list``: Noto CJK, Droid Sans Fallback, WenQuanYi, ... whatever the machine has).
Each run of characters is drawn with the first font of the chain that has them; the
characters no font has are collected (:attr:`FontChain.missing`) so the caller can name
them instead of leaving silent boxes.

A font "has" a character when it draws it differently from a code point no font has
(:data:`NOTDEF_PROBE`), i.e. not as its ``.notdef`` box: Pillow has no call that asks the
font's character map, and this needs nothing beyond Pillow.
"""
from __future__ import annotations

import bisect
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

from PIL import ImageFont

#: a private-use code point (plane 16) that no font draws: what a font draws for it is its .notdef
NOTDEF_PROBE = "\U0010fffd"
#: seconds fc-list may take to list the installed fonts (it reads its cache: well under one)
FC_LIST_TIMEOUT = 20
#: what the missing-character line suggests installing for CJK (Debian/Ubuntu package)
CJK_PACKAGE_HINT = "Noto Sans CJK: apt-get install fonts-noto-cjk"
#: line height of Pillow's bitmap font (what load_default gives without FreeType), px
BITMAP_LINE_HEIGHT = 12
#: characters named in the missing-character line before "and N more"
MISSING_SHOWN = 20
#: fontconfig styles other than the upright regular one (a fallback should look like the rest)
_SLANTED_OR_BOLD = re.compile(r"bold|italic|oblique|light|thin|black|heavy|condensed", re.IGNORECASE)


@dataclass
class InstalledFont:
    """One face fontconfig lists: its file, index in a collection (.ttc) and code points."""
    path: str
    index: int
    regular: bool
    ranges: list[tuple[int, int]] = field(repr=False)

    def covers(self, codepoint: int) -> bool:
        """Whether ``codepoint`` is in one of the (sorted, disjoint) ranges."""
        k = bisect.bisect_right(self.ranges, (codepoint, sys.maxunicode + 1)) - 1
        return k >= 0 and self.ranges[k][0] <= codepoint <= self.ranges[k][1]


def installed_fonts() -> list[InstalledFont]:
    """Every face fontconfig knows (``fc-list``), upright regular ones first; [] without
    fontconfig. Its charset field lists the code points as hex ranges (``20-7e a0 ...``)."""
    fc_list = shutil.which("fc-list")
    if fc_list is None:
        return []
    try:
        listing = subprocess.run([fc_list, "--format", "%{file}|%{index}|%{style}|%{charset}\\n"],
                                 capture_output=True, text=True, timeout=FC_LIST_TIMEOUT, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    fonts = []
    for row in listing.splitlines():
        parts = row.split("|")
        if len(parts) != 4 or not parts[0]:
            continue
        path, index, style, charset = parts
        ranges = []
        for item in charset.split():
            lo, _, hi = item.partition("-")
            try:
                ranges.append((int(lo, 16), int(hi or lo, 16)))
            except ValueError:
                continue
        fonts.append(InstalledFont(path, int(index) if index.isdigit() else 0,
                                   not _SLANTED_OR_BOLD.search(style), sorted(ranges)))
    return sorted(fonts, key=lambda f: (not f.regular, f.path, f.index))


class FontChain:
    """Fonts tried in order for each character; :meth:`draw` draws a line with them."""

    def __init__(self, fonts: list, size: int):
        self.fonts = list(fonts)       # Pillow fonts, the first is the one for what none has
        self.size = size
        self.missing: set[str] = set()  # characters no font of the chain draws
        self._has: dict[tuple[int, str], bool] = {}
        self._notdef = [f.getmask(NOTDEF_PROBE) for f in self.fonts]
        self._installed: list[InstalledFont] | None = None  # listed on the first need
        self._added: set[tuple[str, int]] = set()

    # ------------------------------------------------------------------ coverage
    def has(self, k: int, ch: str) -> bool:
        """Whether font ``k`` of the chain draws ``ch`` as itself, not as its .notdef box."""
        if ch.isspace():
            return True
        key = (k, ch)
        if key not in self._has:
            mask, notdef = self.fonts[k].getmask(ch), self._notdef[k]
            self._has[key] = mask.size != notdef.size or bytes(mask) != bytes(notdef)
        return self._has[key]

    def cover(self, texts) -> None:
        """Add an installed font for each character of ``texts`` that no font of the chain
        has (one ``fc-list`` call, at most); what none has goes into :attr:`missing`."""
        for ch in sorted({ch for t in texts for ch in t}):
            if any(self.has(k, ch) for k in range(len(self.fonts))):
                continue
            if not self._add_installed(ch):
                self.missing.add(ch)

    def _add_installed(self, ch: str) -> bool:
        if self._installed is None:
            self._installed = installed_fonts()
        for face in self._installed:
            if (face.path, face.index) in self._added or not face.covers(ord(ch)):
                continue
            self._added.add((face.path, face.index))
            try:  # a colour bitmap font (Noto Color Emoji) loads at its own sizes only
                font = ImageFont.truetype(face.path, self.size, index=face.index)
            except OSError:
                continue
            self.fonts.append(font)
            self._notdef.append(font.getmask(NOTDEF_PROBE))
            if self.has(len(self.fonts) - 1, ch):
                return True
        return False

    def font_for(self, ch: str):
        """The first font of the chain that has ``ch``; the first font when none has it."""
        for k in range(len(self.fonts)):
            if self.has(k, ch):
                return self.fonts[k]
        return self.fonts[0]

    # ------------------------------------------------------------------ drawing
    def runs(self, text: str) -> list[tuple[str, object]]:
        """``text`` cut into runs of characters drawn with one font each."""
        runs: list[tuple[str, object]] = []
        for ch in text:
            font = self.font_for(ch)
            if runs and runs[-1][1] is font:
                runs[-1] = (runs[-1][0] + ch, font)
            else:
                runs.append((ch, font))
        return runs

    def length(self, text: str) -> float:
        return sum(font.getlength(run) for run, font in self.runs(text))

    def ascent(self) -> int:
        return max(_metrics(f)[0] for f in self.fonts)

    def line_height(self) -> int:
        return max(sum(_metrics(f)) for f in self.fonts)

    def draw(self, draw, xy: tuple[float, float], text: str, fill) -> None:
        """Draw one line with its top at ``xy``: each run in its font, on a common baseline."""
        x, y = xy
        baseline = y + self.ascent()
        for run, font in self.runs(text):
            if hasattr(font, "getmetrics"):
                draw.text((x, baseline), run, fill=fill, font=font, anchor="ls")
            else:  # Pillow's bitmap font takes no anchor: its top left only
                draw.text((x, y), run, fill=fill, font=font)
            x += font.getlength(run)

    def wrap(self, text: str, width: float) -> list[str]:
        """Lines of at most ``width`` pixels: broken at spaces, and inside a word only when
        it is wider than a line (CJK text has no spaces)."""
        lines, line = [], ""
        for word in text.split():
            candidate = f"{line} {word}" if line else word
            if self.length(candidate) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            line = ""
            for ch in word:  # a word wider than the line is cut where it reaches the edge
                if line and self.length(line + ch) > width:
                    lines.append(line)
                    line = ""
                line += ch
        if line:
            lines.append(line)
        return lines

    def missing_message(self) -> str | None:
        """One line naming the characters no font here draws, and how to supply one."""
        if not self.missing:
            return None
        chars = sorted(self.missing)
        shown = " ".join(chars[:MISSING_SHOWN]) + (f" and {len(chars) - MISSING_SHOWN} more"
                                                    if len(chars) > MISSING_SHOWN else "")
        return (f"contact sheet: no font on this machine draws {shown} ({len(chars)} character"
                f"{'s' if len(chars) != 1 else ''}, drawn as boxes): pass --font FILE (.ttf/.otf/.ttc) "
                f"with a font that has them, or install one fontconfig finds ({CJK_PACKAGE_HINT})")


def _metrics(font) -> tuple[int, int]:
    """(ascent, descent) of a TrueType font; Pillow's bitmap font has no metrics: its line."""
    if hasattr(font, "getmetrics"):
        return font.getmetrics()
    return BITMAP_LINE_HEIGHT, 0
