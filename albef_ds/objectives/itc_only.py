"""ITC alone (CLIP-style, with ALBEF's momentum distillation and queue): the smallest
objective, and the example of adding one (this file plus a line in OBJECTIVES)."""
from __future__ import annotations

from . import itc
from .base import Objective, StepContext, alpha_at, images_and_texts


class ITCOnlyObjective(Objective):
    name = "itc"
    log_keys = ("loss", "pos_sim", "neg_sim", "alpha")

    def prepare(self, batch: dict, ctx: StepContext) -> dict:
        inputs = images_and_texts(batch, ctx)
        inputs.update(alpha=alpha_at(ctx.step, ctx.steps_per_epoch, self.cfg.model.alpha,
                                     self.cfg.train.alpha_ramp_epochs), gather=ctx.gather)
        return inputs

    def compute(self, model, images, text_ids, text_mask, image_ids, alpha, gather) -> dict:
        enc = itc.encode(model, images, text_ids, text_mask, image_ids, gather)
        out = itc.contrastive(model, enc, image_ids, alpha, gather)
        out["loss"] = out.pop("loss_itc")
        out["alpha"] = out["loss"].new_tensor(alpha)
        return out
