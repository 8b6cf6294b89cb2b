"""The memory budget: how many bytes the process may use, and how the engine's buffers are sized
from it.

On a Jetson the CPU and GPU share one DRAM, so the budget covers host and device together, and the
weights (26.0 GiB for Phi-3-medium in bf16) leave little. Every size the engine uses (KV blocks,
tokens per pass, gathered attention tokens, sequences at once) is derived here from what the budget
leaves after the weights.
"""

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelConfig
from .integers import power_of_two

GiB = 1 << 30
MiB = 1 << 20
CUDA_CONTEXT_BYTES = 512 * MiB  # the CUDA context lives in the shared DRAM on an integrated GPU
# Host growth after the plan is made (the load, kernel modules loaded on first use, the heap):
# booked a little above what the Orin emulation measured under the Jetson's transformers
# (BENCHMARKS.md, "The Orin emulation"): the host's share comes out of the KV cache, and an
# underestimate ends in an out-of-memory error mid-run. The pinned buffers and token-table rows are
# booked apart below.
WARMUP_HOST_BYTES = 440 * MiB
# The runner's pinned buffers (inputs up, tokens down; >= 2 MiB each, ~4 of them): page-locked host
# memory.
PINNED_HOST_BYTES = 16 * MiB
GRAPHS_HOST_BYTES = 512 * MiB
# Graphs save launch time, which matters where a pass is short, and an attention backend's kernels
# may save attention work; on shared memory each is used only where the budget leaves this much
# besides its host memory (a 32 GB Orin does not: its decode pass takes far longer to run than to
# launch, and without those kernels the padded layout keeps more KV cache; BENCHMARKS.md).
OPTIONAL_MIN_FREE_BYTES = 2 * GiB
# Device memory besides the weights, the cache and the workspace: cuBLAS's workspace (one block of
# torch's pool from the first product on) and the allocator's rounding of a pass's tensors. The
# allocator is capped at the plan's device share, so at the cap it frees cached blocks rather than
# take the host's share; what it cannot free is what live tensors hold, which this margin covers.
SAFETY_BYTES = 96 * MiB


def proc_kib_fields(path: str, names: tuple[str, ...]) -> dict[str, int]:
    """Bytes of the named "Name:   N kB" lines of a /proc file such as /proc/meminfo or
    /proc/self/status."""
    found = {}
    with open(path) as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in names:
                found[name] = int(value.split()[0]) * 1024
    missing = [n for n in names if n not in found]
    if missing:
        raise RuntimeError(f"{path} has no {', '.join(missing)}")
    return found


def meminfo_available() -> int:
    """MemAvailable: free plus reclaimable page cache (what cudaMemGetInfo misses on unified
    memory)."""
    return proc_kib_fields("/proc/meminfo", ("MemAvailable",))["MemAvailable"]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """VmHWM, this address space's RSS high-water mark (ru_maxrss would carry a parent's peak across
    fork + exec)."""
    return proc_kib_fields("/proc/self/status", ("VmHWM",))["VmHWM"]


def is_integrated(device: torch.device) -> bool:
    if device.type != "cuda":
        return True  # CPU: the "device" memory is host memory
    props = torch.cuda.get_device_properties(device)
    # `is_integrated` is missing from some older torch builds; Jetson Orin (8.7) and Xavier (7.2)
    # are integrated.
    return bool(getattr(props, "is_integrated", False)) or (props.major, props.minor) in (
        (8, 7),
        (7, 2),
    )


# Kept out of an automatic budget on shared memory: what other processes allocate while the run goes
# on (a shell, the journal, a monitor) would otherwise come out of the run's own margin, and zram
# turns that overrun into a swap storm.
AUTO_RESERVE_BYTES = 256 * MiB
DESKTOP_PROCESSES = (
    "Xorg",
    "Xwayland",
    "gnome-shell",
    "gdm3",
    "lightdm",
    "plasmashell",
    "xfce4-session",
)


