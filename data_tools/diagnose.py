"""Why a conversion kept nothing: one message, from the reject counts and the sampled
rejects, naming the likely cause and what to do.

Typical causes: a URL list given before its images were downloaded (CC3M/CC12M/SBU as
distributed: ``albef-data download`` fetches them), image paths relative to another folder than ``--image-root``, or columns
chosen wrongly. The convert CLI prints the message and exits non-zero, so a pipeline
never goes on with an empty dataset.
"""
from __future__ import annotations

from collections import Counter

from data_tools.readers import looks_like_url

#: what to check when most rows were rejected for this reason
TIPS = {
    "missing_file": "image paths are relative to --image-root (default: the input file's folder); "
                    "check it and --image-col",
    "empty_image": "the image files are empty (an interrupted download?)",
    "corrupt_image": "the image files are not images PIL can decode (error pages saved as .jpg?)",
    "bad_caption": "the captions read are empty or not UTF-8: check --caption-col",
    "not_utf8": "the URL list holds bytes that are not UTF-8 there: re-encode it (e.g. iconv -f latin1 "
                "-t utf-8) to keep those rows",
    "malformed_row": "check --input-format, --caption-col/--image-col and --header/--no-header",
    "download_failed": "img2dataset recorded every download as failed: see its {shard}_stats.json",
    "excluded": "every image is in the --exclude sets",
}
URL_TIP = ("the image column holds URLs: download the images first with 'albef-data download LIST "
           "--out IMAGES' (img2dataset; pip install \"albef-ds[download]\"), then 'albef-data convert "
           "IMAGES --out SHARDS'")


def nothing_kept_message(stats: dict, rejects: list[dict], rejects_path: str) -> str | None:
    """None when something was kept; else the message. ``stats``: read / kept / skipped
    of the whole conversion (or of one array task's share); ``rejects``: sampled rejects."""
    if stats["kept"]:
        return None
    if not stats["read"]:
        return "read 0 rows: the inputs hold no samples (an empty file, tar or folder?)"
    skipped = Counter({r: n for r, n in stats["skipped"].items() if n})
    reason, count = skipped.most_common(1)[0]
    head = f"kept 0 of {stats['read']} rows (most: {reason}, {count} rows)"
    examples = [r["detail"] for r in rejects if r["reason"] == reason and r.get("detail")]
    if reason == "missing_file" and any(looks_like_url(d) for d in examples):
        tip = URL_TIP
    else:
        tip = TIPS.get(reason, "")
    example = f"; e.g. {examples[0][:160]!r}" if examples else ""
    return f"{head}: {tip}{example}; rejected rows are listed in {rejects_path}"
