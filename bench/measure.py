"""What the benchmark measures: the device's ceilings, the floor and the Orin projection of a run, where a call's
seconds went (from the observer's pass records), allocator calls, the device's idle gaps and the host's memory."""

import time
from pathlib import Path

import torch

from orinfer.memory import GiB, proc_kib_fields
from orinfer.observe import PassRecord

# The Orin 32 GB's rates for projections: its datasheet (dense bf16 at 930 MHz on 14 SMs; LPDDR5), and those
# measured on an AGX Orin 64 GB in MAXN (cuBLAS bf16 GEMM ~79 % of peak, a GPU read ~75 % of 204.8 GB/s;
# infinigence/ApxInf doc/jetson-roofline.md) scaled to the 32 GB's peak.
ORIN_DATASHEET = (26.7e12, 204.8e9)
ORIN_MEASURED = (21.0e12, 150e9)


def ceilings() -> dict:
    """Measured bf16 GEMM rate (random data, M=N=K=8192) and device copy bandwidth (bytes read + written)."""

    timed = median_seconds
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    gemm = 2 * n**3 / timed(lambda: a @ b, 20)
    src = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy = 2 * src.numel() * 2 / timed(lambda: dst.copy_(src), 10)
    return {"gemm_flops": gemm, "copy_bytes_per_s": copy}


def pass_costs(cfg) -> tuple[int, int]:
    """FLOPs per computed token (2 x the parameters a token passes through; the lm_head only runs for sampled
    positions and is left out) and the bytes of weights one pass reads (bf16)."""
    return 2 * (cfg.num_parameters - 2 * cfg.vocab_size * cfg.hidden_size), cfg.num_parameters * 2


def orin_projection(
    pass_tokens: list[int],
    flops_per_token: float,
    weight_bytes: int,
    rates: tuple[float, float] = ORIN_DATASHEET,
) -> float:
    """A projection, not a measurement: each pass costs the larger of its FLOPs at the rate and one read of the
    weights at the bandwidth, `rates` = (FLOP/s, bytes/s): the datasheet's by default, or ORIN_MEASURED."""
    flops, bandwidth = rates
    return sum(max(t * flops_per_token / flops, weight_bytes / bandwidth) for t in pass_tokens)


def decode_floor(
    pass_tokens: list[int],
    kv_read_bytes: int,
    flops_per_token: float,
    weight_bytes: int,
    ceil: dict,
) -> float:
    """The least time the passes of a run can take here: each at least its FLOPs at the measured GEMM rate or one
    read of the weights at the measured copy bandwidth, whichever is larger, plus every K/V read once per pass."""
    gemm, copy = ceil["gemm_flops"], ceil["copy_bytes_per_s"]
    return (
        sum(max(t * flops_per_token / gemm, weight_bytes / copy) for t in pass_tokens)
        + kv_read_bytes / copy
    )


def kv_read_bytes(
    prompt_lengths: list[int], generated_lengths: list[int], kv_bytes_per_token: int
) -> int:
    """K/V bytes the decode steps of a run must read: step j of a request attends to its prompt and j tokens."""
    return kv_bytes_per_token * sum(
        n * p + n * (n - 1) // 2 for p, n in zip(prompt_lengths, generated_lengths)
    )


def allocator_counts() -> dict:
    """cudaMalloc / cudaFree calls of torch's device allocator and cudaHostAlloc calls of its pinned-host one, so far
    (a timed call that makes any waited for them: they can block until the device is idle)."""
    dev = torch.cuda.memory_stats()
    host = torch.cuda.host_memory_stats() if hasattr(torch.cuda, "host_memory_stats") else {}
    return {
        "device_alloc": dev.get("num_device_alloc", 0),
        "device_free": dev.get("num_device_free", 0),
        "host_alloc": host.get("num_host_alloc", 0),
    }


def device_idle(prof, least_us: float = 20.0) -> dict:
    """Where the device sat idle between the first and the last thing it ran (kernels, copies) in a profile: the
    total, and the largest gaps with their offsets from the first activity (ms)."""
    spans = sorted(
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
    )
    gaps, end = [], spans[0][1]
    for start, stop in spans[1:]:
        if start - end > least_us:
            gaps.append((round((end - spans[0][0]) / 1e3, 2), round((start - end) / 1e3, 2)))
        end = max(end, stop)
    return {
        "busy_span_ms": round((end - spans[0][0]) / 1e3, 1),
        "idle_ms": round(sum(g for _, g in gaps), 1),
        "gaps": len(gaps),
        "largest_at_ms_gap_ms": sorted(gaps, key=lambda g: -g[1])[:12],
    }


