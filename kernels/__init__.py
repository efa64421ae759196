"""Attention kernels used by the trainer.

These are the torch reference implementations: correct on any device and the ground truth for tests.
A later Triton version will dispatch CUDA tensors to Triton kernels with the same signatures, so
callers import from `kernels` and never from a specific backend.
"""

from kernels.reference import attention_mass, cross_attention

__all__ = ["attention_mass", "cross_attention"]
