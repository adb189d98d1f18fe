"""``albef-data grounding-boxes``: the reference's RefCOCO+ evaluation files joined into the
layout ``albef-ds eval --task grounding`` reads.

The reference keeps boxes outside its JSON: ``refcoco+_{val,test}.json`` holds ``{image,
text, ref_id}``; the REFER toolkit's ``refs(unc).p`` maps each ref to its COCO annotation,
image and split (val / testA / testB); COCO's ``instances.json`` holds the annotation's
``bbox``; ``dets.json`` the detector's proposals per image (``[x, y, w, h, ...]``, the first
four used). Each output entry adds ``box``, ``proposals`` and ``split`` (the evaluation
reports accuracy per split). Entries whose ref, annotation or proposals are missing are
skipped, counted by reason and named.
"""
from __future__ import annotations

import json
import pickle
import sys
from collections import Counter
from pathlib import Path

from data_tools.readers import InputError


def _load_json(path: Path, what: str):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from e


def join_boxes(annotation: Path, refs_pickle: Path, instances: Path, dets: Path, out: Path) -> dict:
    entries = _load_json(annotation, "annotation file")
    with open(refs_pickle, "rb") as f:  # the REFER toolkit's own format (a trusted dataset file)
        refs = {r["ref_id"]: r for r in pickle.load(f)}
    coco = _load_json(instances, "COCO instances file")
    boxes = {a["id"]: a["bbox"] for a in coco["annotations"]}
    proposals = _load_json(dets, "detections file")
    kept, skipped, named = [], Counter(), []
    for i, e in enumerate(entries):
        ref = refs.get(e.get("ref_id"))
        reason = ("no_ref" if ref is None else "no_annotation" if ref["ann_id"] not in boxes
                  else "no_proposals" if not proposals.get(str(ref["image_id"])) else None)
        if reason:
            skipped[reason] += 1
            if len(named) < 5:
                named.append(f"entry {i} (ref_id {e.get('ref_id')!r}): {reason}")
            continue
        kept.append({**e, "box": [float(v) for v in boxes[ref["ann_id"]]], "split": ref["split"],
                     "proposals": [[float(v) for v in d[:4]] for d in proposals[str(ref["image_id"])]]})
    if not kept:
        raise InputError(f"{annotation}: no entry could be joined ({dict(skipped)}; {'; '.join(named)})")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(kept))
    line = f"grounding-boxes: {len(kept)} of {len(entries)} entries of {annotation} -> {out}"
    if skipped:
        line += f"; skipped {dict(skipped)} ({'; '.join(named)})"
    print(line, file=sys.stderr)
    return {"kept": len(kept), "skipped": dict(skipped)}
