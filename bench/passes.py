"""White-box (it assembles engines with other plans' limits; bench/README.md). The passes stage (CPU): forward
passes on scripted workloads, with and without speculation. In scripted mode the tokens are forced, so the pass structure does not depend on the weights: this runs the tiny model on the CPU with the
limits of two plans — the H200's (16384 tokens a pass, 512 sequences, 16 drafts) and the Orin emulation's (28.5 GiB,
the host as the capped stage measured it under the Jetson's transformers pin, the token table read from the file) —
and prices each plan's passes on an Orin (a projection) at its datasheet rates (26.7 TFLOP/s, 204.8 GB/s) and at those
measured on an Orin (~21 TFLOP/s, ~150 GB/s; measure.ORIN_MEASURED), with and without an assumed
host time per pass.

The workloads (the speculation table of BENCHMARKS.md): W1 scripted (short answers, drafts from the choices);
answers that copy a span of their own prompt; answers that repeat one explanation with the item's answer in it
(drafts from earlier requests' outputs, the run's n-gram pool); and W1 with 10 answers that run to 500 tokens
repeating themselves; and W1's shape without OpenBookQA's text (workload.synthetic_records: pseudo-words of
the same lengths), for whether what was tuned on W1 holds elsewhere."""

import itertools
import tempfile
from dataclasses import replace
from pathlib import Path

import optimize
from measure import ORIN_MEASURED, orin_projection, pass_costs
from orinfer.attention import planned
from orinfer.config import ModelConfig
from orinfer.engine import Engine
from orinfer.memory import GiB, plan_memory
from orinfer.observe import Observer
from orinfer.options import Options
from orinfer.tiny import ASSETS, END_TOKEN, write_tiny_model
from workload import ScriptedEngine, answer_scripts, long_answers, synthetic_records

# Host time a decode pass takes with no pass in flight, measured on the H200's host at batch 128 (W3, run 44), and
# how much slower an Orin's Cortex-A78AE cores are assumed to be (an assumption: no Orin was measured).
HOST_S_PER_PASS, ORIN_HOST_SLOWER = 4.4e-3, 3.0
EXPLANATION = (
    "The correct choice follows from the facts stated in the question: each of the other options "
    "contradicts one of them, so the answer is"
)


def workloads(tokenizer, records: list) -> dict[str, tuple[list, list[list[int]]]]:
    """Each workload's chats and scripted answers: W1's own, and W1's shape without OpenBookQA's text."""
    chats = [r["message"] for r in records]
    scripts = answer_scripts(tokenizer, records)
    prompts = optimize.prompt_ids(tokenizer, chats)
    explained = tokenizer(
        [f"{EXPLANATION} {r['answer']}." for r in records], add_special_tokens=False
    )["input_ids"]
    # The span of the prompt after the shared 37-token instruction: the question's own words.
    copied = [list(p[40:104]) + [END_TOKEN] for p in prompts]
    synthetic = synthetic_records(records)
    return {
        "w1_scripted": (chats, scripts),
        "copy_prompt_64": (chats, copied),
        "repeat_explanation": (chats, [e + [END_TOKEN] for e in explained]),
        "w1_long10": (chats, long_answers(scripts, 10)),
        "synthetic_scripted": (
            [r["message"] for r in synthetic],
            answer_scripts(tokenizer, synthetic),
        ),
    }


def _plans(setup) -> tuple[dict, tuple[float, int]]:
    """The H200's and the Orin emulation's limits on the tiny model's plan, and Phi-3-medium's pass costs."""
    medium = ModelConfig.from_folder(ASSETS)
    flops_per_token, weight_bytes = pass_costs(medium)
    orin = plan_memory(
        medium,
        int(28.5 * GiB),
        weight_bytes,
        2,
        shared_host=True,
        host_bytes=int(0.535 * GiB),
        table_in_checkpoint=True,
        attention=planned(None, "cuda"),
    )
    limits = (
        "num_blocks",
        "block_size",
        "max_num_seqs",
        "max_batched_tokens",
        "max_gather_tokens",
        "max_drafts",
    )
    return (
        {
            "h200": replace(setup.plan, max_batched_tokens=16384, max_num_seqs=512, max_drafts=16),
            "orin": replace(setup.plan, **{k: getattr(orin, k) for k in limits}),
        },
        (flops_per_token, weight_bytes),
    )


