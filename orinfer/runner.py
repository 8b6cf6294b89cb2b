"""Owner of the device: the KV pool, the choice of each pass's attention layout, and the launch and
collection of a pass (eagerly, or by a captured CUDA graph's replay).

The pool is allocated once, zero-filled (gathered padding keys must be finite: 0 * NaN would poison
SDPA), and never grown. A pass is launched and collected separately, so the engine can do host work
while the device runs it. How a pass's inputs are laid out is the attention backend's layout
(attention/, over pass_inputs.py); graphs.py captures and replays.

Follows nano-vllm's ModelRunner (https://github.com/GeeeekExplorer/nano-vllm, MIT:
nanovllm/engine/model_runner.py): the runner binds each layer's K/V cache and builds one Context a
pass.
"""

import time
from dataclasses import dataclass

import torch

from .attention import FALLBACK, Backend, Context
from .attention.core import PAD_ABOVE, PAD_MULTIPLE
from .graphs import CudaGraphs
from .model import CausalLM
from .pass_inputs import InputUploader
from .staging import pinned
from .sequence import Work


@dataclass
class Pending:
    """A launched pass: its sampled tokens (on their way to the host), and its timings for an
    observer."""

    out: torch.Tensor
    began: torch.cuda.Event | None  # recorded before the pass's first copy (None on the CPU)
    ready: torch.cuda.Event | None  # recorded after the sampled tokens' copy to the host
    t0: float  # perf_counter() when the launch began
    t1: float  # ... when its inputs were built
    graph: bool
    # the host buffer `out` lies in, reused once the tokens are read
    pinned: torch.Tensor | None = None
    # the sampled tokens where the pass left them (a chained pass's input)
    on_device: torch.Tensor | None = None
    t2: float = 0.0  # set by collect: when the tokens were on the host
    # set by collect on CUDA: start and end on the device's clock
    device_span: tuple[float, float] | None = None


class ModelRunner:
    """`backend` and its `kernels`: the attention backend a pass takes (attention.resolve; default:
    the padded layout); `padding`: (above, multiple): the backend's eager passes of more than
    `above` tokens are padded to a multiple of `multiple` tokens and sampled rows, where it pads
    eager passes at all; `max_gather_tokens`: the keys the padded layout gathers at once (the memory
    plan's), its groups' bound."""

    def __init__(
        self,
        model: CausalLM,
        num_blocks: int,
        block_size: int,
        backend: Backend = FALLBACK,
        kernels=(),
        padding: tuple[int, int] = (PAD_ABOVE, PAD_MULTIPLE),
        max_gather_tokens: int = 1 << 30,
    ):
        cfg = model.cfg
        self.model, self.block_size, self.device = model, block_size, model.device
        self.backend, self.kernels = backend, kernels
        self.kv = torch.zeros(
            cfg.num_hidden_layers,
            2,
            num_blocks,
            block_size,
            cfg.num_key_value_heads,
            cfg.head_dim,
            dtype=model.dtype,
            device=self.device,
        )
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.k_cache, layer.self_attn.v_cache = self.kv[i, 0], self.kv[i, 1]
        uploader = InputUploader(self.device, block_size, model.embedding_on_host)
        above, multiple = padding if backend.pads_eager_passes else (PAD_ABOVE, 1)
        # The layouts, in the order they are tried: the backend's, then the padded one where it is
        # another (a pass whose keys reach past the sliding window takes it). Graphs are captured
        # for the first.
        self.layouts = [backend.layout(kernels, uploader, cfg, max_gather_tokens, above, multiple)]
        if backend is not FALLBACK:
            self.layouts.append(
                FALLBACK.layout(
                    FALLBACK.kernels(), uploader, cfg, max_gather_tokens, PAD_ABOVE, PAD_MULTIPLE
                )
            )
        self.graphs = CudaGraphs(self.layouts[0])
        # Tokens come down into a pinned buffer that no uncollected pass holds.
        self._sampled: list[torch.Tensor] = []
        self._epoch: torch.cuda.Event | None = None  # the device clock's zero (the first launch)

    @property
    def eager_padding(self) -> tuple[int, int] | None:
        """(above, multiple): an eager pass of more than `above` tokens is padded to a multiple of
        `multiple` (the first layout's rule; None: no padding)."""
        first = self.layouts[0]
        return (first.pad_above, first.pad_multiple) if first.pad_multiple > 1 else None

    def release(self) -> None:
        """Drop the KV pool and the graphs (the layers' cache views too), so that their memory can
        be given back."""
        for layer in self.model.model.layers:
            layer.self_attn.k_cache = layer.self_attn.v_cache = None
        self.kv = None
        self.graphs.captured.clear()

    def context(
        self,
        works: list[Work],
        shape: tuple[int, int] | None = None,
        feed: torch.Tensor | None = None,
    ):
        """Flat input ids and the attention Context of one pass, optionally padded to a graph's
        shape (of the first layout, which then takes it). `feed`: the sampled tokens of the pass
        before, on the device, where works' fed_row point (chained steps)."""
        ends = [w.start + len(w.tokens) for w in works]
        layout = next(lay for lay in self.layouts if lay.takes(ends))
        inputs, attention = layout.build(works, shape, feed)
        return inputs.ids, Context(
            positions=inputs.positions,
            slots=inputs.slots,
            sample_rows=inputs.sample_rows,
            layout=attention,
        )

    def capture_graphs(self, max_tokens: int, max_seqs: int, max_gather_tokens: int) -> None:
        """Capture a graph for each shape bucket a pass within these bounds can take."""
        if self.model.embedding_on_host:
            raise ValueError(
                "a graph cannot replay a token table read on the host (the memory plan keeps them "
                "apart)"
            )
        self.graphs.capture(self.model, self.context, max_tokens, max_seqs, max_gather_tokens)

    @torch.inference_mode()
    def launch(self, works: list[Work], fed_by: "Pending | None" = None) -> "Pending":
        """Start one forward pass. The device runs it while the host goes on, which may launch the
        next pass before collecting this one: nothing here waits for the device, and the sampled
        tokens are copied out (into pinned host memory) in stream order, before a later replay can
        reuse a graph's output buffer. `fed_by`: the pass whose sampled tokens the chained steps
        among `works` take (Work.fed_row), read on the device in stream order, before this pass
        could overwrite them."""
        t0 = time.perf_counter()
        began = ready = None
        if self.device.type == "cuda":
            if self._epoch is None:
                self._epoch = torch.cuda.Event(enable_timing=True)
                self._epoch.record()
            began, ready = (
                torch.cuda.Event(enable_timing=True),
                torch.cuda.Event(enable_timing=True),
            )
            began.record()
        shape = self.graphs.shape_for(works)
        sampled = sum(w.sampled_rows for w in works)  # the rows past these are padding
        ids, ctx = self.context(works, shape, fed_by.on_device if fed_by is not None else None)
        t1 = time.perf_counter()
        out = (self.graphs.replay(shape, ids, ctx) if shape is not None else self.model(ids, ctx))[
            :sampled
        ]
        on_device, host = out, None
        if ready is not None:
            fits = [i for i, buf in enumerate(self._sampled) if buf.numel() >= len(out)]
            host = self._sampled.pop(fits[0]) if fits else pinned(len(out))
            host[: len(out)].copy_(out, non_blocking=True)
            ready.record()
            out = host[: len(out)]
        return Pending(out, began, ready, t0, t1, shape is not None, host, on_device)

    def collect(self, pending: "Pending") -> list[int]:
        """The greedy tokens of every sampling row of a launched pass, in order (waits for that pass
        only)."""
        if pending.ready is not None:
            pending.ready.synchronize()
            pending.device_span = (
                self._epoch.elapsed_time(pending.began) / 1e3,
                self._epoch.elapsed_time(pending.ready) / 1e3,
            )
        tokens = pending.out.tolist()
        pending.t2 = time.perf_counter()
        if pending.pinned is not None:
            self._sampled.append(pending.pinned)
        return tokens
