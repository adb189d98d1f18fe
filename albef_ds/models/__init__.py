"""Model code: plain PyTorch, no DeepSpeed, no torch.distributed."""
from .albef import ALBEF, MOMENTUM_PAIRS
from .bert import BertForMaskedLM, BertModel

__all__ = ["ALBEF", "MOMENTUM_PAIRS", "BertForMaskedLM", "BertModel"]
