"""Attention for sequences with few new tokens (decode steps, drafts being verified, short prompt
chunks), as one Triton kernel.

FlashAttention's varlen kernel gives each (sequence, query head) a tile of 128 query rows: a
sequence verifying 16 drafts fills 17 of them, and a pass of 457 such sequences ran 18,280 nearly
empty tiles a layer (29 ms of a 1.2 s run on an H200). Here the query heads that share a KV head are
packed into the rows of a tile (row = token x groups + head within the group): 64-row tiles spread
over two programs, and in a launch of many sequences 16-row tiles for decode steps and short drafts,
each reading a sequence's keys once per tile. Long prompt chunks stay with FlashAttention (varlen.py
splits a pass between the two). Needs Triton (not in NVIDIA's Jetson wheels: there every sequence
stays with FlashAttention).

The online-softmax loop follows Triton's fused-attention tutorial
(https://triton-lang.org/main/getting-started/tutorials/06-fused-attention.html, MIT: m_i, l_i,
acc, exp2 with a log2(e) prescale); packing a KV head's query heads into one tile follows the GQA
decode kernels of FlashInfer, vLLM, SGLang and LightLLM (docs/REPORT.md, Credits).
"""

from functools import lru_cache

import torch

from .reference import reference_attention

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: `supported` says no, and nothing below is defined
    triton = None

_BLOCK_N = 64  # keys a step
# A sequence's rows (new tokens x the query heads of a KV head) go in 64-row tiles spread over 2
# programs; where a launch has >= _SMALL_FROM_SEQS sequences, those of <= _SMALL_ROWS rows (decode
# steps, short drafts) go to a second launch in 16-row tiles, one program a sequence and KV head,
# each launch skipping the other's sequences (so a graph captured on decode steps still gives drafts
# and prompt chunks their 64-row tiles). A decode step fills 4 rows, and a 64-row tile holds
# registers for 16 times that, so many one-token sequences run faster in small tiles, while a few
# sequences with several tokens run faster in one launch of large tiles (bench/packed_tiles.py
# measures both).
_SMALL_ROWS, _SMALL_FROM_SEQS = 16, 64
# Each launch: (rows a tile, programs a sequence and KV head, SMALL, SMALL_ROWS).
ONE_LAUNCH = ((64, 2, False, 0),)
TWO_LAUNCHES = ((_SMALL_ROWS, 1, True, _SMALL_ROWS), (64, 2, False, _SMALL_ROWS))