def _tiny():
    folder = write_tiny_model(Path(tempfile.mkdtemp()) / "tiny")
    setup = optimize.prepare(folder, device="cpu")
    return setup, setup.load(progress=False).model


def _run(
    setup, model, plan, speculate: bool, chats: list, scripts: list, costs: tuple[float, int]
) -> dict:
    """One scripted call: its passes, drafts and the Orin projection of its pass sizes."""
    # Lookup drafts as on a GPU (the CPU's default has none), under 128 tokens a pass (an Orin's balance).
    observer = Observer()
    engine = ScriptedEngine(
        Engine(
            model,
            setup.eos,
            plan,
            Options(speculate=speculate, lookup_draft_tokens=128),
            observer=observer,
        ),
        scripts,
    )
    optimize.Generator(engine, setup.tokenizer, progress=False)(chats, max_new_tokens=500)
    per = list(observer.passes_per_request().values())
    generated = [len(observer.generated[i]) for i in range(len(chats))]
    tokens = [p.tokens for p in observer.passes]
    device = orin_projection(tokens, *costs)
    return {
        "mean_passes_per_request": sum(per) / len(per),
        "max": max(per),
        "batch_passes": len(tokens),
        "generated_tokens": sum(generated),
        "passes_per_generated_token": sum(per) / sum(generated),
        "stats": dict(engine.stats),
        "orin_projection_s": device,
        "orin_projection_measured_rates_s": orin_projection(tokens, *costs, ORIN_MEASURED),
        "orin_projection_with_host_s": device + len(tokens) * HOST_S_PER_PASS * ORIN_HOST_SLOWER,
    }


def passes_stage(records: list, only: set[str] | None = None) -> dict:
    """`only`: the workloads to run (default: all of them)."""
    setup, model = _tiny()
    plans, costs = _plans(setup)
    out = {
        "orin_plan": plans["orin"].describe(),
        "host_s_per_pass": HOST_S_PER_PASS,
        "orin_host_slower": ORIN_HOST_SLOWER,
    }
    for (work, (chats, scripts)), (plan_name, plan), (name, speculate) in itertools.product(
        [
            (k, v)
            for k, v in workloads(setup.tokenizer, records).items()
            if only is None or k in only
        ],
        plans.items(),
        (("speculation", True), ("no_speculation", False)),
    ):
        out[f"{work}_{plan_name}_{name}"] = _run(
            setup, model, plan, speculate, chats, scripts, costs
        )
        print("passes", work, plan_name, name, out[f"{work}_{plan_name}_{name}"], flush=True)
    return out


def ahead_fill_sweep(records: list, values: list[float]) -> dict:
    """engine.AHEAD_FILL (how full a pass launched before the last one commits must be) under the Orin emulation's
    plan, on `records` as given (W1, or its synthetic shape: bench.py --workload): passes and their projection."""
    import orinfer.engine

    setup, model = _tiny()
    plans, costs = _plans(setup)
    chats, scripts = [r["message"] for r in records], answer_scripts(setup.tokenizer, records)
    out, kept = {}, orinfer.engine.AHEAD_FILL
    try:
        for value in values:
            orinfer.engine.AHEAD_FILL = value
            out[str(value)] = _run(setup, model, plans["orin"], True, chats, scripts, costs)
            print("ahead_fill", value, out[str(value)], flush=True)
    finally:
        orinfer.engine.AHEAD_FILL = kept
    return out
