"""The float32 reference as a backend: the varlen layout with reference.py's kernels, on any device.
Slow and exact; the tests' CPU runs the varlen layout with it. It is also the example of adding a
kernel: this file and one line in BACKENDS (attention/__init__.py)."""

from .core import Backend
from .reference import reference_packed, reference_varlen
from .varlen import AttentionKernels, layout


def kernels(
    device, dtype, heads: int, kv_heads: int, dim: int, packed_queries: int
) -> AttentionKernels:
    return AttentionKernels(
        reference_varlen, reference_packed if packed_queries else None, packed_queries
    )


BACKEND = Backend(
    "reference",
    kernels=kernels,
    layout=layout,
    gathers_whole_pass=True,
    graphs_every_small_pass=True,
)