def shared_memory_terms(root: Path = Path("/")) -> dict[str, int]:
    """What an automatic budget on shared memory is made of, each in bytes (files under `root`, for
    tests): this process's private memory (RssAnon: its mapped file pages are the page cache's,
    already in MemAvailable), MemAvailable, the free CMA pool inside it (reserved for contiguous
    device buffers: GPU pages cannot use it), the reserve, and a container's cgroup limit less what
    the cgroup holds (absent where there is none)."""
    meminfo = proc_kib_fields(str(root / "proc/meminfo"), ("MemAvailable",))
    terms = {
        "private": proc_kib_fields(str(root / "proc/self/status"), ("RssAnon",))["RssAnon"],
        "available": meminfo["MemAvailable"],
        "reserve": AUTO_RESERVE_BYTES,
        "free CMA": _optional_kib(root / "proc/meminfo", "CmaFree"),
    }
    limit = _cgroup_room(root)
    if limit is not None:
        terms["cgroup room"] = limit
    return terms


def _optional_kib(path: Path, name: str) -> int:
    try:
        return proc_kib_fields(str(path), (name,))[name]
    except (RuntimeError, OSError):
        return 0


def _cgroup_room(root: Path) -> int | None:
    """The container's memory limit less what its cgroup holds now (cgroup v2, else v1); None
    without a limit."""
    for limit, usage in (
        ("memory.max", "memory.current"),
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"),
    ):
        try:
            cap = (root / "sys/fs/cgroup" / limit).read_text().strip()
            used = int((root / "sys/fs/cgroup" / usage).read_text().strip())
        except (OSError, ValueError):
            continue
        if cap.isdigit() and int(cap) < 1 << 60:  # v1 writes a huge number for "no limit"
            return int(cap) - used
    return None


def shared_budget(terms: dict[str, int]) -> int:
    """The automatic budget on shared memory from shared_memory_terms: private + available - free
    CMA - reserve, no more than the process's private memory plus the cgroup's room where a
    container caps it."""
    budget = terms["private"] + terms["available"] - terms["free CMA"] - terms["reserve"]
    if "cgroup room" in terms:
        budget = min(budget, terms["private"] + terms["cgroup room"] - terms["reserve"])
    return max(0, budget)


def describe_terms(terms: dict[str, int]) -> str:
    """'this process's private 0.26 + MemAvailable 22.20 - free CMA 0.50 - reserve 0.25 GiB (cgroup
    room 20.00)'."""
    text = (
        f"this process's private {terms['private'] / GiB:.2f} + MemAvailable "
        f"{terms['available'] / GiB:.2f} - free CMA {terms['free CMA'] / GiB:.2f} - reserve "
        f"{terms['reserve'] / GiB:.2f} GiB"
    )
    return text + (
        f" (a container's limit leaves {terms['cgroup room'] / GiB:.2f})"
        if "cgroup room" in terms
        else ""
    )


def desktop_session(root: Path = Path("/")) -> str | None:
    """The name of a desktop session's process, where one runs (it holds ~0.8 GB a headless boot
    frees)."""
    for comm in (root / "proc").glob("[0-9]*/comm"):
        try:
            name = comm.read_text().strip()
        except OSError:
            continue
        if name in DESKTOP_PROCESSES:
            return name
    return None


def auto_budget(device: torch.device) -> int:
    """Bytes this process may use in all: on shared memory shared_budget (the CPU too), else free
    VRAM."""
    if is_integrated(device):
        return shared_budget(shared_memory_terms())
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device)


