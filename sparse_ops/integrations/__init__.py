"""Hugging Face integrations: the Trainer callback and the distillation trainer."""
