"""Word-swapped ITM negatives (model.itm_swap_negatives): the swap itself against a brute
force enumeration, the loss on them against a plain forward, the config and vocabulary
errors a user meets."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from albef_ds.config import ConfigError, load_config
from albef_ds.objectives.itm import swap_groups, swap_words

# token ids of a made-up vocabulary: 5-7 colours (group 0), 8-9 shapes (group 1)
GROUP_OF = torch.full((20,), -1, dtype=torch.long)
GROUP_OF[5:8], GROUP_OF[8:10] = 0, 1
RED, BLUE, GREEN, CIRCLE, SQUARE, A, LEFT, PAD = 5, 6, 7, 8, 9, 1, 2, 0


def valid_swaps(row: list[int]) -> set[tuple[int, int]]:
    """Brute force: every pair of positions holding different words of one group."""
    return {(i, j) for i, j in itertools.combinations(range(len(row)), 2)
            if GROUP_OF[row[i]] >= 0 and GROUP_OF[row[i]] == GROUP_OF[row[j]] and row[i] != row[j]}


def transposition(before: list[int], after: list[int]) -> tuple[int, int] | None:
    changed = [i for i, (x, y) in enumerate(zip(before, after)) if x != y]
    if not changed:
        return None
    i, j = changed
    assert (after[i], after[j]) == (before[j], before[i]), (before, after)
    return i, j


ROWS = [
    [A, RED, CIRCLE, LEFT, A, BLUE, SQUARE, PAD],    # a colour pair and a shape pair: 2 swaps
    [A, RED, CIRCLE, LEFT, A, RED, SQUARE, PAD],     # the colours equal: only the shapes swap
    [A, RED, CIRCLE, PAD, PAD, PAD, PAD, PAD],       # one word per group: no swap
    [RED, BLUE, GREEN, LEFT, PAD, PAD, PAD, PAD],    # three colours: 3 swaps
]


def test_every_swap_is_a_valid_transposition_and_all_are_drawn():
    ids = torch.tensor(ROWS)
    seen = [set() for _ in ROWS]
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        swapped, rows = swap_words(ids, GROUP_OF, 1.0, g)
        for r, (before, after) in enumerate(zip(ids.tolist(), swapped.tolist())):
            t = transposition(before, after)
            assert (t is not None) == bool(rows[r]) == bool(valid_swaps(before))
            if t is not None:
                assert t in valid_swaps(before)
                seen[r].add(t)
    assert seen == [valid_swaps(r) for r in ROWS]  # no valid swap is never drawn


def test_the_share_picks_rows_and_zero_picks_none():
    ids = torch.tensor([ROWS[0]] * 400)
    g = torch.Generator().manual_seed(1)
    assert not swap_words(ids, GROUP_OF, 0.0, g)[1].any()
    share = swap_words(ids, GROUP_OF, 0.25, g)[1].float().mean().item()
    assert 0.18 < share < 0.32, share  # 400 Bernoulli(0.25) draws: 4.6 sigma either side


def test_the_same_generator_state_draws_the_same_swaps():
    ids = torch.tensor(ROWS * 8)
    a = swap_words(ids, GROUP_OF, 0.5, torch.Generator().manual_seed(3))
    b = swap_words(ids, GROUP_OF, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_the_swapped_negatives_loss_is_cross_entropy_over_the_plain_fusion_of_the_swapped_caption():
    """Every row swapped: the negative-text third of the ITM batch is (own image, swapped
    caption). Recomputed here from the model's parts, not through matching()."""
    from albef_ds.models import ALBEF
    from albef_ds.objectives.pretrain import albef_forward
    cfg = load_config("tiny", ["model.vision_depth=1", "model.text_depth=2", "model.fusion_layer=1",
                               "model.queue_size=0", "model.hidden_dropout=0", "model.attention_dropout=0",
                               "model.mlm=false"])
    torch.manual_seed(0)
    model = ALBEF(cfg.model).eval()
    bs = 4
    g = torch.Generator().manual_seed(0)
    images = torch.randn(bs, 3, cfg.model.image_res, cfg.model.image_res, generator=g)
    text_ids = torch.tensor(ROWS[:1] * bs)
    text_mask = (text_ids != PAD).long()
    swap_ids, rows = swap_words(text_ids, GROUP_OF, 1.0, torch.Generator().manual_seed(0))
    assert rows.all()
    neg_image, neg_text = torch.tensor([1, 2, 3, 0]), torch.tensor([3, 0, 1, 2])
    out = albef_forward(model, images, text_ids, text_mask, itm_negatives=(neg_text, neg_image),
                        image_ids=torch.arange(bs), itm_swap=(swap_ids, rows))
    with torch.no_grad():
        image_embeds, text_embeds = model.encode_image(images), model.encode_text(text_ids, text_mask)
        swapped_embeds = model.encode_text(swap_ids, text_mask)
        logits = torch.cat([model.itm_logits(model.fuse(text_embeds, text_mask, image_embeds=image_embeds)),
                            model.itm_logits(model.fuse(text_embeds, text_mask, image_embeds=image_embeds[neg_image])),
                            model.itm_logits(model.fuse(swapped_embeds, text_mask, image_embeds=image_embeds))])
    labels = torch.tensor([1] * bs + [0] * 2 * bs)
    torch.testing.assert_close(out["loss_itm"].detach(), F.cross_entropy(logits, labels), rtol=1e-6, atol=0)
    want_acc = (logits[2 * bs:].argmax(1) == 0).float().mean()
    assert out["itm_swap_acc"].item() == pytest.approx(want_acc.item())
    # without the swap the third part is the batch's own negative text: a different loss
    plain = albef_forward(model, images, text_ids, text_mask, itm_negatives=(neg_text, neg_image),
                          image_ids=torch.arange(bs))
    assert "itm_swap_acc" not in plain
    assert not torch.equal(plain["loss_itm"], out["loss_itm"])