def is_out_of_memory(error: BaseException) -> bool:
    """An allocation that failed: torch's OutOfMemoryError, or what a failed cudaMalloc raises on
    Tegra, where the caching allocator asks NVML (which has no Orin GPU) and fails an assert instead
    (pytorch/pytorch#185240)."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and (
        "NVML_SUCCESS == r INTERNAL ASSERT FAILED" in text or "CUDA error: out of memory" in text
    )


def parse_budget(text: str | int | None, device: torch.device) -> int:
    if text is None or text == "auto":
        return auto_budget(device)
    units = {"k": 1 << 10, "m": MiB, "g": GiB, "t": 1 << 40}
    s = str(text).strip().lower().removesuffix("ib").removesuffix("b")
    try:
        value = float(s[:-1]) * units[s[-1]] if s and s[-1] in units else float(s)
    except (ValueError, IndexError):
        value = math.nan
    if not math.isfinite(value) or value < 1:
        raise ValueError(
            f"--memory-budget {text!r}: expected a positive size in bytes, e.g. 28.5GiB, 29000M or "
            "auto"
        )
    return int(value)


def machine_bytes(device: torch.device, shared_host: bool) -> int:
    """The most a budget can hold here: the host's memory where the process shares it, else the
    GPU's."""
    if shared_host or device.type != "cuda":
        return proc_kib_fields("/proc/meminfo", ("MemTotal",))["MemTotal"]
    return torch.cuda.get_device_properties(device).total_memory


@dataclass(frozen=True)
class MemoryPlan:
    budget: int
    weights: int
    # host process and CUDA context, counted only where they share the budget
    overhead: int
    overhead_items: tuple[tuple[str, int], ...]  # what the overhead is, item by item
    kv_bytes: int
    workspace_bytes: int
    num_blocks: int
    block_size: int
    max_num_seqs: int
    max_batched_tokens: int
    max_gather_tokens: int
    max_drafts: int
    cuda_graphs: bool
    # the planned attention backend's kernels: the runner still checks they run here
    attention_afforded: bool
    attention: str  # the backend planned for (attention.Backend.name), shown in describe()
    # bytes of the token table when it is read from the checkpoint's file, else 0
    embedding_table: int = 0
    shared_host: bool = False  # the budget covers the host process too (a Jetson)
    # the most rows one MLP product takes (None: a pass's every token at once)
    mlp_rows: int | None = None
    # a CUDA device: a context, graphs and an attention backend's kernels are among its items
    cuda: bool = True
    # the KV pool holds what the run can use, less than the budget leaves
    sized_to_run: bool = False
    # the CUDA graphs' own memory pool (their largest pass's peak), besides the workspace
    graph_pool_bytes: int = 0
    # One sequence's attention in a full pass, per key: its gathered keys and values, its mask's row
    # of the pass's queries, and where no fused kernel takes a mask (the CPU) the scores; with the
    # pass's other activations.
    attention_bytes_per_key: int = 0
    activation_bytes: int = 0

    @property
    def embedding_on_host(self) -> bool:
        return self.embedding_table > 0

    @property
    def device_cap(self) -> int | None:
        """Bytes torch's allocator may hold where memory is shared: the budget less the host's share
        (its weights, workspace, KV cache and slack); None on a discrete GPU."""
        return self.budget - self.overhead if self.shared_host else None

    @property
    def kv_tokens(self) -> int:
        return (self.num_blocks - 1) * self.block_size

    @property
    def unused(self) -> int:
        return (
            self.budget
            - self.weights
            + self.embedding_table
            - self.overhead
            - self.workspace_bytes
            - self.graph_pool_bytes
            - self.kv_bytes
        )

    def holds(self, tokens: int) -> bool:
        """Whether one sequence of `tokens` tokens (prompt and answer) fits: its KV cache, and its
        attention beside a full pass's activations in the workspace and what the budget leaves
        unused."""
        attention = self.activation_bytes + tokens * self.attention_bytes_per_key
        return tokens <= self.kv_tokens and attention <= self.workspace_bytes + max(0, self.unused)

    def describe(self) -> str:
        items = " + ".join(f"{name} {size / GiB:.2f}" for name, size in self.overhead_items)
        rest = self.unused
        table = (
            f" - token table {self.embedding_table / GiB:.2f} read from the file"
            if self.embedding_on_host
            else ""
        )
        sized = ", sized to the run's prompts and answers" if self.sized_to_run else ""
        pool = f" + graphs' pool {self.graph_pool_bytes / GiB:.2f}" if self.graph_pool_bytes else ""
        device = (
            (
                f"; graphs {'on' if self.cuda_graphs else 'off'}, {self.attention} attention "
                f"{'allowed' if self.attention_afforded else 'off'}"
            )
            if self.cuda
            else ""
        )
        return (
            f"memory plan: budget {self.budget / GiB:.2f} GiB = weights "
            f"{self.weights / GiB:.2f}{table} + overhead "
            f"{self.overhead / GiB:.2f}{f' ({items})' if items else ''} + workspace "
            f"{self.workspace_bytes / GiB:.2f}{pool} + KV {self.kv_bytes / GiB:.2f} "
            f"({self.kv_tokens} tokens{sized}) + unused {rest / GiB:.2f}; <= {self.max_num_seqs} "
            f"sequences, {self.max_batched_tokens} tokens a pass{device}"
        )


