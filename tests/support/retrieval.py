"""A small fake retrieval split for model-level evaluation tests (no files)."""
import torch

from albef_ds.eval.retrieval import RetrievalSplit

N_IMAGES, CAPTIONS = 6, 2


def fake_split(n_images: int = N_IMAGES, captions: int = CAPTIONS) -> RetrievalSplit:
    texts = [f"t{i}" for i in range(n_images * captions)]
    img2txt = [[i * captions + j for j in range(captions)] for i in range(n_images)]
    txt2img = [i // captions for i in range(len(texts))]
    return RetrievalSplit([f"img{i}" for i in range(n_images)], texts, img2txt, txt2img)


def fake_io(res: int, vocab: int, length: int = 10):
    def load_images(indices):
        return torch.stack([torch.randn(3, res, res, generator=torch.Generator().manual_seed(i)) for i in indices])

    def tokenize(texts):
        ids = torch.stack([torch.randint(5, vocab, (length,), generator=torch.Generator().manual_seed(100 + i))
                           for i in range(len(texts))])
        ids[:, 0] = 2
        return ids, torch.ones_like(ids)
    return load_images, tokenize
