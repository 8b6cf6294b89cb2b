"""Attention over the paged KV cache, as the model's layers see it: each layer writes its new K/V into the cache, then
the pass's layout reads them back and runs its kernel.

One forward pass carries a flat list of new tokens from several sequences (prefill chunks, single decode tokens or
decode tokens plus draft tokens). `Context` is the only thing the runner hands to the model: each new token's
position and cache slot, the rows to sample, and the pass's layout, one of:

- varlen_layout.py: FlashAttention's variable-length kernel (and the packed kernel) on the flat queries, where a
  CUDA torch has it: no padding, no mask.
- padded_layout.py: SDPA over padded [sequences, queries] grids with a mask, on every device and dtype.

A layout is an object with `prepare(dtype)` (once a pass, before the first layer: a mask, say) and
`attend(q, k_rows, v_rows)`; its tensor fields declared with `per_pass()` are what a CUDA graph's replay refreshes
(graphs.py). Adding a kernel is one such file plus one line where the runner chooses layouts (runner.py).
"""
from dataclasses import dataclass, field, fields
from typing import Protocol

import torch


def per_pass(default=None):
    """A tensor field of a pass's inputs whose values change from pass to pass at one shape: a CUDA graph's replay
    copies it into the captured pass's tensors; the other tensor fields depend on the shape alone."""
    return field(default=default, metadata={"per_pass": True})


def per_pass_fields(obj) -> list[str]:
    """The names of `obj`'s per_pass() fields."""
    return [f.name for f in fields(obj) if f.metadata.get("per_pass")]


class Layout(Protocol):
    def prepare(self, dtype: torch.dtype) -> None: ...

    def attend(self, q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor) -> torch.Tensor: ...


@dataclass
class Context:
    positions: torch.Tensor = per_pass()    # [T] position of each new token
    slots: torch.Tensor = per_pass()        # [T] row of the flat cache (block * block_size + offset) its K/V goes to
    sample_rows: torch.Tensor = per_pass()  # [S] flat tokens whose next-token logits are wanted
    layout: Layout = None


def as_words(x: torch.Tensor) -> torch.Tensor:
    """The same bytes as 8-byte words where the last dimension allows: index kernels copy one element per thread
    step, so gathering 2-byte elements is 4x slower than gathering words."""
    return x.view(torch.int64) if x.shape[-1] * x.element_size() % 8 == 0 else x


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: Context) -> torch.Tensor:
    """q [T, H, D], k/v [T, Hkv, D]; caches [num_blocks, block_size, Hkv, D]. Returns [T, H * D]."""
    kv_heads, dim = k.shape[1], k.shape[2]
    # Write first, then read: a sequence may read blocks that another sequence in this same pass is filling
    # (a shared prompt prefix), and its own new tokens must be visible to it.
    k_rows, v_rows = k_cache.view(-1, kv_heads, dim), v_cache.view(-1, kv_heads, dim)
    k_rows.index_copy_(0, ctx.slots, k)
    v_rows.index_copy_(0, ctx.slots, v)
    return ctx.layout.attend(q, k_rows, v_rows)
