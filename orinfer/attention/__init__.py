"""Attention backends behind one registry. The runner, the engine and the memory plan read a
backend's declared contract (core.Backend: its kernels, its layout, what its kernels cost the host,
whether it gathers a whole pass's keys, which passes its graphs take) and never its name;
Options.attention names one.

- varlen.py: FlashAttention's variable-length kernel (and the packed Triton kernel, packed.py) on
  the flat queries, where a CUDA torch has them: no padding, no mask.
- paged.py: orinfer's CUDA kernel (csrc/attention.cuh) reading the paged cache in place, where the
  CUDA extension is built (no gathers, no padding, no mask): the Orin's.
- padded.py: SDPA over padded [sequences, queries] grids with a mask, on every device and dtype;
  also the layout a pass takes where the chosen backend's cannot (keys past a sliding window).
- float32_reference.py: the float32 reference kernels (reference.py) with the varlen layout: slow,
  exact, on any device.

A new kernel is one file declaring its BACKEND and one line in BACKENDS.
"""

from . import float32_reference, padded, paged, varlen

# The package's surface, besides the registry.
from .core import Backend, Context, paged_attention, per_pass, per_pass_fields  # noqa: F401

BACKENDS: dict[str, Backend] = {
    b.name: b for b in (varlen.BACKEND, paged.BACKEND, padded.BACKEND, float32_reference.BACKEND)
}
# Options.attention=None takes the first of these that runs on the device, the plan affords, and
# passes its check: "paged" where torch has no varlen kernel and orinfer's extension is built (the
# Orin), before the padded layout's gathers (BENCHMARKS.md, run 91).
PREFERRED = ("varlen", "paged", "padded")
FALLBACK = padded.BACKEND


def planned(name: str | None, device_type: str) -> Backend:
    """The backend the memory plan books: the one named, or the first preferred that can run on this
    device type. A name that is not registered, or a backend that cannot run on this device type, is
    a ValueError."""
    if name is None:
        return next(BACKENDS[n] for n in PREFERRED if device_type in BACKENDS[n].devices)
    if name not in BACKENDS:
        raise ValueError(
            f"attention backend {name!r} is unknown; choose among {', '.join(BACKENDS)}"
        )
    if device_type not in BACKENDS[name].devices:
        raise ValueError(
            f"attention backend {name!r} runs on {', '.join(BACKENDS[name].devices)}, not "
            f"{device_type}"
        )
    return BACKENDS[name]


def resolve(
    name: str | None,
    afforded: bool,
    device,
    dtype,
    cfg,
    packed_queries: int,
    cuda_extension: bool = False,
) -> tuple[Backend, object]:
    """The backend a run uses and its kernels: the one named, or the first of PREFERRED that runs
    on this device whose kernels run here and pass their check. The planned backend (`planned`) is
    taken only where the memory plan affords it (`afforded`); another only where its kernels cost
    the host nothing the plan books; one needing orinfer's CUDA extension only where
    `cuda_extension` (Options.cuda_extension, resolved). One asked for by name that cannot run is a
    RuntimeError: never a silent change."""
    chosen = planned(name, device.type)
    heads, kv_heads, dim = cfg.attention_heads
    candidates = (
        [chosen]
        if name is not None
        else [BACKENDS[n] for n in PREFERRED if device.type in BACKENDS[n].devices]
    )
    for backend in candidates:
        fits = afforded if backend is chosen else backend.host_bytes == 0
        allowed = cuda_extension or not backend.needs_cuda_extension
        kernels = (
            backend.kernels(device, dtype, heads, kv_heads, dim, packed_queries)
            if fits and allowed
            else None
        )
        if kernels is not None:
            return backend, kernels
    if name is None:
        return FALLBACK, FALLBACK.kernels()
    why = (
        "needs orinfer's CUDA extension (--no-cuda-extension, or it did not build)"
        if not allowed
        else "does not run here (its check failed)"
        if afforded
        else "is not afforded by the memory plan"
    )
    raise RuntimeError(
        f"attention backend {name!r} {why}; leave --attention unset to let the engine choose"
    )
