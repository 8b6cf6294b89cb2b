"""The benchmark harness's own pieces, on the CPU: W1 is in the organisers' format, the scripted-answer
LogitsProcessor makes transformers' pipeline say exactly the gold answers (as the bench's ScriptedEngine makes orinfer),
the breakdown of a call's seconds, and the variants' table."""

import json
import sys

import pytest
from conftest import ROOT, records, generator

sys.path.insert(0, str(ROOT / "bench"))
import measure  # noqa: E402
import optimize  # noqa: E402
import systems  # noqa: E402
import workload  # noqa: E402
from orinfer.dataset import parse_choices  # noqa: E402
from orinfer.observe import Observer, PassRecord  # noqa: E402
from orinfer.options import Options  # noqa: E402


@pytest.mark.unit
def test_w1_records_are_in_the_organisers_format():
    # The organisers' 30 public records are OpenBookQA validation[0:30] in this very format.
    rows = [
        json.loads(line)
        for line in (ROOT / "tests" / "data" / "openbookqa_validation_first30.jsonl")
        .read_text()
        .splitlines()
    ]
    assert [workload.competition_record(r) for r in rows] == records("test_dataset.jsonl")


def test_scripted_answers_in_pipeline_and_in_orinfer(tiny_dir, hf, tmp_path):
    from transformers import LogitsProcessorList
    from transformers.pipelines.pt_utils import KeyDataset

    w1 = [json.loads(line) for line in workload.write_w1(tmp_path).read_text().splitlines()][:6]
    observer = Observer()
    gen = generator(tiny_dir, observer=observer)
    scripts = workload.answer_scripts(gen.tokenizer, w1)
    workload.scripted(gen, scripts)
    prompts = optimize.prompt_ids(gen.tokenizer, [r["message"] for r in w1])
    processor = workload.Scripted({tuple(p): s for p, s in zip(prompts, scripts)}, pad=32000)
    theirs = list(
        hf(
            KeyDataset(w1, "message"),
            max_new_tokens=50,
            return_full_text=False,
            do_sample=False,
            logits_processor=LogitsProcessorList([processor]),
        )
    )
    ours = gen([r["message"] for r in w1], max_new_tokens=50, return_full_text=False)
    answers = [[{"generated_text": r["answer"]}] for r in w1]
    assert [[{"generated_text": o[0]["generated_text"].lstrip()}] for o in theirs] == answers
    assert [[{"generated_text": o[0]["generated_text"].lstrip()}] for o in ours] == answers
    assert workload.unique_prompt_tokens(prompts) < sum(
        map(len, prompts)
    )  # the shared instruction counts once
    # Choice drafts: where the answer's first token begins no other choice, the pass after the prompt's verifies the
    # whole answer and samples <|end|> (never fed), so such a request takes exactly two passes; where it begins
    # several, that pass verifies their shared part and samples the deciding token: one pass more.
    picked = alike = 0
    passes = observer.passes_per_request()
    for i, (record, script) in enumerate(zip(w1, scripts)):
        choices = gen.tokenizer(
            parse_choices(record["message"][-1]["content"]), add_special_tokens=False
        )["input_ids"]
        beginning = [c for c in choices if c[:1] == script[:1]]
        if beginning == [script[:-1]]:
            picked += 1
            assert passes[i] == 2
        elif len(beginning) > 1 and script[:-1] in beginning:
            alike += 1
            assert passes[i] == 3
    assert picked >= 3 and alike >= 1


