"""A small fake retrieval split for model-level evaluation tests (no files)."""
import torch

from albef_ds.eval.retrieval import RetrievalSplit

N_IMAGES, CAPTIONS = 6, 2


def fake_split() -> RetrievalSplit:
    texts = [f"t{i}" for i in range(N_IMAGES * CAPTIONS)]
    img2txt = [[i * CAPTIONS + j for j in range(CAPTIONS)] for i in range(N_IMAGES)]
    txt2img = [i // CAPTIONS for i in range(len(texts))]
    return RetrievalSplit([f"img{i}" for i in range(N_IMAGES)], texts, img2txt, txt2img)


def fake_io(res: int, vocab: int, length: int = 10):
    def load_images(indices):
        return torch.stack([torch.randn(3, res, res, generator=torch.Generator().manual_seed(i)) for i in indices])

    def tokenize(texts):
        ids = torch.stack([torch.randint(5, vocab, (length,), generator=torch.Generator().manual_seed(100 + i))
                           for i in range(len(texts))])
        ids[:, 0] = 2
        return ids, torch.ones_like(ids)
    return load_images, tokenize