# A shared-memory plan runs the MLP over at most this many rows at a time, so that its [rows,
# intermediate] activations (most of a layer's) do not grow with the pass: an Orin's GEMMs stay
# compute-bound down to ~130 rows (26.7 TFLOP/s against 204.8 GB/s), so 256-row products cost a
# prefill pass nothing, while the cache gains.
SHARED_MLP_ROWS = 256
# The most tokens a CUDA graph's pass holds (the varlen layout's largest graph; the padded layout's
# graphs hold at most 512 one-token sequences).
GRAPH_PASS_TOKENS = 1024
# The least KV cache a plan may leave: a budget that leaves less is too small for any useful run.
MIN_KV_TOKENS = 256


class BudgetTooSmall(MemoryError):
    """The budget cannot hold the model and the least KV cache; optimize.py says what would."""


def activation_bytes(cfg: ModelConfig, itemsize: int, tokens: int, mlp_rows: int) -> int:
    """Live activations at the peak of a layer in a pass of `tokens` tokens whose MLP takes
    `mlp_rows` rows at a time: per token the residual stream, norms, qkv and attention (float32 norm
    temporaries too, and the MLP's joined output where it is taken in parts), per MLP row its three
    [rows, intermediate] tensors (the SiLU gate is written in place eager, once compiled), with a
    quarter on top for allocator rounding."""
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    hidden = 5 if tokens > mlp_rows else 4
    per_token = (hidden * cfg.hidden_size + 2 * qkv) * itemsize + 2 * cfg.hidden_size * 4
    per_row = 3 * cfg.intermediate_size * itemsize
    return (tokens * per_token + min(tokens, mlp_rows) * per_row) * 5 // 4


def gather_bytes_per_token(cfg: ModelConfig, itemsize: int) -> int:
    """Attention copies each sequence's keys and values out of the paged pool, once: SDPA and
    FlashAttention read the copies as they are, and the padded layout frees one group's before the
    next's."""
    return 2 * cfg.num_key_value_heads * cfg.head_dim * itemsize


def attention_bytes_per_query_key(cfg: ModelConfig, itemsize: int, cuda: bool) -> int:
    """What attention holds for one query against one key besides the gathered keys: the padded
    layout's mask (one row per query head of a KV head) and, where SDPA has no fused kernel that
    takes a mask (the CPU's math path), the scores and their softmax in float32 for every head."""
    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    return groups * itemsize + (0 if cuda else cfg.num_attention_heads * 4 * 2)


