"""Model code: plain PyTorch, no DeepSpeed, no torch.distributed."""
from .albef import ALBEF, MOMENTUM_PAIRS, bert_spec
from .bert import BertForMaskedLM, BertModel, BertSpec

__all__ = ["ALBEF", "MOMENTUM_PAIRS", "bert_spec", "BertForMaskedLM", "BertModel", "BertSpec"]
