"""Pairs per CPU-core-second of the two image pipelines (docs/data_speed.md)::

    python -m albef_ds.data.speed [--device cpu|cuda] [--res 256] [--batch 64] [--samples 512]

In one process with one torch thread, on the same encoded JPEGs, it times what each path
does per sample: ``cpu`` (data.decode_on: cpu) is the worker's PIL decode + TrainTransform;
``device`` is the worker's share (header, AugPlan, bytes to a tensor) plus the main
process's finish_batch on ``--device``; ``worker`` is that worker's share alone (what the
loader workers still pay per sample when the rest runs on a GPU). CPU time is the process's (time.process_time), so
a GPU run reports the host cores the device path still costs; wall time gives the rate.
Nothing of the tokenizer, streaming or the DataLoader is timed: both paths share them (and
this module imports neither streaming nor DeepSpeed, which a bare GPU image may lack).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import time

import torch
from PIL import Image

from albef_ds.data.collate import device_plan
from albef_ds.data.device_transforms import DeviceTrainTransform, finish_batch
from albef_ds.data.transforms import TrainTransform, sample_rng

#: real photographs shipped with matplotlib and scikit-learn (600x512, 640x427, 640x427)
PHOTOS = (("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
          ("sklearn", "datasets/images/china.jpg"), ("sklearn", "datasets/images/flower.jpg"))


def photos() -> list[bytes]:
    """The photos found, re-encoded as JPEG quality 95 (what data_tools stores)."""
    import importlib
    out = []
    for package, rel in PHOTOS:
        try:
            path = os.path.join(os.path.dirname(importlib.import_module(package).__file__), rel)
        except ImportError:
            continue
        buf = io.BytesIO()
        Image.open(path).convert("RGB").save(buf, format="JPEG", quality=95)
        out.append(buf.getvalue())
    if not out:
        raise FileNotFoundError("no sample photo found (needs matplotlib or scikit-learn installed)")
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(path: str, blobs: list[bytes], transform: TrainTransform, samples: int, batch: int,
            device: torch.device) -> dict:
    dev_t = DeviceTrainTransform(transform.res, transform.m)
    t_cpu, t_wall = time.process_time(), time.perf_counter()
    for start in range(0, samples, batch):
        idx = range(start, min(start + batch, samples))
        if path == "cpu":
            for i in idx:  # PairDataset._load + the transform, as a loader worker runs them
                with Image.open(io.BytesIO(blobs[i % len(blobs)])) as im:
                    im.load()
                    img = im.convert("RGB")
                transform(img, sample_rng(0, 0, i))
            continue
        items = []
        for i in idx:  # the worker's share: header, plan, bytes
            raw = blobs[i % len(blobs)]
            with Image.open(io.BytesIO(raw)) as im:
                size = im.size
            items.append({"image_bytes": torch.frombuffer(bytearray(raw), dtype=torch.uint8),
                          "aug": transform.plan(*size, sample_rng(0, 0, i))})
        collated = {**device_plan(items), "skipped": torch.zeros(len(items), dtype=torch.int64)}
        if path == "device":
            finish_batch(collated, dev_t, device)
    _sync(device)
    cpu, wall = time.process_time() - t_cpu, time.perf_counter() - t_wall
    return {"path": path, "device": str(device) if path == "device" else "cpu", "samples": samples,
            "cpu_s": round(cpu, 3), "wall_s": round(wall, 3),
            "pairs_per_cpu_s": round(samples / cpu, 1), "pairs_per_wall_s": round(samples / wall, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m albef_ds.data.speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="where the device path runs (cpu, cuda)")
    p.add_argument("--res", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--crop-scale-min", type=float, default=0.5)
    p.add_argument("--no-randaugment", action="store_true")
    p.add_argument("--paths", default="cpu,device,worker", help="comma-separated: cpu, device, worker")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # per core: a loader worker is one thread
    device = torch.device(args.device)
    blobs = photos()
    transform = TrainTransform(args.res, args.crop_scale_min, not args.no_randaugment, 2, 7)
    for path in args.paths.split(","):
        if path not in ("cpu", "device", "worker"):
            p.error(f"--paths: unknown path {path!r} (cpu, device, worker)")
        measure(path, blobs, transform, min(args.batch, args.samples), args.batch, device)  # warm-up
        r = measure(path, blobs, transform, args.samples, args.batch, device)
        r.update(res=args.res, batch=args.batch, randaugment=not args.no_randaugment,
                 torch_threads=torch.get_num_threads())
        print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