def _overhead(
    shared_host: bool, cuda: bool, host_bytes: int, free: int, attention
) -> tuple[list, bool, bool, bool]:
    """What the budget holds besides weights, KV and workspace, item by item; whether graphs and the
    attention backend's kernels are afforded; and whether the budget is tight (no room for graphs'
    host memory, on any device). Only where the process shares the budget (a Jetson, or the CPU) is
    the host counted; only on CUDA are a context and graphs."""
    items = (
        [("host at planning", host_bytes), ("host growth to come", WARMUP_HOST_BYTES)]
        if shared_host
        else []
    )
    if shared_host and cuda:
        items += [("pinned buffers", PINNED_HOST_BYTES), ("CUDA context", CUDA_CONTEXT_BYTES)]
    free -= sum(size for _, size in items)
    afforded, tight = [], False
    on_device = "cuda" if cuda else "cpu"
    for name, host_cost, runs in (
        ("graphs", GRAPHS_HOST_BYTES, cuda),
        (
            f"{attention.name} attention kernels",
            attention.host_bytes,
            on_device in attention.devices,
        ),
    ):
        # An optional feature that costs host memory: on shared memory only where the budget leaves
        # room besides it.
        room = not host_cost or not shared_host or free >= host_cost + OPTIONAL_MIN_FREE_BYTES
        tight = tight or (name == "graphs" and not room)
        if room and runs and shared_host and host_cost:
            items.append((name, host_cost))
            free -= host_cost
        afforded.append(room and runs)
    return items, afforded[0], afforded[1], tight


