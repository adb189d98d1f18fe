"""Launched by tests/train/test_distributed.py as
``albef_command(N, ["--out", DIR], module="tests.support.drivers.dist_driver")`` (N ranks).

One 2-rank launch serves several assertions (each process spends seconds importing torch
and DeepSpeed). Every rank writes what it saw to DIR/rank{r}.pt; the test compares with a
single-process computation.
"""
import argparse
import os

import torch

from albef_ds.config import load_config
from albef_ds.distributed import TRAFFIC, TorchGather, init_distributed, make_pool_gather
from albef_ds.models import ALBEF
from albef_ds.objectives.pretrain import albef_forward
from albef_ds.train.engines.deepspeed import DeepSpeedEngine as DeepSpeedBackend

from tests.support.retrieval import fake_io, fake_split
from tests.support.tiny import GLOBAL_BATCH, VOCAB, fixed_inputs, tiny_cfg, tiny_overrides


def local_slice(t, rank, world):
    per = t.shape[0] // world
    return t[rank * per:(rank + 1) * per]


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


class DetachedRemoteRows(TorchGather):
    """Mutation: the rows drawn from other ranks arrive without their graph."""

    def select_rows(self, tensor, index, kind="negatives_exchange"):
        got = super().select_rows(tensor.detach(), index, kind)
        rows = tensor.shape[0]
        own = (index // rows == self.rank).view(-1, *([1] * (tensor.dim() - 1)))
        return torch.where(own, tensor[index % rows], got)


class ScaledGrad(TorchGather):
    """Mutation: the exchanged rows' gradient scaled by ``factor`` (x W or / W)."""

    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def select_rows(self, tensor, index, kind="negatives_exchange"):
        return _ScaleGrad.apply(super().select_rows(tensor, index, kind), self.factor)


def itm_only_grads(cfg, local, neg_text, neg_image, gather, world):
    """Gradient of loss_itm alone on a plain model (no DeepSpeed), averaged over ranks by
    hand as data parallelism does; and the loss."""
    torch.manual_seed(0)
    plain = ALBEF(cfg.model)
    out = plain(albef_forward, local["images"], local["ids"], local["mask"], local["mlm_ids"], local["mlm_labels"],
                alpha=0.4, image_ids=local["image_ids"], gather=gather, itm_negatives=(neg_text, neg_image))
    out["loss_itm"].backward()
    grads = {"loss_itm": out["loss_itm"].detach()}
    for n, p in plain.named_parameters():
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            grads[n] = p.grad / world
    return grads


def traffic_per_step(cfg_overrides, rank, world, batch=4):
    """Bytes this rank receives through albef-ds's own collectives in one training forward
    and backward, micro-batch ``batch`` whatever the world size. Every negative is drawn
    from the next rank of the pool (the exchange's worst case; sampled draws make the count
    vary with the draws)."""
    cfg = load_config("tiny", [o for o in tiny_overrides(world) if "micro_batch_size" not in o]
                      + [f"train.micro_batch_size={batch}"] + cfg_overrides, world_size=world)
    torch.manual_seed(0)
    model = ALBEF(cfg.model)
    gather = make_pool_gather(cfg.pool_size(world))
    g = torch.Generator().manual_seed(100 + rank)
    res, n = cfg.model.image_res, 12
    ids = torch.randint(5, VOCAB, (batch, n), generator=g)
    mask = torch.ones(batch, n, dtype=torch.long)
    image_ids = torch.arange(batch) + 1000 * rank
    remote = ((gather.rank + 1) % gather.world_size) * batch + torch.arange(batch)
    TRAFFIC.take()
    out = model(albef_forward, torch.randn(batch, 3, res, res, generator=g), ids, mask, ids, torch.full_like(ids, -100),
                alpha=0.4, image_ids=image_ids, gather=gather, itm_negatives=(remote, remote))
    out["loss"].backward()
    return TRAFFIC.take()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    launch = init_distributed("gloo")
    rank, world = launch.rank, launch.world_size
    gather = TorchGather()
    cfg = tiny_cfg(world)
    result = {}

    # 1. Gradients after DeepSpeed's averaging (ZeRO-2, fp32) for fixed negatives and masks.
    torch.manual_seed(0)
    model = ALBEF(cfg.model)
    engine = DeepSpeedBackend(model, cfg, world, total_steps=10).engine
    inputs = fixed_inputs(cfg)
    local = {k: local_slice(v, rank, world) for k, v in inputs.items() if k not in ("neg_text", "neg_image")}
    count = gather.sum((local["mlm_labels"] != -100).sum().float())
    out = engine(albef_forward, local["images"], local["ids"], local["mask"], local["mlm_ids"], local["mlm_labels"],
                 alpha=0.4, image_ids=local["image_ids"], gather=gather,
                 itm_negatives=(local_slice(inputs["neg_text"], rank, world),
                                local_slice(inputs["neg_image"], rank, world)),
                 mlm_normalizer=count / world)
    engine.backward(out["loss"])
    from deepspeed.utils import safe_get_full_grad
    result["grads"] = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()
                       if p.requires_grad and safe_get_full_grad(p) is not None}
    result["losses"] = {k: out[k].detach() for k in ("loss_itc", "loss_itm", "loss_mlm")}
    result["image_queue"] = engine.module.image_queue.clone()
    result["text_queue"] = engine.module.text_queue.clone()
    result["queue_ptr"] = engine.module.queue_ptr.clone()
    result["image_feat_m_all"] = out["image_feat_m_all"].clone()

    # 1b. ITM alone through the gathered negatives, with the true gather and with mutations
    #     that the test must catch (the full loss's gradient hides the ITM path: ITC dominates).
    neg = (local_slice(inputs["neg_text"], rank, world), local_slice(inputs["neg_image"], rank, world))
    mutations = {"true": gather, "detached_remote_rows": DetachedRemoteRows(),
                 "grad_times_world": ScaledGrad(float(world)), "grad_over_world": ScaledGrad(1.0 / world)}
    result["itm_grads"] = {name: itm_only_grads(cfg, local, *neg, g, world) for name, g in mutations.items()}
    full_gather_cfg = tiny_cfg(world, ["model.itm_exchange=gather"])
    result["itm_grads"]["full_gather"] = itm_only_grads(full_gather_cfg, local, *neg, gather, world)

    # 1c. Bytes per rank per step through our own collectives, same micro-batch at any world.
    result["traffic"] = {
        "rows_pool2": traffic_per_step(["model.negative_pool=2"], rank, world),
        "rows_world": traffic_per_step([], rank, world),
        "gather_world": traffic_per_step(["model.itm_exchange=gather"], rank, world),
    }

    # 2. Global negatives reach the other rank's image encoder: rank 1's own loss is zeroed,
    #    rank 0's texts take their negative images from rank 1; a plain model, no averaging.
    torch.manual_seed(0)
    plain = ALBEF(cfg.model)
    per = GLOBAL_BATCH // world
    neg_image = torch.arange(per) + per  # rank 0's texts -> rank 1's images
    neg_text = (torch.arange(per) + 1) % per + rank * per
    out = plain(albef_forward, local["images"], local["ids"], local["mask"], local["mlm_ids"], local["mlm_labels"],
                alpha=0.0, image_ids=local["image_ids"], gather=gather, itm_negatives=(neg_text, neg_image))
    (out["loss_itm"] * (1.0 if rank == 0 else 0.0)).backward()
    grad = torch.cat([p.grad.reshape(-1) for p in plain.visual_encoder.parameters() if p.grad is not None])
    result["itm_only_visual_grad_norm"] = grad.norm()

    # 3. Sampled global negatives over many forwards: the indices drawn.
    texts, images = [], []
    gen = torch.Generator().manual_seed(rank)
    with torch.no_grad():
        for _ in range(25):
            out = plain(albef_forward, local["images"], local["ids"], local["mask"], local["mlm_ids"], local["mlm_labels"],
                        alpha=0.0, image_ids=local["image_ids"], gather=gather, generator=gen)
            texts.append(out["neg_text_idx"])
            images.append(out["neg_image_idx"])
    result["sampled_neg_text"] = torch.stack(texts)
    result["sampled_neg_image"] = torch.stack(images)

    # 4. Retrieval evaluation split over the two ranks (compared with one process).
    from albef_ds.eval.retrieval import evaluate

    def all_reduce(t):
        torch.distributed.all_reduce(t)
        return t
    torch.manual_seed(0)
    result["retrieval"] = evaluate(ALBEF(cfg.model), fake_split(), *fake_io(cfg.model.image_res, cfg.model.vocab_size),
                                   k_test=3, batch_size=2, rank=rank, world_size=world, all_reduce=all_reduce)
    torch.save(result, os.path.join(args.out, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