def breakdown(
    log: list[PassRecord], phases: dict[str, float], started: float, seconds: float
) -> dict:
    """Where the seconds of one call went, from its passes' records. A pass is in flight from its launch until its
    tokens are on the host; the host tokenises later requests, turns finished ones into text and launches the next
    pass meanwhile where it can. `pass_device_s` is each pass's time on the device, from its first event to its
    tokens' copy (CUDA events); `device_idle_between_s`, per pair of passes, is the device's own idle time from one
    pass's end to the next one's start (the next was not launched yet). `outside_passes_s` is the host's time with no
    pass in flight: `before_first_pass_s` (data load, the first pass's tokenisation and scheduling),
    `between_passes_s` (per gap: committing a pass and scheduling the next when it depends on it) and
    `after_last_pass_s` (the last results)."""
    ends = [p.started + p.build_s + p.wait_s for p in log]
    gaps = [max(0.0, p.started - max(ends[: i + 1])) for i, p in enumerate(log[1:])]
    before, after = log[0].started - started, started + seconds - max(ends)
    spans = [p.device for p in log]
    return {
        "tokenize_s": phases["tokenize"],
        "detokenize_s": phases["detokenize"],
        "passes": len(log),
        "device_s": sum(end - start for start, end in spans),
        "build_inputs_s": sum(p.build_s for p in log),
        "outside_passes_s": before + sum(gaps) + after,
        "before_first_pass_s": before,
        "between_passes_s": [round(g, 4) for g in gaps],
        "after_last_pass_s": after,
        "device_idle_between_s": [
            round(max(0.0, b[0] - a[1]), 4) for a, b in zip(spans, spans[1:])
        ],
        "pass_tokens": [p.tokens for p in log],
        "pass_device_s": [round(end - start, 4) for start, end in spans],
        "pass_graph": [p.graph for p in log],
    }


def host_rss_split() -> dict:
    """RssAnon / RssFile / RssShmem in GiB, and the six largest mappings by RSS (what the host memory is)."""
    out = {
        k: v / GiB
        for k, v in proc_kib_fields("/proc/self/status", ("RssAnon", "RssFile", "RssShmem")).items()
    }
    maps, name, size, anon = {}, None, 0, []
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if "-" in parts[0] and len(parts) >= 5 and not parts[0].endswith(":"):
                name = parts[5] if len(parts) > 5 else "[anon]"
                lo, hi = (int(a, 16) for a in parts[0].split("-"))
                size = hi - lo
            elif parts[0] == "Rss:":
                rss = int(parts[1]) << 10
                maps[name] = maps.get(name, 0) + rss / GiB
                if name == "[anon]" and rss >= 4 << 20:
                    anon.append((round(rss / (1 << 20)), round(size / (1 << 20))))
    out["top"] = {
        Path(k).name: round(v, 3) for k, v in sorted(maps.items(), key=lambda kv: -kv[1])[:6]
    }
    # Unnamed mappings of >= 4 MiB resident, as [MiB resident, MiB mapped]: malloc's thread arenas map 64 MiB each,
    # what else is large (module images, Python's and torch's large blocks) shows its own sizes.
    out["anon_mappings"] = sorted(anon, reverse=True)[:16]
    with open("/proc/self/status") as f:
        out["threads"] = next(int(line.split()[1]) for line in f if line.startswith("Threads:"))
    return out


def median_seconds(fn, reps: int, warmups: int = 1) -> float:
    """The median device time of one call of fn(), by CUDA events around each of `reps` calls (after
    `warmups` untimed ones)."""
    for _ in range(warmups):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def host_ms_per_call(fn, reps: int = 20) -> float:
    """Milliseconds of host time a call of fn() takes (after one untimed call)."""
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1e3


def device_ms_per_call(fn, calls: int = 50) -> float:
    """Milliseconds of device time a call of fn() takes, by CUDA events (after one untimed call)."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls
