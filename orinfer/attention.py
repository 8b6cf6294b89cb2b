"""Attention over the paged KV cache: FlashAttention's variable-length kernel where torch has it, SDPA elsewhere.

One forward pass carries a flat list of new tokens from several sequences (prefill chunks, single decode tokens or
decode tokens plus draft tokens). `Context` is the only thing the runner hands to the attention layers: where each
new token's K/V goes, which cache blocks each sequence owns, and one of two layouts for the kernel:

- varlen (CUDA, fp16/bf16, a torch built with FlashAttention, and a memory plan that affords its kernels' host
  memory): the flat queries as they are, each sequence's keys gathered into one flat run, and cumulative lengths.
  The kernel aligns the causal mask bottom-right (a query at the end of a cached prefix sees the prefix) and handles
  the grouped KV heads itself: no padding, no mask, no copies of the queries or the output. Where Triton runs,
  sequences with few new tokens go to the packed kernel instead (packed_attention.py), which fills its tiles better.
- padded (every device and dtype, torch >= 2.3, NVIDIA's Jetson wheels included): SDPA over padded
  [sequences, queries] grids with an additive mask, the sequences in groups whose gathered keys fit the memory
  plan's bound (so a long sequence does not pad every other to its length). The grouped KV heads are handled by
  folding each KV head's query heads into the query axis, which needs no copy of K/V per query head and no
  `enable_gqa` (torch >= 2.5 only).
"""
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .reference import reference_attention

# cuDNN's attention (chosen first on Hopper by recent torch) builds an execution plan for every new shape, and every
# pass here has new shapes: tens of milliseconds each, inside the timed run. The memory-efficient kernel (and the
# math one on the CPU) take a mask with no such set-up.
_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass(frozen=True)
class AttentionKernels:
    """The kernels the varlen layout calls, chosen once per runner (`available`; tests give float32 references)."""
    varlen: Callable | None = None  # out [T, H, D] from q [T, H, D], k/v [Tk, Hkv, D]; None: the padded layout only
    packed: Callable | None = None  # writes the rows of its sequences of out (packed_attention.py); None: FlashAttention
    packed_queries: int = 0         # the most new tokens of a sequence the packed kernel takes in an eager pass


@dataclass
class Varlen:
    kernels: AttentionKernels
    cu_q: torch.Tensor       # [B + 1] int32: sequence b's queries are flat tokens cu_q[b]:cu_q[b + 1]
    cu_k: torch.Tensor       # [B + 1] int32: its keys are gathered rows cu_k[b]:cu_k[b + 1] (positions 0, 1, ...)
    max_q: int               # bounds over the sequences FlashAttention takes
    max_k: int
    key_slots: torch.Tensor  # [cu_k[-1]] row of the flat cache holding each gathered key
    # FlashAttention takes sequences [0, long_seqs) (their queries are the first long_tokens rows, their keys the
    # first long_keys gathered rows), the packed kernel (packed_attention.py) the next packed_seqs, reading its keys
    # in the cache through key_slots: the runner puts sequences with few new tokens last.
    long_seqs: int
    long_tokens: int
    long_keys: int
    packed_seqs: int = 0


@dataclass
class PaddedGroup:
    """Sequences whose keys are gathered together: rows of the pass's block tables and grid (views)."""
    block_tables: torch.Tensor     # [b, nblocks] cache blocks of each of its sequences (padding: the scratch block)
    query_slots: torch.Tensor      # [b, Qmax] flat token index for each cell of its padded query grid (padding: any)
    mask_rows: torch.Tensor        # [b, Qmax] each cell's row of the group's mask table (build_bias)
    token_seq: torch.Tensor        # [tokens] grid row of each of its flat tokens (they are a run of the pass's)
    token_query: torch.Tensor      # [tokens] grid column of each
    bias: torch.Tensor | None = None  # additive mask [b, 1, Qmax * G, keys], built once per pass by build_bias