def _gather_tokens(cfg: ModelConfig, in_groups_on_shared: bool, free: int, gather: int) -> int:
    """The keys a pass may gather at once. A backend may gather a whole pass's keys at once; the
    padded layout in groups, so on shared memory its bound need only hold two sequences of the
    longest context (more groups a pass cost launches, not memory)."""
    if in_groups_on_shared:
        return 2 * cfg.max_position_embeddings
    return max(2048, min(1 << 20, free // 10 // gather))


# One-token blocks share every common prompt prefix, not only whole blocks of it (the shared
# instruction's last token, and stems that begin alike). The K/V gathers and the cache writes move
# the same bytes either way; the host hashes a block per prompt token, once.
def plan_memory(
    cfg: ModelConfig, budget: int, weights: int, itemsize: int, shared_host: bool, host_bytes: int,
    cuda: bool = True, block_size: int = 1, max_drafts: int | None = None,
    table_in_checkpoint: bool = False, kv_tokens_wanted: int | None = None, *, attention,
) -> MemoryPlan:  # fmt: skip
    """`table_in_checkpoint`: the checkpoint stores the token table in the run's dtype, so a pass
    can read its rows from there. `kv_tokens_wanted`: the most KV cache the run can use (its prompts
    and answers at the plan's concurrency); the pool is never larger, and never larger than the
    budget leaves. `attention`: the backend the run would use (attention.Backend: its name, kernels'
    host memory, devices and whether it gathers a whole pass)."""
    items, cuda_graphs, afforded, tight = _overhead(
        shared_host, cuda, host_bytes, budget - weights - SAFETY_BYTES, attention
    )
    # Shared memory too tight for graphs (a graph replays device reads; these rows come from the
    # host): the token table leaves the pool, read row by row from the checkpoint's file (the rows
    # stay in the reclaimable page cache).
    tight_table = shared_host and table_in_checkpoint and tight
    table = cfg.vocab_size * cfg.hidden_size * itemsize if tight_table else 0
    free = budget - weights - SAFETY_BYTES - sum(size for _, size in items) + table
    if max_drafts is None:  # draft rows need logits; small budgets verify fewer drafts a pass
        max_drafts = 16 if free > 8 * GiB else 4
    in_groups = shared_host and not (afforded and attention.gathers_whole_pass)
    shape = _PassShape.of(cfg, itemsize, free, shared_host, in_groups, cuda_graphs, max_drafts)
    # a pass's rows and their places, read on the host into two pinned buffers (staging.Staging:
    # one in flight, one filling), each a power of two
    rows = 2 * power_of_two(shape.tokens * (cfg.hidden_size * itemsize + 8)) if table else 0
    if rows:
        items.append(("token table rows of a pass", rows))
    max_num_seqs = max(
        1, min(512, shape.tokens, (free - shape.layers - rows) // shape.kv_per_token // 64)
    )
    # The LM head runs after the last layer, when only the residual stream's two tensors are left of
    # the pass; its rows and argmax's.
    logits = max_num_seqs * (1 + max_drafts) * cfg.vocab_size * itemsize * 2
    workspace = max(shape.layers, 2 * shape.tokens * cfg.hidden_size * itemsize + logits)
    left = free - rows - workspace - shape.graph_pool
    kv_tokens = _kv_tokens(cfg, left // shape.kv_per_token, max_num_seqs, budget, weights)
    sized = kv_tokens_wanted is not None and kv_tokens_wanted < kv_tokens
    num_blocks = (max(MIN_KV_TOKENS, kv_tokens_wanted) if sized else kv_tokens) // block_size + 1
    per_key = shape.gather + attention_bytes_per_query_key(cfg, itemsize, cuda) * shape.tokens
    return MemoryPlan(
        budget=budget, weights=weights, overhead=sum(size for _, size in items),
        overhead_items=tuple(items), kv_bytes=(num_blocks - 1) * block_size * shape.kv_per_token,
        workspace_bytes=workspace, num_blocks=int(num_blocks), block_size=block_size,
        max_num_seqs=int(max_num_seqs), max_batched_tokens=shape.tokens,
        max_gather_tokens=int(shape.gather_tokens), max_drafts=max_drafts, cuda_graphs=cuda_graphs,
        attention_afforded=afforded, attention=attention.name, embedding_table=table,
        shared_host=shared_host, mlp_rows=shape.mlp_rows, cuda=cuda, sized_to_run=sized,
        graph_pool_bytes=shape.graph_pool, activation_bytes=shape.activations,
        attention_bytes_per_key=per_key,
    )  # fmt: skip


def _kv_tokens(
    cfg: ModelConfig, kv_tokens: int, max_num_seqs: int, budget: int, weights: int
) -> int:
    """The KV cache's tokens: what the budget leaves, never more than max_num_seqs full-length
    sequences can use (a big pool costs start-up time and, on a CPU or a Jetson, memory the rest of
    the machine could have); too few is BudgetTooSmall."""
    if kv_tokens < MIN_KV_TOKENS:
        raise BudgetTooSmall(
            f"memory budget {budget / GiB:.2f} GiB leaves {max(0, kv_tokens)} tokens of KV cache "
            f"after weights ({weights / GiB:.2f} GiB), overhead and workspace"
        )
    return min(kv_tokens, max_num_seqs * cfg.max_position_embeddings)


@dataclass(frozen=True)
class _PassShape:
    """A pass's size and what its layers hold at their peak, from what the budget leaves free."""

    tokens: int
    mlp_rows: int | None
    gather: int  # bytes a gathered key costs (its K and V)
    gather_tokens: int
    kv_per_token: int
    layers: int  # a pass's peak inside its layers
    activations: int
    graph_pool: int

    @classmethod
    def of(
        cls, cfg, itemsize, free, shared_host, in_groups, cuda_graphs, max_drafts
    ) -> "_PassShape":
        mlp_rows = SHARED_MLP_ROWS if shared_host else None

        def act(n: int) -> int:
            return activation_bytes(cfg, itemsize, n, mlp_rows or n)

        tokens = 64
        while tokens * 2 <= 16384 and act(tokens * 2) <= free // 4:
            tokens *= 2
        gather = gather_bytes_per_token(cfg, itemsize)
        gather_tokens = _gather_tokens(cfg, in_groups, free, gather)
        # Captured graphs keep their own pool, apart from the eager passes' memory: their largest
        # pass's peak, in which the padded layout holds its gathered keys and values twice (SDPA's
        # kernel takes them contiguous).
        graph_pool = act(min(tokens, GRAPH_PASS_TOKENS)) + 2 * gather_tokens * gather
        return cls(tokens, mlp_rows, gather, gather_tokens, cfg.kv_bytes_per_token // 2 * itemsize,
                   act(tokens) + gather_tokens * gather, act(tokens),
                   graph_pool if cuda_graphs else 0)  # fmt: skip
