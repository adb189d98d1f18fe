"""Bytes each rank receives per step through albef-ds's own collectives (docs/benchmarks.md).

    deepspeed --num_gpus N docs/traffic.py          (N = 2, 4, 8; CPU ranks, gloo)

The tiny test model of tests/train (17 image tokens x 32 wide, fp32), 4 pairs per rank at
every world size, one training forward + backward per setting: sampled hard negatives
(mean over 5 steps), every negative on the next rank (each rank's rows drawn once), and
the hot rank (every other rank draws all its negatives from rank 0's rows: rank 0 sends
its B rows to P - 1 ranks and receives (P - 1) x B gradient rows back).
Rank 0 prints one line per setting: the mean and the maximum over ranks, and the per-kind
split of the mean.
"""
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "train"))
from common import VOCAB, tiny_overrides  # noqa: E402

from albef_ds.config import load_config  # noqa: E402
from albef_ds.distributed import TRAFFIC, init_distributed, make_pool_gather  # noqa: E402
from albef_ds.models import ALBEF  # noqa: E402
from albef_ds.objectives.pretrain import albef_forward  # noqa: E402

BATCH, STEPS = 4, 5


def measure(overrides, rank, world, draws):
    cfg = load_config("tiny", [o for o in tiny_overrides(2) if "micro_batch_size" not in o]
                      + [f"train.micro_batch_size={BATCH}"] + overrides, world_size=world)
    torch.manual_seed(0)
    model = ALBEF(cfg.model)
    gather = make_pool_gather(cfg.pool_size(world))
    g = torch.Generator().manual_seed(100 + rank)
    totals: dict = {}
    for _ in range(STEPS):
        ids = torch.randint(5, VOCAB, (BATCH, 12), generator=g)
        mask = torch.ones_like(ids)
        owner = (gather.rank + 1) % gather.world_size
        if draws == "hot":  # everyone draws rank 0's rows (rank 0 itself draws rank 1's)
            owner = 1 if gather.rank == 0 else 0
        remote = owner * BATCH + torch.arange(BATCH)
        TRAFFIC.take()
        out = model(albef_forward, torch.randn(BATCH, 3, 32, 32, generator=g), ids, mask, ids,
                    torch.full_like(ids, -100), alpha=0.4, image_ids=torch.arange(BATCH) + 1000 * rank,
                    gather=gather, generator=g,
                    itm_negatives=(remote, remote) if draws != "sampled" else None)
        out["loss"].backward()
        for k, v in TRAFFIC.take().items():
            totals[k] = totals.get(k, 0.0) + v / STEPS
    return totals


def main():
    launch = init_distributed("gloo")
    rank, world = launch.rank, launch.world_size
    settings = [("pool 2, rows", ["model.negative_pool=2"]), ("pool world, rows", []),
                ("pool world, full gather", ["model.itm_exchange=gather"])]
    for draws in ("sampled", "next rank", "hot"):
        for name, overrides in settings:
            if draws == "hot" and "gather" in name:
                continue
            mine = measure(overrides, rank, world, draws)
            every = [None] * world
            dist.all_gather_object(every, mine)
            if rank == 0:
                kinds = sorted({k for t in every for k in t})
                mean = {k: sum(t.get(k, 0.0) for t in every) / world for k in kinds}
                print(json.dumps({"world": world, "setting": name, "negatives": draws,
                                  "bytes_per_rank_per_step": round(sum(mean.values())),
                                  "max_over_ranks": round(max(sum(t.values()) for t in every)),
                                  "max_rank_by_kind": {k: round(v) for k, v in
                                                       max(every, key=lambda t: sum(t.values())).items()},
                                  "by_kind": {k: round(v) for k, v in mean.items()}}))


if __name__ == "__main__":
    main()
