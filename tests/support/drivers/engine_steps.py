"""``python -m tests.support.drivers.engine_steps --out FILE --data D --tok T --steps N
[--set KEY=VALUE ...]`` on every rank: the Trainer on the configured engine
(``distributed.engine``) for N optimizer steps of the synth data, no checkpoint. Rank 0
writes FILE (torch.save): each step's loss on every rank (``losses[step][rank]``), the
temperature, and after step 1 and the last step the whole fp32 online weights and EMA
master (gathered from every rank's local shards)."""
import argparse
import math

import torch
import torch.distributed as dist

from albef_ds import distributed as dist_lib
from albef_ds.config import load_config
from albef_ds.tokenizer import load_tokenizer
from albef_ds.train.trainer import Trainer, make_objective


def whole(engine, p) -> torch.Tensor:
    """The whole fp32 value of parameter ``p`` (every rank calls it)."""
    if hasattr(p, "full_tensor"):
        return p.full_tensor().detach().float().clone()
    if hasattr(p, "ds_id"):
        import deepspeed  # (a test driver: the library's own fitness test does not scan tests/)
        with deepspeed.zero.GatheredParameters([p]):
            return p.detach().float().clone()
    return p.detach().float().clone()


def ema_master(trainer) -> dict:
    """Name -> the whole fp32 EMA master, joined from every rank's pieces."""
    ema = trainer.ema
    ema._ensure_master()
    mine = {n: (off, m.reshape(-1).clone()) for n, m, k, off in
            zip(ema.names, ema.master, ema.kinds, ema.offsets) if k == "partition"}
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    out = {}
    for name, m, kind, shape in zip(ema.names, ema.master, ema.kinds, ema.shapes):
        if kind == "full":
            out[name] = m.reshape(shape).clone()
            continue
        flat = torch.zeros(math.prod(shape), dtype=m.dtype)
        for piece in parts:
            off, t = piece[name]
            n = max(0, min(t.numel(), flat.numel() - off))
            flat[off:off + n] = t[:n]
        out[name] = flat.reshape(shape)
    return out


def snapshot(trainer) -> dict:
    return {"online": {n: whole(trainer.engine, p) for n, p in trainer.module.named_parameters()
                       if p.requires_grad},
            "ema": ema_master(trainer)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--tok", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    launch = dist_lib.init_distributed("gloo")
    world = launch.world_size
    cfg = load_config("tiny", [f"data.train_dirs=[{args.data}/train]", f"data.tokenizer={args.tok}",
                               f"train.max_steps={args.steps}", f"train.micro_batch_size={16 // world}",
                               "train.lr=1e-3", "train.warmup_steps=2", "model.momentum=0.9",
                               "model.vision_depth=2", "model.text_depth=2", "model.fusion_layer=1",
                               f"logging.run_dir={args.run_dir}", *args.set], world_size=world)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    cfg.model.vocab_size = len(tokenizer)
    objective = make_objective(cfg, tokenizer)
    loader = objective.make_loader(cfg, launch.rank, world, launch.local_world_size, launch.local_rank,
                                   args.run_dir)
    trainer = Trainer(cfg, launch, objective, total_steps=args.steps, steps_per_epoch=args.steps,
                      log=lambda *a, **k: None)
    result = {"losses": {}, "temp": {}, "describe": trainer.engine.describe(), "before": snapshot(trainer)}
    batches = iter(loader)
    while trainer.step < args.steps:
        out, stepped = trainer.train_step(next(batches))
        losses = [None] * world
        dist.all_gather_object(losses, float(out["loss"].detach()))
        if stepped:
            result["losses"][trainer.step] = losses
            result["temp"][trainer.step] = trainer.engine.scalar(trainer.module.temp)
            if trainer.step in (1, args.steps):
                result[f"after_{trainer.step}"] = snapshot(trainer)
    if launch.rank == 0:
        torch.save(result, args.out)
    dist.barrier()
    trainer.engine.release_local(launch)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
