"""The systems stage: W1 through ours (one generator per variant, built from the table below) and through
transformers (generate at batch 32, the organisers' pipeline at batch 1), each timed as test_script.py's Section 3
times it: reading the JSONL + inference, after the untimed warm-up."""

import cProfile
import gc
import json
import pstats
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoTokenizer

import optimize
from measure import (
    allocator_counts,
    breakdown,
    ceilings,
    decode_floor,
    device_idle,
    kv_read_bytes,
    orin_projection,
    pass_costs,
)
from orinfer.config import ModelConfig
from orinfer.dataset import read_records, scored_answer
from orinfer.observe import Observer
from orinfer.memory import GiB
from orinfer.model import CausalLM
from orinfer.options import Options
from workload import (
    Scripted,
    scripted,
    answer_scripts,
    count_forwards,
    fresh_run,
    hf_model,
    random_init,
    unique_prompt_tokens,
)

# transformers generate's batch size, by system name.
HF_GENERATE = {"hf_generate_bs32": 32, "hf_generate_bs64": 64}

# Our variants: each name's options. `NAME_repeat` is a second call on NAME's generator (the first is timed as NAME
# where asked for, else run untimed).
VARIANTS = {
    "ours": Options(),
    "ours_nospec": Options(speculate=False),  # no drafts
    "ours_eager": Options(compile=False),  # no fused kernels
    "ours_padded": Options(attention="padded"),  # the padded SDPA layout
    "ours_flash": Options(packed_queries=0),  # FlashAttention for every sequence
    "ours_gc": Options(pause_gc=False),  # the cyclic collector left running
    "ours_unchained": Options(
        chain_decode=False
    ),  # each decode pass waits for the one before's commit
    "ours_nospec_unchained": Options(speculate=False, chain_decode=False),
    "ours_t24k": Options(pass_tokens=24576),
    "ours_t32k": Options(pass_tokens=32768),  # tokens a pass
    "ours_q32": Options(packed_queries=32),
    "ours_q64": Options(packed_queries=64),  # the packed kernel's bound
    "ours_q256": Options(packed_queries=256),
}


def free_device() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def systems_stage(args, w1: Path, folder: Path, records: list) -> dict:
    res = {"mode": args.mode, "systems": {}, "ceilings": ceilings(), "attention": {}}
    print("ceilings", res["ceilings"], flush=True)
    max_new = 500 if args.mode == "scripted" else args.free_tokens
    tok = AutoTokenizer.from_pretrained(folder)
    prompts = optimize.prompt_ids(tok, [r["message"] for r in records])
    scripts = answer_scripts(tok, records) if args.mode == "scripted" else None
    cfg = ModelConfig.from_folder(folder)
    flops_per_token, weight_bytes = pass_costs(cfg)
    unique = unique_prompt_tokens(prompts)
    res["workload"] = {
        "items": len(records),
        "prompt_tokens": sum(map(len, prompts)),
        "unique_prompt_tokens": unique,
        "answer_tokens": sum(map(len, scripts)) if scripts else len(records) * max_new,
        "flops_per_token": flops_per_token,
        "weight_bytes": weight_bytes,
    }
    print(res["workload"], flush=True)
    gen_args = dict(
        max_new_tokens=max_new, return_full_text=False, do_sample=False, temperature=0.0
    )

    def score(outs):
        return sum(
            scored_answer(o[0]["generated_text"]) == r["answer"] for o, r in zip(outs, records)
        )

    def timed_call(gen, profiled: bool, host_profiled: bool) -> dict:
        observer = gen.observer
        log_start = fresh_run(gen)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        host = cProfile.Profile() if host_profiled else None
        allocs = allocator_counts()
        with profile(activities=[ProfilerActivity.CUDA]) if profiled else nullcontext() as prof:
            if host:
                host.enable()
            t = time.perf_counter()
            data = read_records(w1)[0]
            outs = gen([r["message"] for r in data], **gen_args)
            torch.cuda.synchronize()
            secs = time.perf_counter() - t
            if host:
                host.disable()
        if (
            host
        ):  # where the host's time went (Python functions; waits for the device show as collect)
            pstats.Stats(host).sort_stats("tottime").print_stats(18)
        if profiled:  # the timed call only (warm-up outside), by kernel
            print(
                prof.key_averages().table(
                    sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70
                ),
                flush=True,
            )
            print("device idle:", json.dumps(device_idle(prof)), flush=True)
        stats = gen.report().stats
        log = list(observer.passes)[log_start:]
        brk = breakdown(log, observer.phases, t, secs)
        brk["allocator_calls"] = {k: v - allocs[k] for k, v in allocator_counts().items()}
        per_request = observer.passes_per_request(log_start)
        decode = None
        if (
            args.mode == "free"
        ):  # decode-heavy: the floor counts the K/V every step reads, and the host per pass
            generated = [len(observer.generated[i]) for i in range(len(records))]
            floor = decode_floor(
                brk["pass_tokens"],
                kv_read_bytes(list(map(len, prompts)), generated, cfg.kv_bytes_per_token),
                flops_per_token,
                weight_bytes,
                res["ceilings"],
            )
            decode = {
                "floor_s": floor,
                "x_floor": secs / floor,
                "generated_tokens": sum(generated),
                "device_ms_per_pass": 1e3 * brk["device_s"] / len(log),
                "host_ms_per_pass_no_pass_in_flight": 1e3 * brk["outside_passes_s"] / len(log),
                "build_inputs_ms_per_pass": 1e3 * brk["build_inputs_s"] / len(log),
            }
        return {
            "seconds": secs,
            "correct": score(outs),
            "passes": stats["passes"],
            "decode": decode,
            "passes_per_request": sum(per_request.get(i, 0) for i in range(len(records)))
            / len(records),
            "stats": stats,
            "breakdown": brk,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / GiB,
            "orin_projection_s": orin_projection(brk["pass_tokens"], flops_per_token, weight_bytes),
            "floor_s": unique * flops_per_token / res["ceilings"]["gemm_flops"]
            + stats["passes"] * weight_bytes / res["ceilings"]["copy_bytes_per_s"],
        }

    systems = args.systems.split(",") if args.systems else []
    ours = [s for s in systems if s.startswith("ours")]
    bases = list(dict.fromkeys(s.removesuffix("_repeat") for s in ours))
    first = True

    def built(base: str):
        gen = scripted(
            optimize.build(
                folder,
                device="cuda",
                init=random_init(0),
                progress=False,
                options=VARIANTS[base],
                observer=Observer(),
                memory_budget=f"{args.interleave}GiB" if args.interleave else "auto",
            ),
            scripts,
        )
        res.setdefault("plan", gen.report().plan.describe())
        gen.warmup()
        res["attention"][base] = (
            gen.describe()
        )  # after the warm-up, which measures the lookup-draft budget
        print(base, res["plan"], res["attention"][base], flush=True)
        return gen

    def call(gen, name: str) -> None:
        """Time `name` on its variant's generator (NAME_repeat: the second call; an unasked first call is untimed)."""
        nonlocal first
        if name not in ours:
            if name + "_repeat" in ours:
                timed_call(gen, False, False)
            return
        res["systems"][name] = timed_call(gen, args.profile and first, args.host_profile)
        first = False
        print(
            name,
            json.dumps({k: v for k, v in res["systems"][name].items() if k != "breakdown"}),
            flush=True,
        )
        print("   breakdown", json.dumps(res["systems"][name]["breakdown"]), flush=True)

    if (
        args.interleave
    ):  # every variant built at once, their calls alternated: neither order nor drift favours one
        gens = {base: built(base) for base in bases}
        for suffix in ("", "_repeat"):
            for base in bases:
                call(gens[base], base + suffix)
        del gens
        free_device()
    else:
        for base in bases:
            gen = built(base)
            call(gen, base)
            call(gen, base + "_repeat")
            del gen
            free_device()

    hf_systems = [s for s in systems if s.startswith("hf")]
    if hf_systems:
        res["systems"].update(
            hf_stage(hf_systems, w1, folder, records, prompts, scripts, gen_args, score, max_new)
        )
    return res