class WordTokenizer:
    """Whitespace words; 'redblue' is two tokens, as a word outside a WordPiece vocab is."""
    vocab = {"red": 5, "blue": 6, "circle": 8, "square": 9}

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [5, 6] if text == "redblue" else [self.vocab[w] for w in text.split()]}

    def convert_ids_to_tokens(self, ids):
        return [f"tok{i}" for i in ids]


def test_the_groups_map_token_ids_and_bad_words_are_named():
    group_of = swap_groups(WordTokenizer(), [["red", "blue"], ["circle", "square"]], 20)
    assert group_of[[5, 6, 8, 9]].tolist() == [0, 0, 1, 1] and (group_of >= 0).sum() == 4
    with pytest.raises(ValueError, match="'redblue' is 2 tokens"):
        swap_groups(WordTokenizer(), [["red", "redblue"]], 20)
    with pytest.raises(ValueError, match="'red' is in groups 0 and 1"):
        swap_groups(WordTokenizer(), [["red", "blue"], ["red", "circle"]], 20)
    with pytest.raises(ValueError, match=r"itm_swap_words\[0\] must be a list"):
        swap_groups(WordTokenizer(), ["red"], 20)


def test_a_share_without_word_groups_is_refused():
    with pytest.raises(ConfigError, match="model.itm_swap_words"):
        load_config("tiny", ["model.itm_swap_negatives=0.5"])
    with pytest.raises(ConfigError, match="model.itm_swap_negatives"):
        load_config("tiny", ["model.itm_swap_negatives=1.5", "model.itm_swap_words=[[red, blue]]"])
    cfg = load_config("tiny", ["model.itm_swap_negatives=0.5", "model.itm_swap_words=[[red, blue], [circle, square]]"])
    assert cfg.model.itm_swap_words == [["red", "blue"], ["circle", "square"]]
