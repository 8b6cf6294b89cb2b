"""The float32 attention every fast kernel is held to, before use (varlen.varlen_supported,
packed.supported), and float32 kernels that keep each fast kernel's contract one sequence at a time
(float32_reference.py registers them as a backend)."""

import torch


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One sequence, float32: its queries are its last q.shape[0] positions, its keys positions 0,
    1, ..."""
    groups = q.shape[1] // k.shape[1]
    k, v = (x.float().repeat_interleave(groups, dim=1).transpose(0, 1) for x in (k, v))
    scores = q.float().transpose(0, 1) @ k.transpose(1, 2) * q.shape[-1] ** -0.5
    offset = k.shape[1] - q.shape[0]
    allowed = (
        torch.arange(k.shape[1], device=q.device)
        <= torch.arange(q.shape[0], device=q.device)[:, None] + offset
    )
    return (scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v).transpose(0, 1)


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    """FlashAttention's varlen contract, one sequence at a time in float32 (bottom-right causal,
    grouped KV heads); max_q and max_k are bounds (a graph's), rows past cu_q[-1] are padding the
    caller ignores. Counts its calls."""
    reference_varlen.calls += 1
    if not (
        scale == q.shape[-1] ** -0.5
        and max_q >= int((cu_q[1:] - cu_q[:-1]).max())
        and max_k >= int((cu_k[1:] - cu_k[:-1]).max())
        and cu_q.dtype == cu_k.dtype == torch.int32
        and cu_q[-1] <= q.shape[0]
        and cu_k[-1] <= k.shape[0]
    ):
        raise ValueError("varlen attention called outside its contract")
    cq, ck = cu_q.tolist(), cu_k.tolist()
    out = torch.zeros_like(q)
    for b in range(len(cq) - 1):
        out[cq[b] : cq[b + 1]] = reference_attention(
            q[cq[b] : cq[b + 1]], k[ck[b] : ck[b + 1]], v[ck[b] : ck[b + 1]]
        )
    return out


def reference_packed(q, k, v, out, cu_q, cu_k, key_slots, first_seq, num_seqs, scale):
    """The packed kernel's contract in float32: it writes the rows of sequences first_seq .. +
    num_seqs, only, reading key j of sequence b from the cache's row key_slots[cu_k[b] + j]. Records
    (first_seq, the most new tokens of its sequences) per call."""
    if not (scale == q.shape[-1] ** -0.5 and cu_q.dtype == cu_k.dtype == torch.int32):
        raise ValueError("packed attention called outside its contract")
    cq, ck = cu_q.tolist(), cu_k.tolist()
    reference_packed.calls.append(
        (first_seq, max(cq[b + 1] - cq[b] for b in range(first_seq, first_seq + num_seqs)))
    )
    keys, values = k[key_slots], v[key_slots]
    for b in range(first_seq, first_seq + num_seqs):
        out[cq[b] : cq[b + 1]] = reference_attention(
            q[cq[b] : cq[b + 1]], keys[ck[b] : ck[b + 1]], values[ck[b] : ck[b + 1]]
        )


reference_varlen.calls, reference_packed.calls = 0, []


def reference_paged(q, k_rows, v_rows, tiles, tables, block_size, window, scale):
    """The paged kernel's contract (csrc/attention.cuh) in float32: tiles[i] = (first flat token,
    tokens, position of the first, row of `tables`); a query at position p sees its sequence's keys
    p - window < j <= p (window <= 0: every j <= p), read through its block table. Returns [tokens,
    heads * D] in q's dtype; rows no tile covers are zeros."""
    tokens, heads, dim = q.shape
    groups = heads // k_rows.shape[1]
    out = torch.zeros(tokens, heads, dim, dtype=torch.float32, device=q.device)
    for first, count, position, row in tiles.tolist():
        keys = torch.arange(position + count, device=q.device)
        slots = tables[row][keys // block_size] * block_size + keys % block_size
        k, v = (x[slots].float().repeat_interleave(groups, dim=1) for x in (k_rows, v_rows))
        scores = torch.einsum("qhd,khd->hqk", q[first : first + count].float(), k) * scale
        seen = keys <= torch.arange(position, position + count, device=q.device)[:, None]
        if window > 0:
            seen &= (
                keys > torch.arange(position, position + count, device=q.device)[:, None] - window
            )
        probs = scores.masked_fill(~seen, float("-inf")).softmax(-1)
        out[first : first + count] = torch.einsum("hqk,khd->qhd", probs, v)
    return out.to(q.dtype).reshape(tokens, heads * dim)
