"""orinfer/selfcheck.py: `test_script.py --self-check --demo` end to end on the CPU, the Jetson lines for fake boards,
and the output check reporting a planted difference with transformers' margin there."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, generator, records
from test_board import board

import optimize
from orinfer import oracle, selfcheck


def self_check_demo(tmp_path, *options: str) -> subprocess.CompletedProcess:
    """`test_script.py --self-check --demo` on the shipped public set with `options`, in tmp_path."""
    data = str(ROOT / "data" / "test_dataset.jsonl")
    command = [
        sys.executable,
        str(ROOT / "test_script.py"),
        "--self-check",
        "--demo",
        "--data",
        data,
    ]
    return subprocess.run([*command, *options], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)  # fmt: skip


def test_self_check_demo_end_to_end(tmp_path):
    """The tiny model on the CPU: every check ok, exit 0, no power-mode lines (no Jetson), no results file."""
    run = self_check_demo(tmp_path, "--check-records", "4", "--check-tokens", "12")
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout
    for name in (
        "device: CPU",
        "memory budget:",
        "plan: memory plan",
        "longest record:",
        "memory peak:",
        "rates:",
        "sdpa:",
        "outputs vs transformers (eager): identical 4/4",
        "projection: an estimate",
    ):
        assert f"] {name}" in out, name
    # transformers >= 4.46 runs the demo folder's Phi-3 on SDPA too; 4.44.2's trust_remote_code code is eager alone
    assert (
        "] outputs vs transformers (sdpa): identical 4/4" in out
        or "(sdpa): not offered by this model" in out
    )
    assert "power mode" not in out and "gpu clock" not in out and "Traceback" not in run.stderr
    assert "0 failed" in out and list(tmp_path.iterdir()) == []


def test_a_record_the_cache_cannot_hold_fails_its_check_with_the_budget_that_would(tmp_path):
    """The one fit rule (optimize.Setup.sized_for) refuses the file: the longest record's line fails, naming the
    record's line and the budget that would hold it; the other checks still run; exit 1, one stderr line."""
    run = self_check_demo(tmp_path, "--max-new-tokens", "20000", "--memory-budget", "1.6GiB",
                          "--check-records", "2", "--check-tokens", "4")  # fmt: skip
    assert run.returncode == 1, run.stderr[-2000:]
    [line] = [x for x in run.stdout.splitlines() if "] longest record:" in x]
    assert line.startswith("[FAIL]") and "-> line " in line and "pass --memory-budget" in line
    assert "outputs vs transformers (eager): identical 2/2" in run.stdout
    assert run.stderr.strip().splitlines()[-1].startswith("self-check failed: longest record:")


@pytest.mark.unit
def test_the_jetson_lines_say_what_to_fix():
    maxn = {
        c.name: c for c in selfcheck.jetson_checks(board("maxn"), "2.3.0", ["sm_72", "sm_87"], 14)
    }
    assert all(c.verdict == "ok" for c in maxn.values()) and "931 MHz" in maxn["gpu clock"].figure
    thirty = {
        c.name: c
        for c in selfcheck.jetson_checks(board("30w"), "2.3.0a0+40ec155e58.nv24.03", ["sm_87"], 8)
    }
    assert (
        thirty["power mode"].verdict == "warn" and "sudo nvpmodel -m 0" in thirty["power mode"].fix
    )
    unpinned = {
        c.name: c
        for c in selfcheck.jetson_checks(board("unpinned"), "2.4.1", ["sm_80", "sm_90"], 14)
    }
    assert (
        unpinned["gpu clock"].verdict == "warn"
        and unpinned["gpu clock"].fix == "sudo jetson_clocks"
    )
    assert (
        unpinned["board"].verdict == "warn" and thirty["board"].verdict == "warn"
    )  # below full speed
    assert (
        maxn["torch build"].verdict == "ok"
    )  # NVIDIA's JetPack 2.3.0 may report a plain version: sm_87 tells
    assert (
        unpinned["torch build"].verdict == "FAIL"
        and "no sm_87 kernels" in unpinned["torch build"].fix
    )


@pytest.mark.unit
def test_the_paged_kernel_is_checked_against_the_float32_reference():
    """Its line says it agrees, or warns that the run does not take it (the padded layout instead):
    the reference itself as the kernel, and one off by 0.1 (the check's pass on the CPU)."""
    from orinfer.attention.reference import reference_paged

    cpu, shape = torch.device("cpu"), (8, 2, 16)
    same = selfcheck.paged_kernel_check(reference_paged, cpu, torch.bfloat16, shape)
    assert same.verdict == "ok" and same.figure.startswith("agrees with the float32 reference")
    off = selfcheck.paged_kernel_check(
        lambda *case: reference_paged(*case) + 0.1, cpu, torch.float32, shape
    )
    assert off.verdict == "warn" and "differs from the float32 reference by 1.00e-01" in off.figure
    assert "padded layout instead" in off.fix
    assert selfcheck.paged.loaded_kernel(cpu, *shape) is None  # the CPU: no line at all


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="a CUDA GPU builds and runs the extension"
)
def test_the_self_check_prints_the_paged_kernels_line_on_a_gpu():
    """With the extension loaded, Phi-3-medium's heads: the kernel agrees, in bf16 and fp32."""
    from orinfer import extension

    major, minor = torch.cuda.get_device_capability()
    extension.load(f"{major}.{minor}")
    for dtype in (torch.bfloat16, torch.float32):
        lines = [c.line() for c in selfcheck.kernel_checks(torch.device("cuda"), dtype,
                                                           "attention: paged", None, (40, 10, 128))]  # fmt: skip
        assert any(line.startswith("[  ok] paged kernel: agrees") for line in lines), lines


