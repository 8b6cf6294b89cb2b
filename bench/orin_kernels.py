"""The Orin path, kernel by kernel (issues 33 and 36): under the Orin emulation's plan (unified memory, 28.5 GiB, eager
kernels, the token table read from a checkpoint file), each workload's timed call is profiled (CUDA activity), its
kernels sorted into classes, and each class priced at the Orin's measured rates: a PROJECTION, not a measurement
on an Orin. Also the warm-up's token-table read: W1 timed with the table's pages dropped before the warm-up (the
warm-up reads them back: the product's path) and dropped after it (a cold read of every distinct token inside the
timed call: what a board met before the warm-up read the table).

    PYTHONPATH=JETSON_PIN python3 bench/orin_kernels.py --out OUT [--budget 28.5] [--workloads w1,prefill,decode]
                                                   [--no-table-read] [--no-cuda-extension]

Pricing (REFERENCE.md section 8): GEMMs by their FLOPs (each pass's computed tokens x 2 x the parameters they pass
through) at ORIN_GEMM FLOP/s, but no pass under one read of the weights at ORIN_READ bytes/s; every other kernel by
the bytes it moved here (its time here x this GPU's measured copy rate: they are memory-bound) at ORIN_READ, plus
ORIN_LAUNCH seconds a launch. The floor: the workload's unique prompt tokens' GEMM FLOPs, and one weight read for
each decode step the longest answer needs, at the same rates.

White-box: it uses workload.py's ScriptedEngine for scripted answers (bench/README.md) and the stages' helpers.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import optimize  # noqa: E402
from measure import ORIN_MEASURED, pass_costs  # noqa: E402
from memory_stages import cap_device, with_token_table  # noqa: E402
from orinfer.dataset import read_records  # noqa: E402
from orinfer.memory import GiB, rss_bytes  # noqa: E402
from orinfer.observe import Observer  # noqa: E402
from orinfer.options import Options  # noqa: E402
from orinfer.runfiles import forget_pages  # noqa: E402
from orinfer.selfcheck import unique_prompt_tokens  # noqa: E402
from workload import (
    answer_scripts,
    fresh_run,
    model_folder,
    random_init,
    scripted,
    set_scripts,  # noqa: E402
    synthetic_records,
    write_w1,
)

(ORIN_GEMM, ORIN_READ), ORIN_LAUNCH = (
    ORIN_MEASURED,
    8e-6,
)  # the measured rates (measure.py); a launch
# Kernel classes by the kernel's name, first match wins.
CLASSES = [
    ("attention", ("fmha", "flash", "attention", "efficient")),
    ("gemm", ("gemm", "xmma", "cutlass", "nvjet", "cublas", "sm80_", "sm90_", "ampere_")),
    ("norm/reduction", ("reduce", "norm")),
    ("gather/copy", ("index", "gather", "scatter", "memcpy", "copy", "cat", "embedding")),
    (
        "elementwise",
        ("elementwise", "vectorized", "unrolled", "silu", "mul", "add", "pow", "rsqrt", "rope"),
    ),
]


def kernel_class(name: str) -> str:
    lower = name.lower()
    return next((cls for cls, keys in CLASSES if any(k in lower for k in keys)), "other")


def copy_rate() -> float:
    """This GPU's device-to-device copy rate, bytes read and written a second."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize()
    return 2 * 10 * a.numel() / (time.perf_counter() - start)


