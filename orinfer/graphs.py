"""CUDA graphs of small passes, captured per shape bucket and replayed with the inputs padded to the
bucket: which passes a graph takes and how they are padded is the layout's (attention/varlen.py: any
pass of up to 1,024 tokens, whose eager launches would take about as long as its work;
attention/padded.py: a pass whose every sequence feeds exactly one token). A replay refreshes the
captured pass's per-pass tensors (the fields declared with attention.per_pass) from the new pass's,
so a new layout field is declared once, where the layout is defined.

Captured over reversed buckets that share one memory pool, as nano-vllm's ModelRunner does
(https://github.com/GeeeekExplorer/nano-vllm, MIT: nanovllm/engine/model_runner.py).
"""

from typing import Callable

import torch

from .attention.core import Context, per_pass_fields
from .block_manager import SCRATCH_BLOCK
from .sequence import Sequence, Work


class CudaGraphs:
    """The captured passes of one layout, by shape bucket; empty until `capture` (and on CPUs)."""

    def __init__(self, layout):
        self.layout = layout
        self.captured: dict[
            tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor, Context, torch.Tensor]
        ] = {}
        # the buckets of the two dimensions of a graph's shape
        self.dims: tuple[list[int], list[int]] = ([], [])

    def __len__(self) -> int:
        return len(self.captured)

    def shape_for(self, works: list[Work]) -> tuple[int, int] | None:
        """The captured graph this pass fits, if any."""
        if not self.captured:
            return None
        shape = self.layout.graph_shape(works, self.dims)
        return shape if shape in self.captured else None

    def replay(self, shape: tuple[int, int], ids: torch.Tensor, ctx: Context) -> torch.Tensor:
        """Run the graph of `shape` on this pass's inputs (laid out at that shape); its sampled
        tokens (the graph's output buffer, overwritten by the next replay)."""
        graph, captured_ids, captured, out = self.captured[shape]
        captured_ids.copy_(ids)
        for name in per_pass_fields(ctx):
            getattr(captured, name).copy_(getattr(ctx, name))
        for name in per_pass_fields(ctx.layout):
            getattr(captured.layout, name).copy_(getattr(ctx.layout, name))
        graph.replay()
        return out

    @torch.inference_mode()
    def capture(
        self, model, context: Callable, max_tokens: int, max_seqs: int, max_gather_tokens: int
    ) -> None:
        """A graph for each shape bucket a pass within these bounds can take. `context(works,
        shape)`: the pass's ids and Context laid out at that shape."""
        self.dims = tuple(
            map(sorted, self.layout.graph_dims(max_tokens, max_seqs, max_gather_tokens))
        )
        pool, shared = None, {}
        stream = torch.cuda.Stream()  # one side stream: each stream keeps its own cached blocks
        for extent in reversed(self.dims[1]):
            for size in reversed(self.dims[0]):
                if not self.layout.capturable(size, extent, max_gather_tokens):
                    continue
                ids, ctx = context(_dummy_decode(size), (size, extent))
                self.layout.share_capture_buffers(ctx.layout, extent, shared)
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    model(ids, ctx)  # warm-up outside the graph (lazy kernel and workspace set-up)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = model(ids, ctx)
                pool = graph.pool()
                # The graph reads every ctx tensor by address: all of them must outlive it.
                self.captured[(size, extent)] = (graph, ids, ctx, out)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _dummy_decode(batch: int) -> list[Work]:
    """Stand-in decode works for capture: one token each at position 0 in the scratch block."""
    seq = Sequence(
        index=-1, token_ids=[0], num_prompt_tokens=1, max_new_tokens=1, block_table=[SCRATCH_BLOCK]
    )
    return [Work(seq=seq, tokens=[0], start=0, wants_logits=True) for _ in range(batch)]