if triton is not None:
    # No specialisation on the first sequence's index (the count is the grid): a new value must not
    # compile a new kernel in the middle of a run.
    @triton.jit(do_not_specialize=["first_seq"])
    def _attention(
        Q, K, V, O, CU_Q, CU_K, KEY_SLOTS, first_seq, scale_log2,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
        GROUPS: tl.constexpr, DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        SMALL: tl.constexpr, SMALL_ROWS: tl.constexpr,
    ):  # fmt: skip
        seq = first_seq + tl.program_id(0)
        kv_head = tl.program_id(1)
        q_start = tl.load(CU_Q + seq)
        q_len = tl.load(CU_Q + seq + 1) - q_start
        k_start = tl.load(CU_K + seq)
        k_len = tl.load(CU_K + seq + 1) - k_start
        rows = q_len * GROUPS
        if SMALL:  # the other launch's sequences get no tile here
            rows = tl.where(rows <= SMALL_ROWS, rows, 0)
        else:
            rows = tl.where(rows > SMALL_ROWS, rows, 0)
        d = tl.arange(0, DIM)
        for m0 in range(tl.program_id(2) * BLOCK_M, rows, tl.num_programs(2) * BLOCK_M):
            r = m0 + tl.arange(0, BLOCK_M)
            valid = r < rows
            token = r // GROUPS
            head = kv_head * GROUPS + r % GROUPS
            q_rows = Q + (q_start + token)[:, None] * stride_qt + head[:, None] * stride_qh
            q = tl.load(q_rows + d[None, :], mask=valid[:, None], other=0.0)
            # Bottom-right causal: the queries are the sequence's last positions.
            last_key = k_len - q_len + token
            keys_end = tl.minimum(k_len, k_len - q_len + (m0 + BLOCK_M - 1) // GROUPS + 1)
            out = _tile(q, K + kv_head * stride_kh, V + kv_head * stride_vh, KEY_SLOTS + k_start,
                        k_len, keys_end, last_key, scale_log2, stride_kt, stride_vt, d,
                        BLOCK_M, BLOCK_N, DIM)  # fmt: skip
            o_rows = O + (q_start + token)[:, None] * stride_ot + head[:, None] * stride_oh
            tl.store(o_rows + d[None, :], out.to(O.dtype.element_ty), mask=valid[:, None])

    @triton.jit
    def _tile(
        q, K, V, KEY_SLOTS, k_len, keys_end, last_key, scale_log2, stride_kt, stride_vt, d,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DIM: tl.constexpr,
    ):  # fmt: skip
        # One tile of query rows against the sequence's keys, read where the cache holds them (no
        # gathered copy is written and read back): the online softmax, normalised.
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, DIM], tl.float32)
        for n0 in range(0, keys_end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            inside = n < k_len
            slot = tl.load(KEY_SLOTS + n, mask=inside, other=0)
            k = tl.load(K + slot[:, None] * stride_kt + d[None, :], mask=inside[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale_log2
            s = tl.where(n[None, :] <= last_key[:, None], s, float("-inf"))
            # finite: every row sees key 0 in the first step
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + slot[:, None] * stride_vt + d[None, :], mask=inside[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        return acc / l_i[:, None]


def packed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, cu_q: torch.Tensor,
    cu_k: torch.Tensor, key_slots: torch.Tensor, first_seq: int, num_seqs: int, scale: float,
) -> None:  # fmt: skip
    """Writes out[cu_q[b]:cu_q[b + 1]] for sequences b = first_seq .. first_seq + num_seqs - 1:
    q/out [T, H, D]; k/v the cache's rows [slots, Hkv, D] (the last dimension contiguous), key j of
    sequence b in row key_slots[cu_k[b] + j]; the varlen layout's cumulative lengths (bottom-right
    causal). Any query count works (a sequence's tiles are looped over); the fewer, the better the
    tiles are filled."""
    if num_seqs == 0:
        return
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == out.stride(-1) == 1
    launches = TWO_LAUNCHES if num_seqs >= _SMALL_FROM_SEQS else ONE_LAUNCH
    launch(q, k, v, out, cu_q, cu_k, key_slots, first_seq, num_seqs, scale, launches)


def launch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, cu_q: torch.Tensor,
    cu_k: torch.Tensor, key_slots: torch.Tensor, first_seq: int, num_seqs: int, scale: float,
    launches: tuple[tuple[int, int, bool, int], ...],
) -> None:  # fmt: skip
    """packed_attention's kernel launches, as given (bench/packed_tiles.py times ONE_LAUNCH against
    the choice)."""
    heads, dim = q.shape[1:]
    kv_heads = k.shape[1]
    for block_m, splits, small, small_rows in launches:
        _attention[(num_seqs, kv_heads, splits)](
            q, k, v, out, cu_q, cu_k, key_slots, first_seq, scale * 1.4426950408889634,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), GROUPS=heads // kv_heads, DIM=dim, BLOCK_M=block_m,
            BLOCK_N=_BLOCK_N, SMALL=small, SMALL_ROWS=small_rows, num_warps=4,
        )  # fmt: skip


@lru_cache
def supported(
    device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, dim: int
) -> bool:
    """Whether the kernel runs here for this attention shape and agrees with the reference on a
    small case (asked once per device, dtype and shape)."""
    if triton is None or device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    if dim < 16 or dim & (dim - 1):  # a tile's head dimension must be a power of two
        return False
    g = torch.Generator(device=device).manual_seed(0)
    # Three sequences: 3 new tokens after a 60-token prefix, 1 after 2, 20 from position 0; their 86
    # keys lie in a 100-row cache in shuffled rows.
    cu_q = torch.tensor([0, 3, 4, 24], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 63, 66, 86], dtype=torch.int32, device=device)
    q = torch.randn(24, heads, dim, device=device, dtype=dtype, generator=g)
    k, v = (
        torch.randn(100, kv_heads, dim, device=device, dtype=dtype, generator=g) for _ in range(2)
    )
    slots = torch.randperm(100, device=device, generator=g)[:86]
    out = torch.zeros_like(q)
    try:
        packed_attention(q, k, v, out, cu_q, cu_k, slots, 0, 3, dim**-0.5)
    # a Triton that cannot build for this GPU: FlashAttention keeps every sequence
    except Exception as e:
        import warnings

        warnings.warn(
            f"packed attention kernel unavailable ({type(e).__name__}: {e}); using FlashAttention "
            "only"
        )
        return False
    cq, ck = cu_q.tolist(), cu_k.tolist()
    keys, values = k[slots], v[slots]
    expected = torch.cat(
        [
            reference_attention(
                q[cq[b] : cq[b + 1]], keys[ck[b] : ck[b + 1]], values[ck[b] : ck[b + 1]]
            )
            for b in range(3)
        ]
    )
    if not torch.allclose(out.float(), expected, atol=2e-2, rtol=2e-2):
        raise RuntimeError(
            "the packed attention kernel disagrees with the reference on this GPU (a bug: report "
            "it)"
        )
    return True
