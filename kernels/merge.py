"""Merge of two partial attention results over disjoint key sets (ring attention's combine step)."""

import torch


def merge_attention_partials(out_a, lse_a, out_b, lse_b):
    """Combine attention over key set A and key set B into attention over A ∪ B, in fp32.

    out_a, out_b: [total_q, Hq, D] (any float dtype); lse_a, lse_b: [Hq, total_q] natural-log
    log-sum-exp of each part. Returns (out [total_q, Hq, D] fp32, lse [Hq, total_q] fp32).
    A row whose LSE is -inf on one side takes the other side unchanged; a row that is -inf on
    both sides gets output 0 and LSE -inf. No NaN is produced, also in the backward pass.
    """
    lse_a = lse_a.float()
    lse_b = lse_b.float()
    top = torch.maximum(lse_a, lse_b)
    # Shifting by a finite maximum keeps exp() in range; -inf rows shift by 0 so that
    # exp(-inf - 0) = 0 instead of exp(-inf + inf) = NaN.
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    weight_a = torch.exp(lse_a - top)
    weight_b = torch.exp(lse_b - top)
    total = weight_a + weight_b
    seen = total > 0
    total_safe = torch.where(seen, total, torch.ones_like(total))
    lse = torch.where(seen, top + torch.log(total_safe), torch.full_like(total, float("-inf")))
    scale_a = (weight_a / total_safe).transpose(0, 1).unsqueeze(-1)
    scale_b = (weight_b / total_safe).transpose(0, 1).unsqueeze(-1)
    out = scale_a * out_a.float() + scale_b * out_b.float()
    return out, lse
