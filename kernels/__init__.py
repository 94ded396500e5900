"""Triton attention kernels for packed variable-length documents, and their pure-torch reference.

Imports torch and triton only. Installed as ``wlbtrain.kernels``.
"""

from .merge import merge_attention_partials
from .reference import reference_varlen_attention
from .attention import (
    varlen_attention,
    varlen_attention_backward,
    varlen_attention_forward,
)

__all__ = [
    "merge_attention_partials",
    "reference_varlen_attention",
    "varlen_attention",
    "varlen_attention_backward",
    "varlen_attention_forward",
]