@dataclass
class Padded:
    """The pass's sequences in groups (the longest first) whose gathered keys, sequences x the longest's keys, stay
    within the plan's bound however many sequences the pass holds; each group's tokens follow the previous one's."""
    mask_rows: torch.Tensor        # every group's mask rows, flat (the groups' are views: a graph refreshes these)
    groups: tuple[PaddedGroup, ...]


@dataclass
class Context:
    positions: torch.Tensor     # [T] position of each new token
    slots: torch.Tensor         # [T] row of the flat cache (block * block_size + offset) each new K/V is written to
    block_tables: torch.Tensor  # [B, nblocks] cache blocks of each sequence, in order; padding points at block 0
    sample_rows: torch.Tensor   # [S] flat tokens whose next-token logits are wanted
    layout: Varlen | Padded
    sliding_window: int | None = None


def _flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    # The private op behind torch's own varlen and nested-tensor attention; these arguments mean the same from
    # torch 2.3 on (later versions only add keyword arguments). is_causal aligns the mask bottom-right.
    return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, True, False,
                                                   scale=scale)[0]


@lru_cache
def varlen_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the varlen kernel runs here and agrees with the reference on a small case with a cached prefix
    (asked once per device and dtype)."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    g = torch.Generator(device=device).manual_seed(0)
    # Two sequences: 3 new tokens after a 2-token prefix, and 2 new tokens from position 0; 4 query heads, 2 KV.
    q = torch.randn(5, 4, 128, device=device, dtype=dtype, generator=g)
    k, v = (torch.randn(7, 2, 128, device=device, dtype=dtype, generator=g) for _ in range(2))
    cu_q = torch.tensor([0, 3, 5], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 5, 7], dtype=torch.int32, device=device)
    try:
        out = _flash_varlen(q, k, v, cu_q, cu_k, 3, 5, 128 ** -0.5)
    except (RuntimeError, NotImplementedError):  # built without FlashAttention, or not for this GPU
        return False
    expected = torch.cat([reference_attention(q[:3], k[:5], v[:5]), reference_attention(q[3:], k[5:], v[5:])])
    return bool(torch.allclose(out.float(), expected, atol=2e-2, rtol=2e-2))


def available(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, dim: int, varlen: bool,
              packed_queries: int) -> AttentionKernels:
    """The kernels that run here and pass their checks, of those asked for (varlen: FlashAttention's layout at all;
    packed_queries > 0: the packed kernel for sequences with that many new tokens or fewer)."""
    if not (varlen and varlen_supported(device, dtype)):
        return AttentionKernels()
    from . import packed_attention  # imports Triton: only where the varlen layout runs (~0.1 GiB of host memory)
    if packed_queries > 0 and packed_attention.supported(device, dtype, heads, kv_heads, dim):
        return AttentionKernels(_flash_varlen, packed_attention.packed_attention, packed_queries)
    return AttentionKernels(_flash_varlen)


def build_bias(group: PaddedGroup, block_size: int, groups: int, dtype: torch.dtype,
               sliding_window: int | None) -> torch.Tensor:
    """Causal (and sliding-window) mask over a group's gathered keys, shared by all layers of one padded pass.

    Key j of a sequence sits at position j because block tables list blocks in order. A query at position p sees
    keys p - window < j <= p, as transformers' sliding-window mask does; padding cells see key 0 only, so no row is
    fully masked (that would give NaN). The mask depends on p - j alone, so each row is a slice of one table of
    2K - 1 values over p - j (the runner gives each cell its row, K - 1 - p): built with fills and one gather,
    where comparisons and `where` would load two more kernel modules (host memory an Orin's plan counts).
    """
    keys = group.block_tables.shape[1] * block_size
    window = keys if sliding_window is None else min(keys, sliding_window)
    table = torch.full((2 * keys - 1,), torch.finfo(dtype).min, dtype=dtype, device=group.mask_rows.device)
    table[keys - window:keys] = 0  # entry u is for p - j = K - 1 - u
    rows = group.mask_rows
    rows = rows[:, :, None].expand(-1, -1, groups).reshape(rows.shape[0], -1)
    return table.unfold(0, keys, 1)[rows][:, None]