def split(prof) -> dict:
    """Each kernel class's device time (s) and launches, and its five costliest kernels by name, from a profile of
    one call."""
    classes, names = {}, {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        cls, seconds = (
            kernel_class(event.name),
            (event.time_range.end - event.time_range.start) / 1e6,
        )
        total, count = classes.get(cls, (0.0, 0))
        classes[cls] = (total + seconds, count + 1)
        named = names.setdefault(cls, {}).setdefault(event.name[:90], [0.0, 0])
        named[0] += seconds
        named[1] += 1
    return {
        cls: {
            "seconds": s,
            "launches": n,
            "top": sorted(
                ([name, t, k] for name, (t, k) in names[cls].items()), key=lambda x: -x[1]
            )[:5],
        }
        for cls, (s, n) in sorted(classes.items())
    }


def project(
    classes: dict, pass_tokens: list[int], flops_per_token: float, weight_bytes: int, rate: float
) -> dict:
    """Each class priced at the Orin's rates (a projection), and their sum."""
    gemm = sum(max(t * flops_per_token / ORIN_GEMM, weight_bytes / ORIN_READ) for t in pass_tokens)
    priced = {"gemm": gemm + classes.get("gemm", {}).get("launches", 0) * ORIN_LAUNCH}
    for cls, c in classes.items():
        if cls != "gemm":
            priced[cls] = c["seconds"] * rate / ORIN_READ + c["launches"] * ORIN_LAUNCH
    return {"by_class_s": priced, "total_s": sum(priced.values())}


def workloads(
    tokenizer, records: list, names: list[str]
) -> list[tuple[str, list, list | None, int]]:
    """W1 scripted; prefill-heavy: every W1 prompt, one scripted token each; decode-heavy: 16 W1 items free-running
    256 tokens; decode_fixed: the same 16 items, each answer 256 seeded random tokens (free-running answers of random
    bf16 weights are near-ties that differ between attention kernels, and with them the passes: these are the same
    for every variant); synthetic: W1's shape without OpenBookQA's text, scripted (workload.synthetic_records)."""
    scripts = answer_scripts(tokenizer, records)
    chats = [r["message"] for r in records]
    synthetic = synthetic_records(records)
    g = torch.Generator().manual_seed(0)
    # ordinary tokens: no eos among them
    fixed = torch.randint(100, 32000, (16, 256), generator=g).tolist()
    runs = [
        ("w1", chats, scripts, 500),
        ("prefill", chats, [s[:1] for s in scripts], 1),
        ("decode", chats[:16], None, 256),
        ("decode_fixed", chats[:16], fixed, 256),
        ("synthetic", [r["message"] for r in synthetic], answer_scripts(tokenizer, synthetic), 500),
    ]
    return [run for run in runs if run[0] in names]


def drop_pages(folder: Path) -> None:
    """The checkpoint's pages out of the page cache (what a 26 GiB load leaves of the token table): written back
    first, since only clean pages can be dropped."""
    os.sync()
    for path in folder.glob("*.safetensors"):
        forget_pages(path)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget", type=float, default=28.5)
    ap.add_argument("--workloads", default="w1,prefill,decode")
    ap.add_argument("--lookup-draft-tokens", type=int, default=None,
                    help="the pass size under which lookup drafts ride along (default: measured at the warm-up, "
                    "which varies from process to process here; fixed, variants compare pass for pass)")  # fmt: skip
    ap.add_argument(
        "--no-table-read",
        action="store_true",
        help="skip W1 timed with cold and warm token-table pages",
    )
    ap.add_argument(
        "--no-cuda-extension",
        action="store_true",
        help="the elementwise kernels eager (the Orin path before orinfer's CUDA extension)",
    )
    ap.add_argument(
        "--attention",
        default=None,
        help="an attention backend by name (default: the engine's choice; padded: the Orin path before issue 36's "
        "paged kernel)",
    )
    args = ap.parse_args()
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / "orinfer-kernels"
    tmp.mkdir(exist_ok=True)
    folder = with_token_table(model_folder(tmp))
    records = read_records(write_w1(tmp))[0]
    rate = copy_rate()
    torch.cuda.empty_cache()
    torch.cuda.init()
    cap_device(args.budget * GiB, rss_bytes())
    observer = Observer()
    setup = optimize.prepare(
        folder,
        device="cuda",
        unified_memory=True,
        memory_budget=int(args.budget * GiB),
        options=Options(
            compile=False,
            cuda_extension=False if args.no_cuda_extension else None,
            attention=args.attention,
            lookup_draft_tokens=args.lookup_draft_tokens,
        ),
    )
    gen = scripted(setup.load(random_init(0), progress=False, observer=observer), None)
    drop_pages(folder)
    gen.warmup()
    flops_per_token, weight_bytes = pass_costs(setup.cfg)
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "copy_rate": rate,
        "plan": gen.report().plan.describe(),
        "attention": gen.describe(),
        "kernels_note": setup.kernels_note,  # why the extension is not taken, where it is not
        "rates": {"gemm": ORIN_GEMM, "read": ORIN_READ, "launch": ORIN_LAUNCH},
    }
    for name, chats, script, new in workloads(gen.tokenizer, records, args.workloads.split(",")):
        start = fresh_run(gen)
        set_scripts(gen, script)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            t = time.perf_counter()
            gen(chats, max_new_tokens=new, return_full_text=False)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - t
        tokens = [p.tokens for p in list(observer.passes)[start:]]
        prompts = [optimize.prompt_ids(gen.tokenizer, [c])[0] for c in chats]
        longest = max(map(len, script)) if script else new
        floor = (
            unique_prompt_tokens(prompts) * flops_per_token / ORIN_GEMM
            + (longest - 1) * weight_bytes / ORIN_READ
        )
        classes = split(prof)
        report[name] = {
            "seconds_here": seconds,
            "passes": len(tokens),
            "computed_tokens": sum(tokens),
            "unique_prompt_tokens": unique_prompt_tokens(prompts),
            "classes_here": classes,
            "orin": project(classes, tokens, flops_per_token, weight_bytes, rate),
            "floor_s": floor,
        }
        report[name]["x_floor"] = report[name]["orin"]["total_s"] / floor
        print(name, json.dumps(report[name]), flush=True)
    if not args.no_table_read:
        report["table_read"] = table_read(gen, folder, records)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "kernels.json").write_text(json.dumps(report, indent=1))
    return 0


def table_read(gen, folder: Path, records: list) -> dict:
    """W1 timed twice each way: the table's pages dropped before the warm-up's token-table step (it reads them back),
    and dropped after it (every distinct token a cold read inside the timed call)."""
    scripts = answer_scripts(gen.tokenizer, records)
    chats = [r["message"] for r in records]
    seconds = {}
    for way in ("warm", "cold", "warm", "cold"):
        drop_pages(folder)
        gen.warmup(steps=("token_table",))
        if way == "cold":
            drop_pages(folder)
        fresh_run(gen)
        set_scripts(gen, scripts)
        t = time.perf_counter()
        gen(chats, max_new_tokens=500, return_full_text=False)
        torch.cuda.synchronize()
        seconds.setdefault(way, []).append(time.perf_counter() - t)
    print("table_read", json.dumps(seconds), flush=True)
    return seconds


if __name__ == "__main__":
    sys.exit(main())
