"""Retrieval fine-tuning (ALBEF's Retrieval_flickr / Retrieval_coco): ITC + ITM, no MLM.

ITC positives are every candidate of the same image id (ids queued with the features) and
ITM negatives never share the row's image id (ALBEF_FACTS.md); evaluation is retrieval on
data.val_dir, after each epoch.
"""
from __future__ import annotations

from .pretrain import PretrainObjective


class RetrievalObjective(PretrainObjective):
    name = "retrieval"
    log_keys = ("loss", "loss_itc", "loss_itm", "itm_acc", "pos_sim", "neg_sim", "alpha")
    progress_keys = ("loss", "loss_itc", "loss_itm")
    config_overrides = ("model.itc_id_positives=true", "model.mlm=false")
    #: the reference's fine-tuned retrieval model: text encoder without .bert, no MLM head
    reference_layout = "retrieval"
