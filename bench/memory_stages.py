"""The memory stages: the Orin emulation (capped: device reserved + host RSS + 0.5 GiB for the CUDA context the Orin
would share, within a budget; uncapped: the same runs without it) and the streaming loader on a full-size
checkpoint."""

import ctypes
import json
import sys
import time
from pathlib import Path

import torch

import optimize
from measure import host_rss_split, orin_projection, pass_costs
from orinfer.dataset import read_records
from orinfer.observe import Observer
from orinfer.memory import GiB, peak_rss_bytes, rss_bytes
from orinfer.options import Options
from workload import (
    ROOT,
    answer_scripts,
    fresh_run,
    long_answers,
    random_init,
    scripted,
    set_scripts,
)


def device_outside_torch() -> float:
    """GiB of device memory in use that torch's allocator does not hold: the CUDA context, library handles and
    workspaces, kernel modules (on the Orin these live in the same DRAM as everything else)."""
    free, total = torch.cuda.mem_get_info()
    return (total - free - torch.cuda.memory_reserved()) / GiB


def write_token_table(folder: Path, seed: int = 1) -> None:
    """The random token table as the folder's one-tensor checkpoint (run in a child process: its host copy must not
    count in the measured process), for a plan that reads the table's rows from the file."""
    from safetensors.torch import save_file
    from orinfer.config import ModelConfig

    cfg = ModelConfig.from_folder(folder)
    g = torch.Generator(device="cuda").manual_seed(seed)
    table = torch.empty(
        cfg.vocab_size, cfg.hidden_size, dtype=torch.bfloat16, device="cuda"
    ).normal_(0, 0.02, generator=g)
    save_file({"model.embed_tokens.weight": table.cpu()}, str(folder / "model.safetensors"))


def with_token_table(folder: Path) -> Path:
    """A copy of the model folder whose checkpoint holds the token table only (the other weights are made on the
    GPU by random_init)."""
    import multiprocessing
    import shutil

    table_folder = folder.parent / (folder.name + "-with-table")
    if not table_folder.exists():
        shutil.copytree(folder, table_folder)
        writer = multiprocessing.get_context("spawn").Process(
            target=write_token_table, args=(table_folder,)
        )
        writer.start()
        writer.join()
        if writer.exitcode:
            raise RuntimeError(f"writing the token table failed (exit {writer.exitcode})")
    return table_folder


def capped_runs(
    tokenizer, records: list, names: list[str]
) -> list[tuple[str, list, list | None, int]]:
    """The named runs of the capped stage: (name, chats, scripted answers or None for free-running, new tokens)."""
    scripts = answer_scripts(tokenizer, records)
    longest = read_records(ROOT / "data" / "sample_longest_data.jsonl")[0]
    runs = [
        ("w1_scripted", [r["message"] for r in records], scripts, 500),
        ("longest_free500", [r["message"] for r in longest], None, 500),
        ("w1_first64_free500", [r["message"] for r in records[:64]], None, 500),
        ("w1_first16_free256", [r["message"] for r in records[:16]], None, 256),
        ("w1_long10_scripted", [r["message"] for r in records], long_answers(scripts, 10), 500),
    ]
    return [run for run in runs if run[0] in names]


def cap_device(budget: float, host: int) -> float:
    """Caps torch's allocator at the emulated budget less the host's RSS and the 0.5 GiB CUDA context the Orin would
    share; returns the cap in bytes."""
    cap = budget - host - 0.5 * GiB
    torch.cuda.set_per_process_memory_fraction(
        cap / torch.cuda.get_device_properties(0).total_memory
    )
    return cap


