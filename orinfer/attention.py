"""Attention over the paged KV cache, through torch's scaled_dot_product_attention.

One forward pass carries a flat list of new tokens from several sequences (prefill chunks, single decode tokens or
decode tokens plus draft tokens). `Context` is the only thing the runner hands to the attention layers: where each
new token's K/V goes, which cache blocks each sequence owns, and how flat tokens map onto a padded
[sequences, queries] grid. SDPA is the kernel every torch >= 2.3 build has (NVIDIA's Jetson wheels included, with no
Triton); the grouped KV heads are handled by folding each KV head's query heads into the query axis, which needs no
copy of K/V per query head and no `enable_gqa` (torch >= 2.5 only).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# cuDNN's attention (chosen first on Hopper by recent torch) builds an execution plan for every new shape, and every
# pass here has new shapes: tens of milliseconds each, inside the timed run. The memory-efficient kernel (and the
# math one on the CPU) take a mask with no such set-up.
_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class Context:
    positions: torch.Tensor     # [T] position of each new token
    slots: torch.Tensor         # [T] row of the flat cache (block * block_size + offset) each new K/V is written to
    block_tables: torch.Tensor  # [B, nblocks] cache blocks of each sequence, in order; padding points at block 0
    query_slots: torch.Tensor   # [B, Qmax] flat token index for each cell of the padded query grid (padding: any)
    query_positions: torch.Tensor  # [B, Qmax] position of each padded query cell, -1 for padding
    token_seq: torch.Tensor     # [T] grid row (sequence) of each flat token
    token_query: torch.Tensor   # [T] grid column (query) of each flat token
    sample_rows: torch.Tensor   # [S] flat tokens whose next-token logits are wanted
    sliding_window: int | None = None
    bias: torch.Tensor | None = None  # additive mask [B, 1, Qmax * G, Tk], built once per pass by build_bias


def build_bias(ctx: Context, block_size: int, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """Causal (and sliding-window) mask over the gathered keys, shared by all layers of one pass.

    Key j of a sequence sits at position j because block tables list blocks in order. A query at position p sees
    keys p - window < j <= p, as transformers' sliding-window mask does. Padding rows see key 0 only, so no row is
    fully masked (that would give NaN).
    """
    batch, qmax = ctx.query_positions.shape
    keys = torch.arange(ctx.block_tables.shape[1] * block_size, device=ctx.positions.device)
    qpos = ctx.query_positions[:, :, None]
    allowed = keys <= qpos
    if ctx.sliding_window is not None:
        allowed &= (qpos - keys) < ctx.sliding_window
    allowed |= (qpos < 0) & (keys == 0)
    allowed = allowed[:, :, None, :].expand(batch, qmax, groups, keys.numel()).reshape(batch, 1, qmax * groups, -1)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return bias.masked_fill_(~allowed, torch.finfo(dtype).min)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: Context) -> torch.Tensor:
    """q [T, H, D], k/v [T, Hkv, D]; caches [num_blocks, block_size, Hkv, D]. Returns [T, H * D]."""
    _, heads, dim = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    # Write first, then read: a sequence may read blocks that another sequence in this same pass is filling
    # (a shared prompt prefix), and its own new tokens must be visible to it.
    k_cache.view(-1, kv_heads, dim).index_copy_(0, ctx.slots, k)
    v_cache.view(-1, kv_heads, dim).index_copy_(0, ctx.slots, v)
    batch, nblocks = ctx.block_tables.shape
    keys = k_cache[ctx.block_tables].view(batch, -1, kv_heads, dim).transpose(1, 2)
    values = v_cache[ctx.block_tables].view(batch, -1, kv_heads, dim).transpose(1, 2)
    qmax = ctx.query_positions.shape[1]
    # One gather builds the folded query [B, Hkv, Qmax * G, D] and one gather reads the output back in token order.
    # Both move each head's D values as 8-byte words (a dtype view): the index kernel copies one element per thread
    # step, so 2-byte elements would make it 4x slower. (reshape, not view: the layout an index or SDPA returns
    # differs between devices and kernels.)
    word = torch.int64 if dim * q.element_size() % 8 == 0 else q.dtype
    words = q.reshape(-1, kv_heads, groups, dim).view(word)                         # [T, Hkv, G, W]
    query = words.transpose(0, 1)[:, ctx.query_slots]                               # [Hkv, B, Qmax, G, W]
    query = query.reshape(kv_heads, batch, qmax * groups, -1).view(q.dtype).transpose(0, 1)
    with sdpa_kernel(_BACKENDS):
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=ctx.bias, scale=dim ** -0.5)
    out = out.reshape(batch, kv_heads, qmax, groups, dim).view(word).transpose(1, 2)  # [B, Qmax, Hkv, G, W]
    return out[ctx.token_seq, ctx.token_query].view(q.dtype).reshape(-1, heads * dim)
