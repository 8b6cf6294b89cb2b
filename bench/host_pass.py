"""White-box micro-benchmark (it drives engine parts directly; bench/README.md).
The host's work to build one decode pass's inputs (runner.context) and to schedule and commit it, on the CPU:
`python3 bench/host_pass.py [BATCH ...]`. Each sequence holds 300 tokens of context in one-token blocks, and feeds
one token; the KV pool and the tiny model live on the CPU, so context() here also runs the index arithmetic that a
GPU does on the device: compare versions on one machine, not with the device's numbers. Scheduling and committing
are timed on steady decode passes (one token a sequence), the collector paused as in a call."""

import gc
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import optimize  # noqa: E402
from measure import host_ms_per_call  # noqa: E402
from orinfer.block_manager import BlockManager  # noqa: E402
from orinfer.runner import ModelRunner  # noqa: E402
from orinfer.scheduler import Limits, Scheduler  # noqa: E402
from orinfer.sequence import Sequence, Work  # noqa: E402
from orinfer.tiny import write_tiny_model  # noqa: E402
from orinfer.attention import BACKENDS  # noqa: E402
from orinfer.attention.varlen import AttentionKernels  # noqa: E402


def main(batches: list[int]) -> None:
    model = optimize.build(
        write_tiny_model(Path(tempfile.mkdtemp()) / "tiny"), device="cpu", progress=False
    ).engine.model
    unused = AttentionKernels(
        varlen=lambda *a: None, packed=lambda *a: None, packed_queries=128
    )  # never called
    runner = ModelRunner(model, 200_001, 1, BACKENDS["varlen"], unused)
    for batch in batches:
        seqs = [
            Sequence(
                index=i,
                token_ids=list(range(100, 400)),
                num_prompt_tokens=280,
                max_new_tokens=256,
                block_table=range(1 + 300 * i, 301 + 300 * i),
                num_computed=299,
            )
            for i in range(batch)
        ]
        works = [
            Work(
                seq=s,
                tokens=s.token_ids[-1:],
                start=s.num_tokens - 1,
                wants_logits=True,
                decode=True,
            )
            for s in seqs
        ]
        context = host_ms_per_call(lambda: runner.context(works))
        print(f"batch {batch}: context {context:.2f} ms, {decode_scheduling(batch)}", flush=True)


def decode_scheduling(batch: int, passes: int = 60) -> str:
    """Scheduling and committing steady decode passes (one token each, no drafts) of `batch` sequences, with the
    cyclic collector paused as the engine pauses it: medians."""
    seqs = [
        Sequence(
            index=i,
            token_ids=list(range(100 + i, 400 + i)),
            num_prompt_tokens=280,
            max_new_tokens=passes + 2,
        )
        for i in range(batch)
    ]
    scheduler = Scheduler(
        BlockManager(400_001, 1),
        Limits(max_num_seqs=512, max_batched_tokens=1 << 20, max_gather_tokens=1 << 30),
        eos_ids=[0],
    )
    for s in seqs:
        scheduler.add(s)
    scheduler.postprocess(scheduler.schedule(), [5] * batch)  # the prompts' pass
    schedule, commit = [], []
    gc.disable()
    try:
        for _ in range(passes):
            t0 = time.perf_counter()
            works = scheduler.schedule()
            t1 = time.perf_counter()
            scheduler.postprocess(works, [5] * batch)
            schedule.append(t1 - t0)
            commit.append(time.perf_counter() - t1)
    finally:
        gc.enable()
    return f"schedule {sorted(schedule)[passes // 2] * 1e3:.2f} ms, commit {sorted(commit)[passes // 2] * 1e3:.2f} ms"


if __name__ == "__main__":
    main([int(b) for b in sys.argv[1:]] or [128, 500])