@pytest.mark.unit
def test_breakdown_splits_host_and_device_idle():
    # Three passes: the second launched ahead (host gap 0) but reaching the device 0.05 s after the first ended;
    # the third launched 0.02 s after the second's tokens were back.
    log = [
        PassRecord(100, (0, 1), 0.01, 0.30, False, 10.00, (0.00, 0.30)),
        PassRecord(200, (2, 3, 4), 0.01, 0.55, False, 10.10, (0.35, 0.60)),
        PassRecord(50, (5,), 0.01, 0.10, True, 10.68, (0.62, 0.72)),
    ]
    b = measure.breakdown(log, {"tokenize": 0.1, "detokenize": 0.01}, started=9.97, seconds=0.83)
    assert b["device_idle_between_s"] == [0.05, 0.02]
    assert b["pass_device_s"] == [0.3, 0.25, 0.1] and abs(b["device_s"] - 0.65) < 1e-9
    assert b["between_passes_s"] == [0.0, 0.02]
    assert abs(b["before_first_pass_s"] - 0.03) < 1e-9 and abs(b["after_last_pass_s"] - 0.01) < 1e-9
    assert abs(b["outside_passes_s"] - 0.06) < 1e-9


@pytest.mark.unit
def test_variants_are_options_and_every_name_is_built_from_the_table():
    assert systems.VARIANTS["ours"] == Options()
    assert (
        systems.VARIANTS["ours_t24k"].pass_tokens == 24576
        and systems.VARIANTS["ours_q64"].packed_queries == 64
    )
    assert (
        systems.VARIANTS["ours_flash"].packed_queries == 0
        and not systems.VARIANTS["ours_nospec"].speculate
    )
    assert all(
        name.startswith("ours") and not name.endswith("_repeat") for name in systems.VARIANTS
    )


@pytest.mark.unit
def test_decode_floor_counts_weights_flops_and_every_kv_read():
    ceil = {"gemm_flops": 1e3, "copy_bytes_per_s": 1e2}
    # Two passes: 10 tokens (FLOPs 10 * 50 / 1e3 = 0.5 s > weights 20 / 1e2 = 0.2 s), then 1 token (weights: 0.2 s).
    assert abs(measure.decode_floor([10, 1], 30, 50, 20, ceil) - (0.5 + 0.2 + 0.3)) < 1e-12
    # A 4-token prompt generating 3 tokens reads 4 + 5 + 6 tokens' K/V; a 2-token one generating 1 reads 2.
    assert measure.kv_read_bytes([4, 2], [3, 1], 10) == (4 + 5 + 6 + 2) * 10


@pytest.mark.unit
def test_long_answers_run_on_without_end_among_short_ones():
    scripts = [[5, 6, 32007] for _ in range(40)]
    longs = workload.long_answers(scripts, 4, length=10)
    stretched = [s for s in longs if len(s) == 10]
    assert len(stretched) == 4 and all(32007 not in s and s[:4] == [5, 6, 5, 6] for s in stretched)
    assert sum(s == [5, 6, 32007] for s in longs) == 36


@pytest.mark.unit
def test_device_memory_replays_the_allocator_trace_to_its_peak():
    import device_memory

    def event(action, addr, size, line=0):
        return {
            "action": action,
            "addr": addr,
            "size": size,
            "frames": [
                {"filename": "/x/torch/nn/functional.py", "line": 9, "name": "linear"},
                {"filename": "/x/orinfer/model.py", "line": line, "name": "forward"},
            ],
        }

    trace = [
        event("alloc", 1, 100, 10),
        event("alloc", 2, 50, 20),
        event("free_requested", 1, 100),
        event("free_completed", 1, 100),
        event("alloc", 3, 200, 30),
        event("alloc", 4, 5, 30),
        event("free_requested", 3, 200),
        event("free_requested", 2, 50),
    ]
    best, live = device_memory.live_at_peak(trace)
    assert best == 255 and sorted(e["addr"] for e in live) == [2, 3, 4]
    best, live = device_memory.live_at_peak(
        trace, start=4
    )  # only what was made from event 4 on is listed
    assert best == 255 and sorted(e["addr"] for e in live) == [3, 4]
    mib = 1 << 20
    rows = device_memory.by_line(
        [
            event("alloc", 5, 3 * mib, 30),
            event("alloc", 6, mib, 30),
            {"size": 2 * mib, "frames": []},
        ]
    )
    assert rows == [("model.py:30:forward", 4.0, 2), ("?:0:?", 2.0, 1)]


