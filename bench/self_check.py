"""`test_script.py --self-check` at full size on a CUDA GPU (issue 28): random Phi-3-medium-shaped weights made on the
device (workload.random_init), W1 (OpenBookQA test in the competition's format) as the data file, through
test_script.main's `prepare` hook, the documented way to hand a run its set-up.

    python3 bench/self_check.py --out OUT [--dtype bfloat16|float32] [--memory-budget 28.5GiB --unified]

--unified plans as on a Jetson (the host and the CUDA context inside the budget, the allocator capped, the token
table read from a checkpoint file, eager kernels: JetPack's torch has no Triton); run it with the Jetson image's transformers on PYTHONPATH for the Orin emulation.
The folder has no modeling code, so transformers' own Phi3ForCausalLM is the reference.
"""

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import optimize  # noqa: E402
import test_script  # noqa: E402
from memory_stages import with_token_table  # noqa: E402
from workload import model_folder, random_init, write_w1  # noqa: E402


@dataclass(frozen=True)
class RandomWeights(optimize.Setup):
    """A set-up whose load fills the weights with random values on the device instead of reading a checkpoint."""

    def load(self, init=None, progress=True, observer=None):
        return super().load(random_init(0), progress, observer)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--memory-budget", default="auto")
    ap.add_argument("--unified", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    folder = model_folder(tmp)  # no modeling code in it: transformers' own class is the reference
    if args.unified:
        folder = with_token_table(folder)

    def prepare(model_dir, **kw):
        setup = optimize.prepare(model_dir, unified_memory=True if args.unified else None, **kw)
        return RandomWeights(**{f.name: getattr(setup, f.name) for f in fields(setup)})

    argv = [
        "--self-check",
        "--model",
        str(folder),
        "--data",
        str(write_w1(tmp)),
        "--dtype",
        args.dtype,
        "--memory-budget",
        args.memory_budget,
    ] + (["--no-compile"] if args.unified else [])  # no Triton on JetPack
    report, start = io.StringIO(), time.perf_counter()
    with contextlib.redirect_stdout(report):
        code = test_script.main(argv, prepare=prepare)
    seconds = time.perf_counter() - start
    print(
        report.getvalue(), f"exit {code}, {seconds:.0f} s (the load included)", sep="\n", flush=True
    )
    import torch
    import transformers

    Path(args.out).mkdir(parents=True, exist_ok=True)
    (
        Path(args.out) / f"self_check_{args.dtype}{'_unified' if args.unified else ''}.json"
    ).write_text(
        json.dumps(
            {
                "argv": argv,
                "exit": code,
                "seconds": seconds,
                "report": report.getvalue().splitlines(),
                "device": torch.cuda.get_device_name(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            },
            indent=1,
        )
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