def hf_stage(names, w1, folder, records, prompts, scripts, gen_args, score, max_new) -> dict:
    """transformers on the same random weights (the same seed's tensors, in a model of its own)."""
    ours = CausalLM(ModelConfig.from_folder(folder), "cuda", torch.bfloat16)
    random_init(0)(ours)
    hf = hf_model(ours, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    forwards = count_forwards(hf)
    by_prompt = {tuple(p): s for p, s in zip(prompts, scripts)} if scripts else None
    from transformers import LogitsProcessorList

    extra = (
        {"logits_processor": LogitsProcessorList([Scripted(by_prompt, 32000)])}
        if scripts
        else {"min_new_tokens": max_new}
    )
    res = {}
    for name in names:
        torch.cuda.reset_peak_memory_stats()
        forwards[0] = 0
        if name in HF_GENERATE:
            batch = HF_GENERATE[name]
            tok.padding_side = "left"
            tok.pad_token = "<|endoftext|>"
            t = time.perf_counter()
            data = read_records(w1)[0]
            texts = [
                tok.apply_chat_template(r["message"], tokenize=False, add_generation_prompt=True)
                for r in data
            ]
            order = sorted(range(len(texts)), key=lambda i: len(prompts[i]))
            outs = [None] * len(texts)
            for b in range(0, len(order), batch):
                idx = order[b : b + batch]
                enc = tok(
                    [texts[i] for i in idx],
                    add_special_tokens=False,
                    return_tensors="pt",
                    padding=True,
                ).to("cuda")
                seqs = hf.generate(
                    **enc, max_new_tokens=max_new, do_sample=False, pad_token_id=32000, **extra
                )
                for i, row in zip(idx, seqs[:, enc["input_ids"].shape[1] :].tolist()):
                    outs[i] = [{"generated_text": tok.decode(row, skip_special_tokens=True)}]
            torch.cuda.synchronize()
        else:  # the organisers' Section 3 as written (a list of dicts stands in for datasets' load_dataset)
            from transformers import pipeline
            from transformers.pipelines.pt_utils import KeyDataset

            pipe = pipeline("text-generation", model=hf, tokenizer=tok)
            t = time.perf_counter()
            data = read_records(w1)[0]
            outs = list(pipe(KeyDataset(data, "message"), **gen_args, **extra))
            torch.cuda.synchronize()
        secs = time.perf_counter() - t
        res[name] = {
            "seconds": secs,
            "correct": score(outs),
            "passes": forwards[0],
            "passes_per_request": forwards[0] / len(records),
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / GiB,
        }
        print(name, json.dumps(res[name]), flush=True)
    return res
