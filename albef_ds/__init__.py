"""albef-ds: ALBEF (Align before Fuse) pretraining on DeepSpeed."""
__version__ = "0.1.0"