def _words(x: torch.Tensor) -> torch.Tensor:
    """The same bytes as 8-byte words where the last dimension allows: index kernels copy one element per thread
    step, so gathering 2-byte elements is 4x slower than gathering words."""
    return x.view(torch.int64) if x.shape[-1] * x.element_size() % 8 == 0 else x


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: Context) -> torch.Tensor:
    """q [T, H, D], k/v [T, Hkv, D]; caches [num_blocks, block_size, Hkv, D]. Returns [T, H * D]."""
    tokens, heads, dim = q.shape
    kv_heads = k.shape[1]
    # Write first, then read: a sequence may read blocks that another sequence in this same pass is filling
    # (a shared prompt prefix), and its own new tokens must be visible to it.
    k_rows, v_rows = k_cache.view(-1, kv_heads, dim), v_cache.view(-1, kv_heads, dim)
    k_rows.index_copy_(0, ctx.slots, k)
    v_rows.index_copy_(0, ctx.slots, v)
    lay = ctx.layout
    if isinstance(lay, Varlen):
        kernels = lay.kernels

        def gathered(rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
            return _words(rows.view(rows.shape[0], -1))[slots].view(q.dtype).view(-1, kv_heads, dim)
        if not lay.packed_seqs:
            keys, values = gathered(k_rows, lay.key_slots), gathered(v_rows, lay.key_slots)
            out = kernels.varlen(q, keys, values, lay.cu_q, lay.cu_k, lay.max_q, lay.max_k, dim ** -0.5)
            return out.reshape(tokens, heads * dim)
        out = q.new_empty(q.shape)
        if lay.long_seqs:
            n, slots = lay.long_seqs + 1, lay.key_slots[:lay.long_keys]
            out[:lay.long_tokens] = kernels.varlen(q[:lay.long_tokens], gathered(k_rows, slots),
                                                   gathered(v_rows, slots), lay.cu_q[:n], lay.cu_k[:n], lay.max_q,
                                                   lay.max_k, dim ** -0.5)
        kernels.packed(q, k_rows, v_rows, out, lay.cu_q, lay.cu_k, lay.key_slots, lay.long_seqs, lay.packed_seqs,
                       dim ** -0.5)
        return out.view(tokens, heads * dim)
    groups = heads // kv_heads
    words = _words(q.reshape(-1, kv_heads, groups, dim)).transpose(0, 1)             # [Hkv, T, G, W]
    outs = []
    for group in lay.groups:
        batch, qmax = group.query_slots.shape
        keys = k_cache[group.block_tables].view(batch, -1, kv_heads, dim).transpose(1, 2)
        values = v_cache[group.block_tables].view(batch, -1, kv_heads, dim).transpose(1, 2)
        # One gather builds the folded query [b, Hkv, Qmax * G, D] and one gather reads the output back in token
        # order, both as words. (reshape, not view: the layout an index or SDPA returns differs between devices.)
        query = words[:, group.query_slots]                                          # [Hkv, b, Qmax, G, W]
        query = query.reshape(kv_heads, batch, qmax * groups, -1).view(q.dtype).transpose(0, 1)
        with sdpa_kernel(_BACKENDS):
            out = F.scaled_dot_product_attention(query, keys, values, attn_mask=group.bias, scale=dim ** -0.5)
        del keys, values, query  # the next group's gathers reuse this memory: one group's are live at a time
        out = _words(out.reshape(batch, kv_heads, qmax, groups, dim)).transpose(1, 2)  # [b, Qmax, Hkv, G, W]
        outs.append(out[group.token_seq, group.token_query].view(q.dtype).reshape(-1, heads * dim))
    return outs[0] if len(outs) == 1 else torch.cat(outs)