def capped(folder: Path, records: list, budget_gib: float, run_names: list[str]) -> dict:
    """Orin emulation: device reserved + host RSS + 0.5 GiB (the CUDA context the Orin would share) <= budget.
    With budget_gib 0 the same runs go uncapped, for the time lost to the cap. `overhead` says what the process
    holds besides the weights and the plan's buffers, step by step."""
    folder = with_token_table(folder)  # the checkpoint's token table, as a real one would hold it
    torch.cuda.init()  # no context yet: on a Jetson the plan is made before one exists, and counts it apart
    host = rss_bytes()
    overhead = {"host_rss_before_plan_gib": host / GiB}
    report = {"budget_gib": budget_gib, "host_rss_idle_gib": host / GiB}
    if budget_gib:
        report["device_cap_gib"] = cap_device(budget_gib * GiB, host) / GiB
    # compile=False: the Orin's torch has no Triton, and compiling would add inductor's host memory to the count.
    observer = Observer()
    setup = optimize.prepare(
        folder,
        device="cuda",
        unified_memory=bool(budget_gib),
        memory_budget=int(budget_gib * GiB) if budget_gib else "auto",
        options=Options(compile=False),
    )
    overhead["host_rss_after_tokenizer_and_plan_gib"] = rss_bytes() / GiB
    gen = scripted(setup.load(random_init(0), progress=False, observer=observer), None)
    report["host_rss_after_load_gib"] = rss_bytes() / GiB
    overhead["device_outside_torch_after_load_gib"] = device_outside_torch()
    report["plan"] = gen.report().plan.describe()
    report["host_after_load"] = host_rss_split()
    # The warm-up's parts one at a time (each is repeated by gen.warmup(), at no further cost in memory): which
    # of them the host memory it adds belongs to, and how much of it a heap trim would give back.
    gen.warmup(steps=("gemms",))
    report["host_after_gemms"] = host_rss_split()
    gen.warmup(steps=("lookup_budget", "graphs", "probe"))
    report["host_after_probe"] = host_rss_split()
    gen.warmup()
    report["host_after_warmup"] = host_rss_split()
    report["host_peak_after_warmup_gib"] = peak_rss_bytes() / GiB
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    report["host_after_trim"] = host_rss_split()
    report["modules_loaded"] = sorted(
        m for m in ("triton", "torch._inductor", "sympy") if m in sys.modules
    )
    report["graphs"] = gen.report().graphs
    report["host_rss_after_warmup_gib"] = rss_bytes() / GiB
    report["device_reserved_after_warmup_gib"] = torch.cuda.memory_reserved() / GiB
    overhead.update(
        host_rss_after_load_gib=report["host_rss_after_load_gib"],
        host_rss_after_warmup_gib=report["host_rss_after_warmup_gib"],
        device_outside_torch_after_warmup_gib=device_outside_torch(),
        device_allocated_after_warmup_gib=torch.cuda.memory_allocated() / GiB,
        device_reserved_after_warmup_gib=report["device_reserved_after_warmup_gib"],
    )
    report["overhead"] = overhead
    print(report, flush=True)
    flops_per_token, weight_bytes = pass_costs(setup.cfg)
    for name, chats, script, new in capped_runs(gen.tokenizer, records, run_names):
        log_start = fresh_run(gen)
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        set_scripts(gen, script)
        failed = {}
        try:
            gen(chats, max_new_tokens=new, return_full_text=False, on_error=failed.__setitem__)
        except optimize.RecordError:  # the records in `failed`, reported below
            pass
        torch.cuda.synchronize()
        peak_dev, peak_host = torch.cuda.max_memory_reserved(), peak_rss_bytes()
        log = list(observer.passes)[log_start:]
        report[name] = {
            "seconds": time.perf_counter() - t,
            "peak_device_reserved_gib": peak_dev / GiB,
            "peak_host_rss_gib": peak_host / GiB,
            "total_gib": (peak_dev + peak_host) / GiB + 0.5,
            "stats": gen.report().stats,
            "allocator_slack_at_peak_gib": (peak_dev - torch.cuda.max_memory_allocated()) / GiB,
            "generated_tokens": sum(map(len, observer.generated.values())),
            "failed": {i: why for i, why in failed.items()},
            "largest_batches": sorted({len(p.requests) for p in log})[-3:],
            "orin_projection_s": orin_projection(
                [p.tokens for p in log], flops_per_token, weight_bytes
            ),
        }
        print("capped" if budget_gib else "uncapped", name, json.dumps(report[name]), flush=True)
    return report


def write_checkpoint(folder: Path, shard_bytes: int = 4 << 30, device: str = "cuda") -> None:
    """A full-size random checkpoint in HF's sharded safetensors layout (run in a child process: its host copies of
    the tensors must not count in the loading process's RSS)."""
    from safetensors.torch import save_file
    from orinfer.config import ModelConfig
    from orinfer.model import CausalLM

    model = CausalLM(ModelConfig.from_folder(folder), device, torch.bfloat16)
    random_init(0)(model)
    shards, current, size = [], {}, 0
    for name, p in model.named_parameters():
        if current and size + p.nbytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = p
        size += p.nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: v.detach().cpu() for k, v in shard.items()}, str(folder / file))
        weight_map.update({k: file for k in shard})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def load_stage(folder: Path) -> dict:
    """The streaming loader on a full-size checkpoint: host RSS at its peak against the idle process, and seconds
    (the file was just written, so it reads mostly from the page cache: a lower bound on time)."""
    import multiprocessing

    t = time.perf_counter()
    writer = multiprocessing.get_context("spawn").Process(target=write_checkpoint, args=(folder,))
    writer.start()
    writer.join()
    if writer.exitcode:
        raise RuntimeError(f"writing the checkpoint failed (exit {writer.exitcode})")
    written = time.perf_counter() - t
    checkpoint = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    torch.cuda.init()
    idle, peak_before = rss_bytes(), peak_rss_bytes()
    t = time.perf_counter()
    gen = optimize.build(folder, device="cuda", options=Options(compile=False), progress=False)
    torch.cuda.synchronize()
    peak = peak_rss_bytes()
    report = {
        "checkpoint_gib": checkpoint / GiB,
        "write_s": written,
        "load_s": time.perf_counter() - t,
        "host_rss_idle_gib": idle / GiB,
        "host_rss_peak_before_load_gib": peak_before / GiB,
        "host_rss_peak_gib": peak / GiB,
        "host_rss_after_gib": rss_bytes() / GiB,
        "peak_over_idle_gib": (peak - idle) / GiB,
        "device_allocated_gib": torch.cuda.memory_allocated() / GiB,
        "plan": gen.report().plan.describe(),
    }
    print("load", json.dumps(report), flush=True)
    return report