@pytest.mark.unit
def test_the_records_checked_are_the_longest_and_a_spread():
    assert selfcheck.pick_records([5, 9, 1, 3, 7, 2, 8, 4, 6, 1], 4) == [1, 0, 3, 6]
    assert selfcheck.pick_records([3, 1], 8) == [0, 1]


def test_a_planted_difference_is_reported_with_its_margin(tiny_dir):
    """The engine's tokens with one changed: the output check names the record's line, the position, both tokens
    and transformers' top-2 margin there, and fails it (fp32: no near-tie excuses a difference)."""
    gen = generator(tiny_dir)
    chats = [r["message"] for r in records("test_dataset.jsonl")[:3]]
    prompts = dict(enumerate(optimize.prompt_ids(gen.tokenizer, chats)))
    hf = oracle.transformers_model(gen.model, tiny_dir, "eager")
    eos = set(gen.engine.eos_ids)
    ours = {i: oracle.reference_tokens(hf, p, 10, eos) for i, p in prompts.items()}
    assert selfcheck.compare(ours, prompts, hf, 10, eos) == []
    planted = dict(ours)
    planted[1] = ours[1][:3] + [ours[1][3] + 1] + ours[1][4:]
    [(record, position, mine, theirs, margin)] = selfcheck.compare(planted, prompts, hf, 10, eos)
    assert (record, position, mine, theirs) == (1, 3, ours[1][3] + 1, ours[1][3])
    with torch.no_grad():
        top = hf(torch.tensor([prompts[1] + ours[1][:3]])).logits[0, -1].topk(2).values
    assert margin == pytest.approx(float(top[0] - top[1]))
    check = selfcheck.output_check(
        "eager", [(record, position, mine, theirs, margin)], 3, torch.float32, [1, 2, 3]
    )
    assert (
        check.verdict == "FAIL"
        and "line 2: new token 3" in check.figure
        and f"{margin:.3f}" in check.figure
    )
    near = selfcheck.output_check("eager", [(1, 3, 5, 6, 0.25)], 3, torch.bfloat16, [1, 2, 3])
    assert near.verdict == "warn" and "near-ties" in near.figure


def test_the_reference_reads_a_token_table_the_plan_keeps_in_the_file(tiny_dir):
    """Where the plan serves the token table from the checkpoint (a tight Jetson budget), transformers' model gets
    it from the file onto the device, and its tokens equal the engine's."""
    from orinfer.memory import GiB, rss_bytes
    from orinfer.observe import Observer

    gen = optimize.build(
        tiny_dir,
        device="cpu",
        memory_budget=rss_bytes() + 3 * GiB,
        progress=False,
        observer=Observer(),
    )
    assert gen.report().plan.embedding_on_host
    chats = [r["message"] for r in records("test_dataset.jsonl")[:3]]
    gen(chats, max_new_tokens=8, return_full_text=False)
    prompts = dict(enumerate(optimize.prompt_ids(gen.tokenizer, chats)))
    hf = oracle.transformers_model(gen.model, tiny_dir, "eager")
    assert (
        selfcheck.compare(dict(gen.observer.generated), prompts, hf, 8, set(gen.engine.eos_ids))
        == []
    )


def test_a_self_check_that_dies_after_its_plan_still_shows_its_lines(tmp_path, monkeypatch, capsys):
    import optimize
    import test_script

    def load_dies(self, *args, **kwargs):
        raise RuntimeError(
            "NVML_SUCCESS == r INTERNAL ASSERT FAILED (as a Tegra board's allocator fails)"
        )

    monkeypatch.setattr(optimize.Setup, "load", load_dies)
    monkeypatch.chdir(tmp_path)
    code = test_script.main(
        ["--self-check", "--demo", "--data", str(ROOT / "data" / "test_dataset.jsonl")]
    )
    out, err = capsys.readouterr()
    names = [line.split("] ")[1].split(":")[0] for line in out.splitlines()]
    assert names == [
        "device",
        "model files",
        "memory budget",
        "plan",
        "longest record",
        "self-check stopped during the load",
    ]
    assert (
        code == 1
        and "Traceback" not in out + err
        and "(traceback in " in err.strip().splitlines()[-1]
    )
    assert list(tmp_path.iterdir()) == []
    Path(err.split("traceback in ")[1].split(")")[0]).unlink()


@pytest.mark.unit
def test_section_3_is_projected_from_passes_timed_on_the_device():
    from types import SimpleNamespace

    from orinfer.observe import PassRecord

    plan = SimpleNamespace(max_batched_tokens=1024, max_num_seqs=4, max_drafts=4)

    def timed(tokens, seconds):
        return PassRecord(tokens, (), 0.0, 0.0, False, 0.0, (1.0, 1.0 + seconds))

    passes = [timed(1024, 2.0), timed(4, 0.2), timed(8, 0.21), timed(20, 0.19), timed(700, 1.4)]
    prompts = [[1, 2, 3] + [i] * 509 for i in range(8)]  # 3 shared + 8 x 509 = 4,075 unique tokens
    check = selfcheck.timed_pass_check(passes, None, plan, prompts, 10, 500)
    assert (
        "a 1024-token pass took 2000 ms (512 tokens/s), a decode pass 200 ms (the median of 3)"
        in check.figure
    )
    # 4,075 / 512 s of prefill, then 2 waves of 4 sequences: 10 or 500 decode steps of 0.2 s each
    assert "Section 3 ~12.0 s" in check.figure and "at most 207.96 s" not in check.figure
    assert f"at most {4075 / 512 + 2 * 500 * 0.2:.1f} s" in check.figure
    cpu = selfcheck.timed_pass_check(
        [PassRecord(8, (), 0, 0, False, 0, None)], None, plan, prompts, 10, 500
    )
    assert "no pass was timed on a device clock" in cpu.figure
