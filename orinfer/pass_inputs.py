"""One pass's integers, laid out on the host and sent up in one copy: the flat token ids, the rows
to sample, per sequence its start, length and block table, and per token its sequence, its place
there, its position and cache slot, then whatever the attention layout adds. Each layout
(attention/varlen.py, attention/padded.py) orders and pads the sequences its own way and hands the
result here.

The host lays out every per-token index by array slices and concatenation (machine integers, memcpy
speed, no Python int per token where blocks hold one token): derived on the device they took a scan,
repeat_interleave, integer division and remainder, whose kernel modules cost host memory when first
loaded (~0.1 GiB for the scan alone, H200), too much for an Orin's plan. They go up through
staging.py's reused pinned buffers.
"""

from array import array
from dataclasses import dataclass
from itertools import accumulate

import torch

from .block_manager import SCRATCH_BLOCK
from .sequence import Work
from .staging import Staging


@dataclass
class DeviceInputs:
    """One pass's integers on the device: per sequence, and per token (its sequence, its place
    there, its position and cache slot), then the layout's own."""

    ids: torch.Tensor
    sample_rows: torch.Tensor
    starts: torch.Tensor
    lens: torch.Tensor
    tables: torch.Tensor  # [B, nblocks]
    cu_q: torch.Tensor  # [B + 1] int64: each sequence's first flat token
    token_seq: torch.Tensor
    token_query: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    layout: torch.Tensor  # the layout's own integers


def flat_tokens(works: list[Work], order: list[int]) -> tuple[list[int], list[int]]:
    """The works' tokens laid out in `order`, and the rows to sample, in the works' own order."""
    ids, first_row = [], [0] * len(works)
    for i in order:
        first_row[i] = len(ids)
        ids += works[i].tokens
    sample_rows = []
    for i, w in enumerate(works):
        if w.wants_logits:
            end = first_row[i] + len(w.tokens)
            sample_rows += range(end - 1 - w.num_drafts, end)
    return ids, sample_rows


class InputUploader:
    """Builds and uploads a pass's integers (`upload`); keeps the pinned staging buffers and a
    counting array."""

    def __init__(self, device: torch.device, block_size: int, ids_on_host: bool):
        self.device, self.block_size, self.ids_on_host = device, block_size, ids_on_host
        self.staging = Staging(device)
        self._count = array("q", range(1024))

    def counting(self, n: int) -> array:
        """0, 1, 2, ... as a machine-integer array of at least n entries (kept, and grown when a
        pass needs more)."""
        if len(self._count) < n:
            self._count = array("q", range(max(n, 2 * len(self._count))))
        return self._count

    def upload(
        self,
        works: list[Work],
        order: list[int],
        ids: list[int],
        sample_rows: list[int],
        starts: list[int],
        lens: list[int],
        nblocks: int,
        layout: array | None = None,
        feed: torch.Tensor | None = None,
    ) -> DeviceInputs:
        """Upload one pass's integers (sequences past the works are padding, at position 0 in the
        scratch block), with the layout's own (`layout`, appended). `feed`: the sampled tokens of
        the pass before, on the device, where the works' fed_row point (chained steps): their tokens
        are filled in there."""
        batch = len(lens)
        scratch = array("q", [SCRATCH_BLOCK]) * nblocks
        tables = [works[i].seq.block_table for i in order] + [scratch] * (batch - len(works))
        # each sequence's first flat token: cu_q
        first_tokens = array("q", accumulate(lens, initial=0))
        host = array("q", ids + sample_rows + starts + lens) + first_tokens
        host += self._per_token(tables, starts, lens, len(ids))
        for t in tables:  # array slices and concatenation: memcpy, not a Python int per block
            host += t[:nblocks]
            host += scratch[: max(0, nblocks - len(t))]
        extra = len(layout) if layout is not None else 0
        if layout is not None:
            host += layout
        fed = []  # (flat row, row of `feed`) of each chained step
        if feed is not None:
            chained = zip(order, first_tokens)
            fed = [(row, works[i].fed_row) for i, row in chained if works[i].fed_row >= 0]
            host += array("q", [row for row, _ in fed] + [src for _, src in fed])
        flat = self._send(host)
        tokens = len(ids)
        sizes = [tokens, len(sample_rows), batch, batch, batch + 1, tokens, tokens, tokens, tokens,
                 batch * nblocks, extra, 2 * len(fed)]  # fmt: skip
        (ids_t, sample_t, starts_t, lens_t, cu_q, token_seq, token_query, positions, slots,
         tables_t, layout_t, fed_t) = flat.split(sizes)  # fmt: skip
        if fed:
            dst, src = fed_t.view(2, -1)
            ids_t[dst] = feed[src]
        if self.ids_on_host:  # the token table's rows are looked up where it lives
            ids_t = torch.frombuffer(host, dtype=torch.int64, count=tokens)
        return DeviceInputs(ids_t, sample_t, starts_t, lens_t, tables_t.view(batch, nblocks), cu_q,
                            token_seq, token_query, positions, slots, layout_t)  # fmt: skip

    def _per_token(
        self, tables: list[array], starts: list[int], lens: list[int], tokens: int
    ) -> array:
        """Each token's sequence, its place there, its position and its cache slot, in four runs."""
        bs, batch = self.block_size, len(lens)
        counting = self.counting(max((s + n for s, n in zip(starts, lens)), default=0))
        host = array("q")
        # one token a sequence (decode): no runs to lay out
        if tokens == batch and max(lens, default=1) == 1:
            host += counting[:batch]
            host += array("q", bytes(8 * batch))
            host += array("q", starts)
            host += array("q", [t[s // bs] * bs + s % bs for t, s in zip(tables, starts)])
            return host
        for i, n in enumerate(lens):
            host += array("q", [i]) * n
        for n in lens:
            host += counting[:n]
        for s, n in zip(starts, lens):
            host += counting[s : s + n]
        for t, s, n in zip(tables, starts, lens):
            host += (
                t[s : s + n]
                if bs == 1
                else array("q", [t[p // bs] * bs + p % bs for p in range(s, s + n)])
            )
        return host

    def _send(self, host: array) -> torch.Tensor:
        """The pass's integers on the device, sent from pinned memory so the host need not wait for
        a pass still running."""
        values = torch.frombuffer(host, dtype=torch.int64)
        if self.device.type != "cuda":
            return values
        nbytes = len(host) * values.element_size()
        sent = self.staging.send(nbytes, lambda buffer: buffer.view(torch.int64).copy_(values))
        return sent.view(torch.int64)
