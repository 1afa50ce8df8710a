"""Optimizers for QLoRA training: AdamW with 8-bit blockwise states and paged (CUDA managed memory) states,
each step one fused native kernel per tensor. See optim/adamw.py."""

from .adamw import AdamW8bit, PagedAdamW, PagedAdamW8bit, PagedAdamW32bit

__all__ = ["AdamW8bit", "PagedAdamW", "PagedAdamW8bit", "PagedAdamW32bit"]
