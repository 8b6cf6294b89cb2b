"""Device benchmark: our runner and the transformers baselines side by side on one workload, with the hardware floor.

    python bench/bench.py --out DIR [--stages systems,fp32,capped] [--systems ours,ours_nospec,...]
                          [--fp32-exact 50] [--capped 28.5] [--mode scripted|free]

Each stage runs in its own process (clean device memory, and a peak host RSS that belongs to that stage alone);
the driver merges their JSON into DIR/results.json and draws DIR/w1_seconds.png. The stages live in modules of
their own: systems.py (ours and transformers on W1), passes.py, exactness.py, memory_stages.py; workload.py is what
they run, measure.py what they measure, report.py what is printed.

No weights can be downloaded, so a Phi-3-medium-shaped model is built on the GPU from the real config with random
weights (normal(0, 0.02) matrices, ones for norms) and the same tensors feed orinfer and transformers' Phi3ForCausalLM.
Workload W1 is OpenBookQA test (500 items) in the competition's prompt format. Random weights never say <|end|>, so
in "scripted" mode every system's sampled token is replaced by the gold answer's tokens and then <|end|> (orinfer:
the bench-side ScriptedEngine in workload.py, which commits the script; transformers: a LogitsProcessor), while all
model compute still happens: the work a correct model would do. "free" mode generates a fixed number of tokens. Our time is
test_script.py's Section 3: data load (the JSONL file) + inference through optimize.py.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Each stage's module is imported in the stage's own process only: the capped stage measures the host memory of
# what the product imports, not the profiler's, transformers' model code's or the chart's.
from orinfer.dataset import read_records  # noqa: E402
from workload import model_folder, synthetic_records, write_w1  # noqa: E402


def parse_args():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--stages", default="systems,free,passes,fp32,capped,uncapped,load")
    ap.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    ap.add_argument(
        "--systems",
        default="ours,ours_nospec,ours_repeat,ours_eager,hf_generate_bs32,hf_pipeline_bs1",
    )
    ap.add_argument("--mode", default="scripted", choices=["scripted", "free"])
    # By default each variant twice on its generator, the one without drafts first (runs 51-53 ran the other first,
    # and its host was slower even at work the two share: bench/NOTES.md).
    ap.add_argument(
        "--free-systems",
        default="ours_nospec,ours_nospec_repeat,ours,ours_repeat",
        help="the free stage's variants (NAME_repeat: a second call on NAME's generator)",
    )
    ap.add_argument("--free-tokens", type=int, default=32)
    ap.add_argument("--limit", type=int, default=0, help="first N items only")
    ap.add_argument(
        "--workload",
        default="w1",
        choices=["w1", "synthetic"],
        help="synthetic: W1's shape without OpenBookQA's text (workload.synthetic_records)",
    )
    ap.add_argument(
        "--ahead-fill",
        default="",
        help="passes stage: instead, sweep engine.AHEAD_FILL over these values",
    )
    ap.add_argument(
        "--fp32-exact", type=int, default=50, help="items for the fp32 full-shape exactness check"
    )
    ap.add_argument(
        "--fp32-paths",
        default="default",
        help="fp32 stage: the kernel paths to check (exactness.PATHS: default, orin, orin_eager)",
    )
    ap.add_argument(
        "--capped", type=float, default=28.5, help="Orin emulation: total budget in GiB"
    )
    ap.add_argument("--capped-runs", default="w1_scripted,longest_free500,w1_first64_free500")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="profile the first system's timed call: top CUDA kernels, and where the device sat idle",
    )
    ap.add_argument(
        "--host-profile", action="store_true", help="cProfile each of our systems' timed calls"
    )
    ap.add_argument(
        "--interleave",
        type=float,
        default=0,
        help="GiB each: build all our variants at once within this budget and alternate their calls",
    )
    return ap.parse_args()


def main():
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.stage is None:  # driver
        import subprocess

        merged = {}
        for stage in args.stages.split(","):
            cmd = [sys.executable, __file__, "--stage", stage] + [a for a in sys.argv[1:]]
            rc = subprocess.call(cmd)
            path = out / f"{stage}.json"
            if path.exists():
                merged.update(json.loads(path.read_text()))
            if rc:
                merged.setdefault("errors", []).append(f"stage {stage} exited {rc}")
        (out / "results.json").write_text(json.dumps(merged, indent=1))
        if "systems" in merged:
            from report import chart, table

            chart(merged, out)
            table(merged)
        return
    from importlib.metadata import (
        version,
    )  # not `import transformers`: optimize sets its import options first

    res = {
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "transformers": version("transformers"),
    }
    tmp = Path(tempfile.mkdtemp())
    w1 = write_w1(tmp)
    folder = model_folder(tmp)
    records = read_records(w1)[0]
    if args.workload == "synthetic":
        records = synthetic_records(records)
    if args.limit:
        records = records[: args.limit]
    if args.limit or args.workload != "w1":
        w1.write_text("".join(json.dumps(r) + "\n" for r in records))
    if args.stage == "systems":
        from systems import systems_stage

        res.update(systems_stage(args, w1, folder, records))
    elif (
        args.stage == "free"
    ):  # speculation where drafts rarely match: fixed-length free-running generation
        args.systems = args.free_systems
        args.mode, args.profile = "free", False
        from systems import systems_stage

        res["free"] = systems_stage(args, w1, folder, records)
    elif args.stage == "passes":
        from passes import passes_stage

        if args.ahead_fill:  # the sweep alone
            from passes import ahead_fill_sweep

            res["ahead_fill"] = ahead_fill_sweep(
                records, [float(v) for v in args.ahead_fill.split(",")]
            )
        else:
            res["passes_per_request"] = passes_stage(records)
    elif args.stage == "fp32":
        from exactness import fp32_exact

        paths = args.fp32_paths.split(",")
        res["fp32_exact"] = [fp32_exact(folder, records[: args.fp32_exact], path=p) for p in paths]
    elif args.stage == "capped":
        from memory_stages import capped

        res["capped"] = capped(folder, records, args.capped, args.capped_runs.split(","))
    elif args.stage == "uncapped":
        from memory_stages import capped

        res["uncapped"] = capped(folder, records, 0, args.capped_runs.split(","))
    elif args.stage == "load":
        from memory_stages import load_stage

        res["load"] = load_stage(folder)
    (out / f"{args.stage}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