def test_the_generator_surface_the_stages_use(tiny_dir, tmp_path):
    """What bench/ uses of a generator (bench/README.md), on the tiny model: the warm-up step by step, report(),
    reset(), the observer, a scripted run through fresh_run and set_scripts, and the model a reference is built on."""
    w1 = [json.loads(line) for line in workload.write_w1(tmp_path).read_text().splitlines()][:8]
    gen = generator(tiny_dir, observer=Observer())
    gen.warmup(steps=("gemms",))
    gen.warmup()
    report = gen.report()
    assert (
        report.plan.num_blocks > 0 and report.kv_bytes > 0 and report.graphs == 0
    )  # no graphs on the CPU
    assert report.weight_bytes == sum(p.nbytes for p in gen.model.parameters())
    assert report.attention == gen.describe() and report.stats["passes"] > 0  # the warm-up's chat
    gen.reset()
    assert set(gen.report().stats.values()) == {0}
    workload.scripted(gen, workload.answer_scripts(gen.tokenizer, w1))
    start = workload.fresh_run(gen)
    outs = gen([r["message"] for r in w1], max_new_tokens=40, return_full_text=False)
    assert [o[0]["generated_text"].lstrip() for o in outs] == [r["answer"] for r in w1]
    assert len(gen.observer.passes) - start == gen.report().stats["passes"] > 0
    workload.set_scripts(gen, None)  # free-running again: the model's own argmax
    free = gen([r["message"] for r in w1], max_new_tokens=8, return_full_text=False)
    assert free == generator(tiny_dir)(
        [r["message"] for r in w1], max_new_tokens=8, return_full_text=False
    )


def test_the_cpu_stages_run_on_the_tiny_model(tiny_dir, tmp_path):
    """The passes stage (CPU) on a few W1 records, and real_text.py's drafting and timing on the tiny model: their
    code paths, so that CI notices a break (the GPU stages' surface is the test above)."""
    import passes
    import real_text

    w1 = workload.write_w1(tmp_path)
    few = [json.loads(line) for line in w1.read_text().splitlines()][:3]
    out = passes.passes_stage(few, only={"w1_scripted", "synthetic_scripted"})
    for work in ("w1_scripted_", "synthetic_scripted_"):
        runs = [v for k, v in out.items() if k.startswith(work)]
        assert len(runs) == 4 and all(
            r["generated_tokens"] > 0 and r["orin_projection_s"] > 0 for r in runs
        )
    synthetic = workload.synthetic_records(few)  # W1's shape, none of its words
    assert [len(s["answer"]) for s in synthetic] == [len(r["answer"]) for r in few]
    assert not set(synthetic[0]["answer"].split()) & set(few[0]["message"][0]["content"].split())
    loads = {"mc": ([r["message"] for r in few], 6, [r["answer"] for r in few])}
    table = real_text.drafting(
        tiny_dir,
        "cpu",
        loads,
        quick=True,
        variants=["off", "defaults"],
        dtypes=["float32"],
        repeat=1,
    )
    assert table["float32/off/mc/batchall"]["draft_tokens"] == 0
    assert (
        table["float32/defaults/mc/batchall"]["generated_tokens"]
        == table["float32/off/mc/batchall"]["generated_tokens"]
    )


def test_real_texts_agreement_on_the_orin_path_alone(tiny_dir, monkeypatch):
    """real_text.py's agreement with `--paths orin` only: transformers' rows are kept by dtype,
    whichever path of ours ran, so its own bf16-against-fp32 line is made (run 91 met a KeyError
    there). The Orin path's options with the padded layout, which runs on the CPU."""
    import real_text

    monkeypatch.setattr(real_text, "ORIN_PATH", optimize.Options(compile=False, cuda_graphs=False))
    chats = [[{"role": "user", "content": "Which is larger, 3 or 5?"}]]
    out = real_text.agreement(tiny_dir, "cpu", {"mc": (chats, 4, None)}, ["orin"])
    assert out["float32_orin_path/mc"]["identical"] == 1
    assert out["transformers_bf16_vs_fp32/mc"]["records"] == 1
