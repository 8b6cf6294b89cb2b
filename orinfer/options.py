"""How the engine runs: one immutable value given to optimize.build() and passed down. Every choice
leaves the output unchanged (the tests prove each against the pipeline); the defaults are the
fastest where they apply."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Options:
    # drafts (listed choices, lookups) verified in the same pass (speculation.py)
    speculate: bool = True
    # small passes replayed from CUDA graphs, where the memory plan affords them
    cuda_graphs: bool = True
    # elementwise kernels fused by torch.compile (None: where available, kernels.py)
    compile: bool | None = None
    # elementwise kernels fused by orinfer's CUDA extension (extension.py), where torch.compile is
    # not taken (None: on a CUDA device where it builds; a build that fails is said, not hidden)
    cuda_extension: bool | None = None
    # The attention backend (attention/__init__.py's BACKENDS: "varlen", "paged", "padded",
    # "reference");
    # None: the first of attention.PREFERRED that runs here and the memory plan affords.
    attention: str | None = None
    # Sequences with at most this many new tokens take the packed Triton kernel in an eager pass (0:
    # never): FlashAttention's one-head tiles of 128 rows are mostly empty for short prompt chunks
    # too (BENCHMARKS.md times the bound).
    packed_queries: int = 128
    pass_tokens: int | None = None  # tokens a pass (None: the memory plan's)
    # pass size under which lookup drafts ride along (None: measured on CUDA)
    lookup_draft_tokens: int | None = None
    # Where drafts come from (speculation.py): "choices" (the rest of a listed choice the answer has
    # begun), "own" (what followed the answer's last tokens earlier in its own prompt and output),
    # "pool" (in this run's other answers).
    draft_sources: tuple[str, ...] = ("choices", "own", "pool")
    # Python's cyclic collector paused during a call (optimize.py says why)
    pause_gc: bool = True
    # A decode pass launched before the one in flight is committed, its tokens fed from that pass's
    # on the device (Scheduler.chain), where its sequences would draft nothing: the device no longer
    # waits for the host's commit.
    chain_decode: bool = True

    def __post_init__(self):
        unknown = set(self.draft_sources) - {"choices", "own", "pool"}
        if unknown:
            raise ValueError(
                f"draft_sources: unknown {sorted(unknown)}; choose among choices, own, pool"
            )
