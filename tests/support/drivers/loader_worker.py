"""One reader rank, run as a subprocess by the loader tests.

Env: RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT (gloo is initialised
when WORLD_SIZE > 1). Iterates one epoch of build_train_loader (or part of it, or the rest
after restoring a saved loader state) and saves, per batch, the keys and a checksum of
every image tensor to --out.
"""
import argparse
import json
import os

import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--res", type=int, default=32)
    p.add_argument("--save-state-at", type=int, default=None,
                   help="after this many batches, save the loader state to --state (and go on)")
    p.add_argument("--state", help="state file to write (with --save-state-at) or to resume from")
    p.add_argument("--decode-on", default="cpu", help="data.decode_on (the device path runs on the CPU here)")
    args = p.parse_args()

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)

    from albef_ds.config import Config
    from albef_ds.data import build_train_loader, load_loader_state, read_loader_state, save_loader_state
    from albef_ds.tokenizer import load_tokenizer

    cfg = Config()
    cfg.model.image_res = args.res
    cfg.data.train_dirs = [args.dir]
    cfg.data.num_workers = args.workers
    cfg.data.max_tokens = 16
    cfg.data.pin_memory = False
    cfg.data.flip_swaps_left_right = True
    cfg.train.micro_batch_size = args.batch
    cfg.data.decode_on = args.decode_on
    loader = build_train_loader(cfg, load_tokenizer(args.tokenizer), rank, world,
                                device="cpu" if args.decode_on == "device" else None)
    if args.state and args.save_state_at is None:
        load_loader_state(loader, read_loader_state(args.state))
    batches = []
    for i, b in enumerate(loader):
        # a per-sample checksum of the augmented image and its caption ids
        sums = (b["image"].double().flatten(1) * torch.arange(1, b["image"][0].numel() + 1,
                                                              dtype=torch.float64)).sum(1)
        batches.append({"keys": b["key"], "image_sums": sums.tolist(),
                        "text_ids": b["text_ids"].tolist(), "image_id": b["image_id"].tolist(),
                        "shapes": [list(b["image"].shape), list(b["text_ids"].shape)],
                        "dtypes": [str(b["image"].dtype), str(b["text_ids"].dtype),
                                   str(b["text_mask"].dtype), str(b["image_id"].dtype)],
                        "skipped": b["skipped"].tolist()})
        if args.save_state_at is not None and i + 1 == args.save_state_at and rank == 0:
            save_loader_state(loader, args.state)  # what a preempted job saves after this step
    with open(args.out, "w") as f:
        json.dump({"rank": rank, "batches": batches}, f)
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
