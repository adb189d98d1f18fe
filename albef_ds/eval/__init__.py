"""Evaluation: retrieval metrics, ITM re-ranking, fine-tuning."""
