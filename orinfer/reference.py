"""The float32 attention every fast kernel is held to: before use (varlen_layout.varlen_supported,
packed_attention.supported) and in the tests."""
import torch


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One sequence, float32: its queries are its last q.shape[0] positions, its keys positions 0, 1, ..."""
    groups = q.shape[1] // k.shape[1]
    k, v = (x.float().repeat_interleave(groups, dim=1).transpose(0, 1) for x in (k, v))
    scores = q.float().transpose(0, 1) @ k.transpose(1, 2) * q.shape[-1] ** -0.5
    offset = k.shape[1] - q.shape[0]
    allowed = torch.arange(k.shape[1], device=q.device) <= torch.arange(q.shape[0], device=q.device)[:, None] + offset
    return (scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v).transpose(0, 1)
