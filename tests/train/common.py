"""Shared by the multi-rank driver and the tests: a tiny config and fixed inputs."""
import torch

from albef_ds.config import load_config
from albef_ds.losses import mask_tokens

GLOBAL_BATCH = 8
VOCAB = 100


def tiny_overrides(world_size: int = 1) -> list[str]:
    per = GLOBAL_BATCH // world_size
    return [
        "model.image_res=32", "model.patch_size=8", "model.vision_width=32", "model.vision_depth=2",
        "model.vision_heads=2", "model.text_width=32", "model.text_depth=4", "model.fusion_layer=2",
        "model.text_heads=2", "model.text_intermediate=64", f"model.vocab_size={VOCAB}",
        "model.embed_dim=16", "model.queue_size=64", "model.hidden_dropout=0.0",
        "model.attention_dropout=0.0", f"train.micro_batch_size={per}", "train.precision=fp32",
        "distributed.ds_config=ds_configs/zero2_fp32.json",
    ]


def tiny_cfg(world_size: int = 1, extra: list[str] = ()):
    return load_config("tiny", tiny_overrides(world_size) + list(extra), world_size=world_size)


def fixed_inputs(cfg, seed: int = 0) -> dict:
    """A global batch; image ids repeat across the two halves (same image on both ranks)."""
    g = torch.Generator().manual_seed(seed)
    b, length, res = GLOBAL_BATCH, 12, cfg.model.image_res
    ids = torch.randint(5, VOCAB, (b, length), generator=g)
    ids[:, 0] = 2
    mask = torch.ones(b, length, dtype=torch.long)
    for i in range(b):
        cut = 6 + i % 5
        ids[i, cut:] = 0
        mask[i, cut:] = 0
    mlm_ids, mlm_labels = mask_tokens(ids, VOCAB, mask_token_id=4, pad_token_id=0, cls_token_id=2,
                                      probability=0.3, generator=g)
    image_ids = torch.tensor([10, 11, 12, 13, 10, 21, 22, 23])  # sample 4 shows sample 0's image
    images = torch.randn(b, 3, res, res, generator=g)
    images[4] = images[0]
    # Fixed ITM negatives as global indices: never the positive, never a same-image pair.
    # Meant for 2 ranks (4 rows each) and 4 ranks (2 rows each): a negative image of the
    # row's own rank (rows 2 and 6 at 2 ranks, row 6 at 4), image 7 drawn by two ranks
    # (rows 1 and 6) and images drawn twice (2 by rows 4 and 7, 6 by rows 0 and 3).
    neg_text = torch.tensor([5, 6, 7, 5, 1, 2, 3, 1])
    neg_image = torch.tensor([6, 7, 1, 6, 2, 3, 7, 2])
    return dict(images=images, ids=ids, mask=mask, mlm_ids=mlm_ids, mlm_labels=mlm_labels,
                image_ids=image_ids, neg_text=neg_text, neg_image=neg_image)
