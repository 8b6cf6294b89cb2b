"""The passes stage (CPU): forward passes each request takes part in, scripted W1, with and without speculation.
In scripted mode the tokens are forced, so the pass structure does not depend on the weights: this runs the tiny
model on the CPU with the limits of two plans — the H200's (16384 tokens a pass, 512 sequences, 16 drafts) and the
one Phi-3-medium gets on a 32 GB Orin (budget 29.5 GiB, an assumed headless MemAvailable; host as measured on the
H200) — and prices the Orin plan's passes at 26.7 TFLOP/s and 204.8 GB/s (a projection)."""
import itertools
import tempfile
from dataclasses import replace
from pathlib import Path

import optimize
from measure import orin_projection, pass_costs
from orinfer.config import Phi3Config
from orinfer.dataset import read_records
from orinfer.engine import Engine
from orinfer.memory import GiB, MiB, plan_memory
from orinfer.options import Options
from orinfer.tiny import ASSETS, write_tiny_model
from workload import ScriptedAnswers, answer_scripts


def passes_stage(w1: Path, records: list) -> dict:
    folder = write_tiny_model(Path(tempfile.mkdtemp()) / "tiny")
    setup = optimize.prepare(folder, device="cpu")
    model = setup.load(progress=False).engine.model
    medium = Phi3Config.from_folder(ASSETS)
    flops_per_token, weight_bytes = pass_costs(medium)
    orin = plan_memory(medium, int(29.5 * GiB), weight_bytes, 2, shared_host=True, host_bytes=800 * MiB)
    limits = ("num_blocks", "block_size", "max_num_seqs", "max_batched_tokens", "max_gather_tokens", "max_drafts")
    plans = {"h200": replace(setup.plan, max_batched_tokens=16384, max_num_seqs=512, max_drafts=16),
             "orin": replace(setup.plan, **{k: getattr(orin, k) for k in limits})}
    scripts = answer_scripts(setup.tokenizer, records)
    out = {"orin_plan": orin.describe()}
    for (plan_name, plan), (name, speculate) in itertools.product(plans.items(), (("speculation", True),
                                                                                   ("no_speculation", False))):
        # Prompt-lookup drafts as on a GPU (the CPU's default has none).
        observer = ScriptedAnswers(scripts)
        engine = Engine(model, setup.eos, plan, Options(speculate=speculate, lookup_draft_tokens=128),
                        observer=observer)
        optimize.Generator(engine, setup.tokenizer, progress=False)([r["message"] for r in read_records(w1)[0]],
                                                                     max_new_tokens=500)
        per = list(observer.passes_per_request().values())
        tokens = [p.tokens for p in observer.passes]
        out[f"{plan_name}_{name}"] = {"mean": sum(per) / len(per), "max": max(per), "batch_passes": len(tokens),
                                      "orin_projection_s": orin_projection(tokens, flops_per_token, weight_bytes)}
        print("passes per request", plan_name, name, out[f"{plan_name}_{name}"], flush=True)
    return out
