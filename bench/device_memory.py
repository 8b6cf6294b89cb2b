"""Where the Orin emulation's device memory goes, allocation by allocation (a CUDA GPU; run it with the Jetson
image's transformers on PYTHONPATH, as the capped stage is run):

    PYTHONPATH=JETSON_PIN python3 bench/device_memory.py [--budget 28.5]

torch's allocator records every allocation with its Python stack from the load on. Printed: what stays allocated
after the warm-up besides the weights and the KV pool, each capped run's peak over that, and what is live at W1
scripted's peak, by the line of orinfer that allocated it. A process of its own: the history costs host memory,
which the capped stage measures."""

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import optimize  # noqa: E402
from memory_stages import cap_device, capped_runs, with_token_table  # noqa: E402
from orinfer.dataset import read_records
from orinfer.observe import Observer  # noqa: E402
from orinfer.memory import GiB, MiB, rss_bytes  # noqa: E402
from orinfer.options import Options  # noqa: E402
from workload import fresh_run, model_folder, random_init, scripted, set_scripts, write_w1  # noqa: E402

RUNS = ["w1_scripted", "longest_free500", "w1_first16_free256", "w1_long10_scripted"]


def by_line(allocations: list[dict], top: int = 20) -> list[tuple[str, float, int]]:
    """(line, MiB, count) of allocations grouped by the innermost line of orinfer on their stacks (else their
    innermost frame), the largest first."""
    size, count = collections.Counter(), collections.Counter()
    for a in allocations:
        frames = a.get("frames") or [{"filename": "?", "line": 0, "name": "?"}]
        f = next((f for f in frames if "/orinfer/" in f["filename"]), frames[0])
        key = f"{Path(f['filename']).name}:{f['line']}:{f['name']}"
        size[key] += a["size"]
        count[key] += 1
    return [(key, round(n / MiB, 1), count[key]) for key, n in size.most_common(top)]


def live_at_peak(trace: list[dict], start: int = 0) -> tuple[int, list[dict]]:
    """Replays an allocator trace (torch.cuda.memory._snapshot()'s): the most bytes live at once at or after event
    `start`, and the allocations made from `start` on that are live at that moment."""
    live, now, best, at = {}, 0, -1, start
    for i, e in enumerate(trace):
        if e["action"] == "alloc":
            live[e["addr"]] = e
            now += e["size"]
        elif e["action"] == "free_requested" and e["addr"] in live:
            now -= live.pop(e["addr"])["size"]
        if i >= start and now > best:
            best, at = now, i
    live = {}
    for i, e in enumerate(trace[: at + 1]):
        if e["action"] == "alloc":
            live[e["addr"]] = (i, e)
        elif e["action"] == "free_requested":
            live.pop(e["addr"], None)
    return best, [e for i, e in live.values() if i >= start]


def main(budget_gib: float) -> None:
    tmp = Path(tempfile.mkdtemp())
    w1 = write_w1(tmp)
    folder = with_token_table(model_folder(tmp))
    records = read_records(w1)[0]
    torch.cuda.init()  # as in the capped stage: the plan is made before a context exists
    budget = int(budget_gib * GiB)
    cap_device(budget, rss_bytes())
    observer = Observer()
    setup = optimize.prepare(
        folder,
        device="cuda",
        unified_memory=True,
        memory_budget=budget,
        options=Options(compile=False),
    )
    torch.cuda.memory._record_memory_history(
        max_entries=3_000_000, context="alloc", stacks="python"
    )
    gen = scripted(setup.load(random_init(0), progress=False, observer=observer), None)
    print(gen.report().plan.describe())
    gen.warmup()
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    trace = snapshot["device_traces"][0]
    made = {
        e["addr"]: e for e in trace if e["action"] == "alloc"
    }  # the latest allocation at each address
    active = [
        made.get(b["address"], {"size": b["size"]}) | {"size": b["size"]}
        for s in snapshot["segments"]
        for b in s["blocks"]
        if b["state"] == "active_allocated"
    ]
    persistent = torch.cuda.memory_allocated()
    weights_kv = gen.report().weight_bytes + gen.report().kv_bytes
    print(
        f"after the warm-up: allocated {persistent / GiB:.4f} GiB, {(persistent - weights_kv) / MiB:.1f} MiB "
        f"besides the weights and the KV pool; blocks under 256 MiB by line (MiB, count):"
    )
    for row in by_line([a for a in active if a["size"] < 256 * MiB]):
        print("   ", row)
    start = len(trace)
    for name, chats, scripts, new in capped_runs(gen.tokenizer, records, RUNS):
        fresh_run(gen)
        torch.cuda.reset_peak_memory_stats()
        set_scripts(gen, scripts)
        t = time.perf_counter()
        gen(chats, max_new_tokens=new, return_full_text=False)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        print(
            f"{name}: {time.perf_counter() - t:.2f} s, peak allocated {peak / GiB:.4f} GiB, "
            f"+{(peak - persistent) / MiB:.1f} MiB over the persistent set; {gen.report().stats}",
            flush=True,
        )
        if name == "w1_scripted":  # the 1,024-token prefill passes: the workspace's peak
            _, live = live_at_peak(torch.cuda.memory._snapshot()["device_traces"][0], start)
            print("   live at its peak, made during the run (MiB, count):")
            for row in by_line(live):
                print("      ", row)
            torch.cuda.memory._record_memory_history(enabled=None)  # the other runs: peaks only


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--budget", type=float, default=28.5, help="GiB, as the capped stage's --capped"
    )
    torch.set_grad_enabled(False)
    main(ap.parse_args().budget)
