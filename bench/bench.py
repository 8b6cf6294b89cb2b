"""Device benchmark: our runner and the transformers baselines side by side on one workload, with the hardware floor.

    python bench/bench.py --out DIR [--stages systems,fp32,capped] [--systems ours,ours_nospec,...]
                          [--fp32-exact 50] [--capped 28.5] [--mode scripted|free]

Each stage runs in its own process (clean device memory, and a peak host RSS that belongs to that stage alone);
the driver merges their JSON into DIR/results.json and draws DIR/w1_seconds.png.

No weights can be downloaded, so a Phi-3-medium-shaped model is built on the GPU from the real config with random
weights (normal(0, 0.02) matrices, ones for norms) and the same tensors feed orinfer and transformers' Phi3ForCausalLM.
Workload W1 is OpenBookQA test (500 items) in the competition's prompt format. Random weights never say <|end|>, so
in "scripted" mode every system's sampled token is replaced by the gold answer's tokens and then <|end|> (orinfer:
its `scripts` hook; transformers: a LogitsProcessor), while all model compute still happens: the work a correct
model would do. "free" mode generates a fixed number of tokens. Our time is test_script.py's Section 3: data load
(the JSONL file) + inference through optimize.py.
"""
import argparse
import cProfile
import gc
import itertools
import json
import pstats
import re
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import optimize  # noqa: E402
from orinfer.dataset import read_records  # noqa: E402
from orinfer import kernels, packed_attention  # noqa: E402
from orinfer.memory import GiB, peak_rss_bytes, proc_kib_fields, rss_bytes  # noqa: E402
from orinfer.tiny import ASSETS, END_TOKEN  # noqa: E402

PROMPT = ("\nRead the question and answer the following sentence in given multiple choice.\nAnswer only the sentence "
          "you chose. Never include a question and other word in your answer.\n\nquestion: {stem}\nchoices: {choices}\n")
ORIN_TFLOPS, ORIN_GBPS = 26.7e12, 204.8e9


def competition_record(row: dict) -> dict:
    """One OpenBookQA row (HF schema) as a competition record: the organisers' prompt, answer = the gold choice."""
    texts = row["choices"]["text"]
    content = PROMPT.format(stem=row["question_stem"], choices=repr(texts))
    return {"message": [{"role": "user", "content": content}],
            "answer": texts[row["choices"]["label"].index(row["answerKey"])]}


def write_w1(folder: Path) -> Path:
    """W1: OpenBookQA test (500 items) as competition records, written as the JSONL file Section 3 reads."""
    rows = [json.loads(line) for line in (ROOT / "bench" / "data" / "openbookqa_test.jsonl").read_text().splitlines()]
    path = folder / "w1.jsonl"
    path.write_text("".join(json.dumps(competition_record(r)) + "\n" for r in rows))
    return path


def answer_scripts(tokenizer, records: list) -> list[list[int]]:
    """Scripted mode's forced output per record: the gold answer's tokens, then <|end|>."""
    rows = tokenizer([r["answer"] for r in records], add_special_tokens=False)["input_ids"]
    return [row + [END_TOKEN] for row in rows]


PACKED_MAX_QUERIES = packed_attention.MAX_QUERIES


def pass_tokens_of(system: str) -> int | None:
    """The pass size a system's name asks for: `ours_t24k` runs ours with 24,576 tokens a pass."""
    found = re.search(r"_t(\d+)k", system)
    return 1024 * int(found.group(1)) if found else None


def packed_queries_of(system: str) -> int:
    """The most new tokens of a sequence the packed kernel takes in an eager pass: `ours_q128` gives it 128."""
    found = re.search(r"_q(\d+)", system)
    return int(found.group(1)) if found else PACKED_MAX_QUERIES


def fresh_run(gen) -> int:
    """Forget cached prefixes and zero the counters before a timed run; returns where its passes start in the log."""
    gen.engine.reset_prefix_cache()  # nothing of an earlier run may be reused
    for k in gen.engine.stats:
        gen.engine.stats[k] = 0
    gc.collect()
    gc.freeze()  # as Generator.warmup leaves it in test_script.py: the new prefix cache's tables are not rescanned
    return len(gen.engine.runner.pass_log)


def model_folder(tmp: Path) -> Path:
    """Config, generation config and tokenizer of Phi-3-medium; no weights (they are made on the GPU)."""
    import shutil
    folder = tmp / "phi3-medium-random"
    folder.mkdir()
    for f in ["config.json", "generation_config.json"]:
        shutil.copy(ASSETS / f, folder / f)
    for f in (ASSETS / "phi3-tokenizer").iterdir():
        shutil.copy(f, folder / f.name)
    return folder


def random_init(seed: int):
    def init(model):
        g = torch.Generator(device=model.device).manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02, generator=g)
    return init


def ceilings() -> dict:
    """Measured bf16 GEMM rate (random data, M=N=K=8192) and device copy bandwidth (bytes read + written)."""
    def timed(fn, reps):
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return sorted(times)[len(times) // 2]
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    gemm = 2 * n ** 3 / timed(lambda: a @ b, 20)
    src = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy = 2 * src.numel() * 2 / timed(lambda: dst.copy_(src), 10)
    return {"gemm_flops": gemm, "copy_bytes_per_s": copy}


def unique_prompt_tokens(prompts: list[list[int]]) -> int:
    """Tokens left to compute if every shared prompt prefix is computed once (nodes of the prompts' trie)."""
    seen, count = set(), 0
    for p in prompts:
        h = 0
        for t in p:
            h = hash((h, t))
            if h not in seen:
                seen.add(h)
                count += 1
    return count


class Scripted:
    """transformers LogitsProcessor forcing each row to its script (gold answer tokens + <|end|>)."""

    def __init__(self, scripts_by_prompt: dict[tuple, list[int]], pad: int):
        self.by_prompt, self.pad = scripts_by_prompt, pad
        self.start, self.previous = None, None

    def __call__(self, input_ids, scores):
        rows, length = input_ids.shape
        prev = self.previous
        self.previous = input_ids.clone()
        if prev is None or prev.shape != (rows, length - 1) or not torch.equal(prev, input_ids[:, :-1]):
            self.start = length  # a new generate() call: the rows are prompts (left-padded)
            self.scripts = []
            for row in input_ids.tolist():
                i = 0
                while row[i] == self.pad:
                    i += 1
                self.scripts.append(self.by_prompt[tuple(row[i:])])
        step = length - self.start
        forced = torch.full_like(scores, float("-inf"))
        for r, script in enumerate(self.scripts):
            forced[r, script[min(step, len(script) - 1)]] = 0.0
        return forced


def hf_model(ours, folder: Path, dtype):
    import transformers
    config = transformers.AutoConfig.from_pretrained(folder)
    config._attn_implementation = "sdpa"
    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(config, **{key: dtype})
    hf.load_state_dict(ours.state_dict(), assign=True, strict=True)  # the very same tensors
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=config).to(ours.device)  # its buffers were on meta
    hf.generation_config = transformers.GenerationConfig.from_pretrained(folder)
    return hf.eval()


def count_forwards(model) -> list:
    counter = [0]
    model.register_forward_pre_hook(lambda m, a, kw=None: counter.__setitem__(0, counter[0] + 1))
    return counter


def pass_costs(cfg) -> tuple[int, int]:
    """FLOPs per computed token (2 x the parameters a token passes through; the lm_head only runs for sampled
    positions and is left out) and the bytes of weights one pass reads (bf16)."""
    return 2 * (cfg.num_parameters - 2 * cfg.vocab_size * cfg.hidden_size), cfg.num_parameters * 2


def orin_projection(pass_tokens: list[int], flops_per_token: float, weight_bytes: int) -> float:
    """Each pass costs at least its FLOPs at 26.7 TFLOP/s and at least one read of the weights at 204.8 GB/s."""
    return sum(max(t * flops_per_token / ORIN_TFLOPS, weight_bytes / ORIN_GBPS) for t in pass_tokens)


def parse_args():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--stages", default="systems,free,passes,fp32,capped,uncapped,load")
    ap.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--systems", default="ours,ours_nospec,ours_repeat,ours_eager,hf_generate_bs32,hf_pipeline_bs1")
    ap.add_argument("--mode", default="scripted", choices=["scripted", "free"])
    ap.add_argument("--free-tokens", type=int, default=32)
    ap.add_argument("--limit", type=int, default=0, help="first N items only")
    ap.add_argument("--fp32-exact", type=int, default=50, help="items for the fp32 full-shape exactness check")
    ap.add_argument("--capped", type=float, default=28.5, help="Orin emulation: total budget in GiB")
    ap.add_argument("--capped-runs", default="w1_scripted,longest_free500,w1_first64_free500")
    ap.add_argument("--profile", action="store_true",
                    help="profile the first system's timed call: top CUDA kernels, and where the device sat idle")
    ap.add_argument("--host-profile", action="store_true", help="cProfile each of our systems' timed calls")
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
            chart(merged, out)
            table(merged)
        return
    import transformers
    res = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "transformers": transformers.__version__}
    tmp = Path(tempfile.mkdtemp())
    w1 = write_w1(tmp)
    folder = model_folder(tmp)
    records = read_records(w1)[0]
    if args.limit:
        records = records[:args.limit]
        w1.write_text("".join(json.dumps(r) + "\n" for r in records))
    if args.stage == "systems":
        res.update(systems_stage(args, w1, folder, records))
    elif args.stage == "free":  # speculation where drafts rarely match: fixed-length free-running generation
        args.mode, args.systems, args.profile = "free", "ours,ours_nospec", False
        res["free"] = systems_stage(args, w1, folder, records)
    elif args.stage == "passes":
        res["passes_per_request"] = passes_stage(w1, records)
    elif args.stage == "fp32":
        res["fp32_exact"] = fp32_exact(folder, records[:args.fp32_exact])
    elif args.stage == "capped":
        res["capped"] = capped(folder, records, args.capped, args.capped_runs.split(","))
    elif args.stage == "uncapped":
        res["uncapped"] = capped(folder, records, 0, args.capped_runs.split(","))
    elif args.stage == "load":
        res["load"] = load_stage(folder)
    (out / f"{args.stage}.json").write_text(json.dumps(res, indent=1))


def allocator_counts() -> dict:
    """cudaMalloc / cudaFree calls of torch's device allocator and cudaHostAlloc calls of its pinned-host one, so far
    (a timed call that makes any waited for them: they can block until the device is idle)."""
    dev = torch.cuda.memory_stats()
    host = torch.cuda.host_memory_stats() if hasattr(torch.cuda, "host_memory_stats") else {}
    return {"device_alloc": dev.get("num_device_alloc", 0), "device_free": dev.get("num_device_free", 0),
            "host_alloc": host.get("num_host_alloc", 0)}


def device_idle(prof, least_us: float = 20.0) -> dict:
    """Where the device sat idle between the first and the last thing it ran (kernels, copies) in a profile: the
    total, and the largest gaps with their offsets from the first activity (ms)."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    gaps, end = [], spans[0][1]
    for start, stop in spans[1:]:
        if start - end > least_us:
            gaps.append((round((end - spans[0][0]) / 1e3, 2), round((start - end) / 1e3, 2)))
        end = max(end, stop)
    return {"busy_span_ms": round((end - spans[0][0]) / 1e3, 1), "idle_ms": round(sum(g for _, g in gaps), 1),
            "gaps": len(gaps), "largest_at_ms_gap_ms": sorted(gaps, key=lambda g: -g[1])[:12]}


def breakdown(gen, log_start: int, started: float, seconds: float) -> dict:
    """Where the seconds of one call went. A pass is in flight from its launch until its tokens are on the host;
    the host tokenises later requests, turns finished ones into text and launches the next pass meanwhile where it
    can. `pass_device_s` is each pass's time on the device, from its first event to its tokens' copy (CUDA events);
    `device_idle_between_s`, per pair of passes, is the device's own idle time from one pass's end to the next one's
    start (the next was not launched yet). `outside_passes_s` is the host's time with no pass in flight:
    `before_first_pass_s` (data load, the first pass's tokenisation and scheduling), `between_passes_s` (per gap:
    committing a pass and scheduling the next when it depends on it) and `after_last_pass_s` (the last results)."""
    log = gen.engine.runner.pass_log[log_start:]
    ends = [p[5] + p[2] + p[3] for p in log]
    gaps = [max(0.0, p[5] - max(ends[:i + 1])) for i, p in enumerate(log[1:])]
    before, after = log[0][5] - started, started + seconds - max(ends)
    spans = [p[6] for p in log]
    t = gen.timings
    return {"tokenize_s": t["tokenize"], "detokenize_s": t["detokenize"], "passes": len(log),
            "device_s": sum(end - start for start, end in spans), "build_inputs_s": sum(p[2] for p in log),
            "outside_passes_s": before + sum(gaps) + after, "before_first_pass_s": before,
            "between_passes_s": [round(g, 4) for g in gaps], "after_last_pass_s": after,
            "device_idle_between_s": [round(max(0.0, b[0] - a[1]), 4) for a, b in zip(spans, spans[1:])],
            "pass_tokens": [p[0] for p in log], "pass_device_s": [round(end - start, 4) for start, end in spans],
            "pass_graph": [p[4] for p in log]}


def systems_stage(args, w1: Path, folder: Path, records: list) -> dict:
    res = {"mode": args.mode, "systems": {}, "ceilings": ceilings()}
    print("ceilings", res["ceilings"], flush=True)
    max_new = 500 if args.mode == "scripted" else args.free_tokens
    gen = optimize.build(folder, device="cuda", init=random_init(0), progress=False)
    model, tok = gen.engine.model, gen.tokenizer
    prompts = optimize.prompt_ids(gen.tokenizer, [r["message"] for r in records])
    scripts = answer_scripts(tok, records) if args.mode == "scripted" else None
    flops_per_token, weight_bytes = pass_costs(model.cfg)
    unique = unique_prompt_tokens(prompts)
    res["workload"] = {"items": len(records), "prompt_tokens": sum(map(len, prompts)), "unique_prompt_tokens": unique,
                       "answer_tokens": sum(map(len, scripts)) if scripts else len(records) * max_new,
                       "flops_per_token": flops_per_token, "weight_bytes": weight_bytes}
    res["plan"] = gen.engine.plan.describe()
    print(res["workload"], res["plan"], flush=True)
    gen_args = dict(max_new_tokens=max_new, return_full_text=False, do_sample=False, temperature=0.0)

    def score(outs):
        return sum(o[0]["generated_text"].lstrip().replace("\n", "") == r["answer"] for o, r in zip(outs, records))

    varlen, packed = gen.engine.runner.varlen, gen.engine.runner.packed
    res["attention"] = ("varlen (FlashAttention" + (" + packed Triton kernel" if packed else "") + ")" if varlen
                        else "padded (SDPA)")

    plan = gen.engine.plan

    def run_ours(speculate, compiled, padded=False, flash_only=False, pause_gc=True, pass_tokens=None,
                 packed_queries=None, profiled=False, host_profiled=False):
        # A/B of the pass size alone: the plan's KV pool stays as it is (W1 leaves ~10 GiB of it unused on an H200).
        gen.engine.plan = replace(plan, max_batched_tokens=pass_tokens or plan.max_batched_tokens)
        packed_attention.MAX_QUERIES = packed_queries or PACKED_MAX_QUERIES
        if compiled != kernels.compiled():
            kernels.use_compiled(compiled)
            gen.engine.runner.graphs.clear()  # captured graphs hold the other kernels: capture again
        gen.engine.speculate = speculate
        if gen.engine.runner.varlen != (varlen and not padded):
            gen.engine.runner.varlen = varlen and not padded
            gen.engine.runner.graphs.clear()  # each layout has its own graphs: capture again
        if gen.engine.runner.packed != (packed and not flash_only):
            gen.engine.runner.packed = packed and not flash_only
            gen.engine.runner.graphs.clear()
        gen.warmup()
        gen.pause_gc = pause_gc
        log_start = fresh_run(gen)
        torch.cuda.synchronize()
        host = cProfile.Profile() if host_profiled else None
        allocs = allocator_counts()
        with profile(activities=[ProfilerActivity.CUDA]) if profiled else nullcontext() as prof:
            if host:
                host.enable()
            t = time.perf_counter()
            data = read_records(w1)[0]
            outs = gen([r["message"] for r in data], scripts=scripts, **gen_args)
            torch.cuda.synchronize()
            secs = time.perf_counter() - t
            if host:
                host.disable()
        if host:  # where the host's time went (Python functions; waits for the device show as collect)
            pstats.Stats(host).sort_stats("tottime").print_stats(18)
        if profiled:  # the timed call only (warm-up outside), by kernel
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70),
                  flush=True)
            print("device idle:", json.dumps(device_idle(prof)), flush=True)
        stats = dict(gen.engine.stats)
        brk = breakdown(gen, log_start, t, secs)
        brk["allocator_calls"] = {k: v - allocs[k] for k, v in allocator_counts().items()}
        return {"seconds": secs, "correct": score(outs), "passes": stats["passes"],
                "passes_per_request": sum(s.passes for s in gen.last_sequences) / len(records),
                "stats": stats, "breakdown": brk,
                "peak_reserved_gib": torch.cuda.max_memory_reserved() / GiB,
                "orin_projection_s": orin_projection(brk["pass_tokens"], flops_per_token, weight_bytes),
                "floor_s": unique * flops_per_token / res["ceilings"]["gemm_flops"]
                + stats["passes"] * weight_bytes / res["ceilings"]["copy_bytes_per_s"]}

    systems = args.systems.split(",") if args.systems else []
    compiled = kernels.compiled()
    res["compiled"] = compiled
    for i, name in enumerate([s for s in systems if s.startswith("ours")]):
        torch.cuda.reset_peak_memory_stats()
        res["systems"][name] = run_ours(speculate=name != "ours_nospec", compiled=compiled and name != "ours_eager",
                                        padded=name == "ours_padded", flash_only=name == "ours_flash",
                                        pause_gc=name != "ours_gc",
                                        pass_tokens=pass_tokens_of(name), packed_queries=packed_queries_of(name),
                                        profiled=args.profile and i == 0, host_profiled=args.host_profile)
        print(name, json.dumps({k: v for k, v in res["systems"][name].items() if k != "breakdown"}), flush=True)
        print("   breakdown", json.dumps(res["systems"][name]["breakdown"]), flush=True)

    hf_systems = [s for s in systems if s.startswith("hf")]
    if hf_systems:
        hf = hf_model(model, folder, torch.bfloat16)
        forwards = count_forwards(hf)
        by_prompt = {tuple(p): s for p, s in zip(prompts, scripts)} if scripts else None
        from transformers import LogitsProcessorList
        extra = {"logits_processor": LogitsProcessorList([Scripted(by_prompt, 32000)])} if scripts else \
            {"min_new_tokens": max_new}
        for name in hf_systems:
            torch.cuda.reset_peak_memory_stats()
            forwards[0] = 0
            if name == "hf_generate_bs32":
                tok.padding_side = "left"
                tok.pad_token = "<|endoftext|>"
                t = time.perf_counter()
                data = read_records(w1)[0]
                texts = [tok.apply_chat_template(r["message"], tokenize=False, add_generation_prompt=True) for r in data]
                order = sorted(range(len(texts)), key=lambda i: len(prompts[i]))
                outs = [None] * len(texts)
                for b in range(0, len(order), 32):
                    idx = order[b:b + 32]
                    enc = tok([texts[i] for i in idx], add_special_tokens=False, return_tensors="pt", padding=True).to("cuda")
                    seqs = hf.generate(**enc, max_new_tokens=max_new, do_sample=False, pad_token_id=32000, **extra)
                    for i, row in zip(idx, seqs[:, enc["input_ids"].shape[1]:].tolist()):
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
            res["systems"][name] = {"seconds": secs, "correct": score(outs), "passes": forwards[0],
                                    "passes_per_request": forwards[0] / len(records),
                                    "peak_reserved_gib": torch.cuda.max_memory_reserved() / GiB}
            print(name, json.dumps(res["systems"][name]), flush=True)
    return res


def table(res: dict) -> None:
    ours = res["systems"].get("ours", {}).get("seconds")
    print(f"\nW1 {res['workload']['items']} items ({res['mode']}), {res['gpu']}, torch {res['torch']}, "
          f"transformers {res['transformers']}, attention {res.get('attention', '?')}")
    print(f"{'system':18} {'seconds':>8} {'x ours':>7} {'correct':>8} {'passes':>7} {'peak GiB':>9} {'Orin proj s':>11}")
    for name, r in res["systems"].items():
        ratio = f"{r['seconds'] / ours:7.1f}" if ours else "      -"
        proj = f"{r['orin_projection_s']:11.1f}" if "orin_projection_s" in r else "          -"
        print(f"{name:18} {r['seconds']:8.2f} {ratio} {r['correct']:>8} {r['passes']:>7} {r['peak_reserved_gib']:9.1f} {proj}")
    if "ours" in res["systems"]:
        print(f"floor (unique prompt FLOPs at the measured GEMM rate + ours' passes x weights at copy bandwidth): "
              f"{res['systems']['ours']['floor_s']:.2f} s")
    for name, r in res.get("free", {}).get("systems", {}).items():
        print(f"free-running {res['free']['workload']['answer_tokens'] // res['free']['workload']['items']} tokens: "
              f"{name} {r['seconds']:.2f} s, {r['passes']} passes, drafts {r['stats']['draft_tokens']} "
              f"accepted {r['stats']['accepted_drafts']}")
    if "fp32_exact" in res:
        print("fp32 exact:", res["fp32_exact"])
    if "passes_per_request" in res:
        print("passes per request (CPU, scripted):", res["passes_per_request"])
    for stage in ("capped", "uncapped"):
        for k, v in res.get(stage, {}).items():
            print(stage, k, v if not isinstance(v, dict) else {a: b for a, b in v.items() if a != "stats"})
    for e in res.get("errors", []):
        print("ERROR", e)


def passes_stage(w1: Path, records: list) -> dict:
    """Forward passes each request takes part in, scripted W1, with and without speculation. In scripted mode the
    tokens are forced, so the pass structure does not depend on the weights: this runs the tiny model on the CPU
    with the limits of two plans — the H200's (16384 tokens a pass, 512 sequences, 16 drafts) and the one Phi-3-medium
    gets on a 32 GB Orin (budget 29.5 GiB, an assumed headless MemAvailable; host as measured on the H200) — and
    prices the Orin plan's passes at 26.7 TFLOP/s and 204.8 GB/s (a projection)."""
    from dataclasses import replace
    from orinfer.config import Phi3Config
    from orinfer.engine import Engine
    from orinfer.memory import MiB, plan_memory
    from orinfer.tiny import write_tiny_model
    folder = write_tiny_model(Path(tempfile.mkdtemp()) / "tiny")
    gen = optimize.build(folder, device="cpu", progress=False)
    medium = Phi3Config.from_folder(ASSETS)
    flops_per_token, weight_bytes = pass_costs(medium)
    orin = plan_memory(medium, int(29.5 * GiB), weight_bytes, 2, shared_host=True, host_bytes=800 * MiB)
    limits = ("num_blocks", "block_size", "max_num_seqs", "max_batched_tokens", "max_gather_tokens", "max_drafts")
    plans = {"h200": replace(gen.engine.plan, max_batched_tokens=16384, max_num_seqs=512, max_drafts=16),
             "orin": replace(gen.engine.plan, **{k: getattr(orin, k) for k in limits})}
    scripts = answer_scripts(gen.tokenizer, records)
    out = {"orin_plan": orin.describe()}
    for (plan_name, plan), (name, speculate) in itertools.product(plans.items(), (("speculation", True),
                                                                                   ("no_speculation", False))):
        gen.engine = Engine(gen.engine.model, gen.engine.eos_ids, plan, speculate)
        gen.engine.free_draft_tokens = 128
        gen([r["message"] for r in read_records(w1)[0]], scripts=scripts, max_new_tokens=500)
        per = [s.passes for s in gen.last_sequences]
        tokens = [p[0] for p in gen.engine.runner.pass_log]
        out[f"{plan_name}_{name}"] = {"mean": sum(per) / len(per), "max": max(per), "batch_passes": len(tokens),
                                      "orin_projection_s": orin_projection(tokens, flops_per_token, weight_bytes)}
        print("passes per request", plan_name, name, out[f"{plan_name}_{name}"], flush=True)
    return out


def fp32_exact(folder: Path, records: list, new_tokens: int = 32) -> dict:
    """orinfer (batched) vs transformers generate at batch 1, fp32, free-running greedy: token-exact match rate."""
    gen = optimize.build(folder, device="cuda", dtype="float32", init=random_init(1), progress=False)
    hf = hf_model(gen.engine.model, folder, torch.float32)
    chats = [r["message"] for r in records]
    gen(chats, max_new_tokens=new_tokens, return_full_text=False)
    ours = [s.generated for s in gen.last_sequences]
    prompts = optimize.prompt_ids(gen.tokenizer, chats)
    same, first_diff = 0, []
    for p, o in zip(prompts, ours):
        ids = torch.tensor([p], device="cuda")
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=32000)[0, len(p):].tolist()
        same += ref == o
        if ref != o:
            first_diff.append(next((i for i, (a, b) in enumerate(zip(ref, o)) if a != b), min(len(ref), len(o))))
    del gen, hf
    gc.collect()
    torch.cuda.empty_cache()
    return {"items": len(records), "new_tokens": new_tokens, "exact": same, "rate": same / len(records),
            "first_mismatch_positions": first_diff}


def host_rss_split() -> dict:
    """RssAnon / RssFile / RssShmem in GiB, and the six largest mappings by RSS (what the host memory is)."""
    out = {k: v / GiB for k, v in proc_kib_fields("/proc/self/status", ("RssAnon", "RssFile", "RssShmem")).items()}
    maps, name = {}, None
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if "-" in parts[0] and len(parts) >= 5 and not parts[0].endswith(":"):
                name = parts[5] if len(parts) > 5 else "[anon]"
            elif parts[0] == "Rss:":
                maps[name] = maps.get(name, 0) + int(parts[1]) / (1 << 20)
    out["top"] = {Path(k).name: round(v, 3) for k, v in sorted(maps.items(), key=lambda kv: -kv[1])[:6]}
    return out


def capped(folder: Path, records: list, budget_gib: float, run_names: list[str]) -> dict:
    """Orin emulation: device reserved + host RSS + 0.5 GiB (the CUDA context the Orin would share) <= budget.
    With budget_gib 0 the same runs go uncapped, for the time lost to the cap."""
    torch.cuda.init()
    host = rss_bytes()
    report = {"budget_gib": budget_gib, "host_rss_idle_gib": host / GiB}
    if budget_gib:
        device_cap = budget_gib * GiB - host - 0.5 * GiB
        torch.cuda.set_per_process_memory_fraction(device_cap / torch.cuda.get_device_properties(0).total_memory)
        report["device_cap_gib"] = device_cap / GiB
    # compile=False: the Orin's torch has no Triton, and compiling would add inductor's host memory to the count.
    gen = optimize.build(folder, device="cuda", init=random_init(0), progress=False, unified_memory=bool(budget_gib),
                         memory_budget=int(budget_gib * GiB) if budget_gib else "auto", compile=False)
    report["host_rss_after_load_gib"] = rss_bytes() / GiB
    report["plan"] = gen.engine.plan.describe()
    report["host_after_load"] = host_rss_split()
    gen.engine.warmup(cuda_graphs=False)  # the probe alone (kernels, allocator), then the graphs
    report["host_after_probe"] = host_rss_split()
    gen.warmup()
    report["host_after_graphs"] = host_rss_split()
    report["graphs"] = len(gen.engine.runner.graphs)
    report["host_rss_after_warmup_gib"] = rss_bytes() / GiB
    report["device_reserved_after_warmup_gib"] = torch.cuda.memory_reserved() / GiB
    print(report, flush=True)
    scripts = answer_scripts(gen.tokenizer, records)
    longest = read_records(ROOT / "data" / "sample_longest_data.jsonl")[0]
    runs = [("w1_scripted", [r["message"] for r in records], scripts, 500),
            ("longest_free500", [r["message"] for r in longest], None, 500),
            ("w1_first64_free500", [r["message"] for r in records[:64]], None, 500)]
    for name, chats, script, new in [r for r in runs if r[0] in run_names]:
        log_start = fresh_run(gen)
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        gen(chats, scripts=script, max_new_tokens=new, return_full_text=False)
        torch.cuda.synchronize()
        peak_dev, peak_host = torch.cuda.max_memory_reserved(), peak_rss_bytes()
        report[name] = {"seconds": time.perf_counter() - t, "peak_device_reserved_gib": peak_dev / GiB,
                        "peak_host_rss_gib": peak_host / GiB,
                        "total_gib": (peak_dev + peak_host) / GiB + 0.5, "stats": dict(gen.engine.stats),
                        "generated_tokens": sum(len(s.generated) for s in gen.last_sequences),
                        "largest_batches": sorted(set(p[1] for p in gen.engine.runner.pass_log[log_start:]))[-3:]}
        print("capped" if budget_gib else "uncapped", name, json.dumps(report[name]), flush=True)
    return report


def write_checkpoint(folder: Path, shard_bytes: int = 4 << 30, device: str = "cuda") -> None:
    """A full-size random checkpoint in HF's sharded safetensors layout (run in a child process: its host copies of
    the tensors must not count in the loading process's RSS)."""
    from safetensors.torch import save_file
    from orinfer.config import Phi3Config
    from orinfer.model import Phi3ForCausalLM
    model = Phi3ForCausalLM(Phi3Config.from_folder(folder), device, torch.bfloat16)
    random_init(0)(model)
    shards, current, size = [], {}, 0
    for name, p in model.named_parameters():
        if current and size + p.nbytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = p
        size += p.nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: v.detach().cpu() for k, v in shard.items()}, str(folder / file))
        weight_map.update({k: file for k in shard})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def load_stage(folder: Path) -> dict:
    """The streaming loader on a full-size checkpoint: host RSS at its peak against the idle process, and seconds
    (the file was just written, so it reads mostly from the page cache: a lower bound on time)."""
    import multiprocessing
    t = time.perf_counter()
    writer = multiprocessing.get_context("spawn").Process(target=write_checkpoint, args=(folder,))
    writer.start()
    writer.join()
    if writer.exitcode:
        raise RuntimeError(f"writing the checkpoint failed (exit {writer.exitcode})")
    written = time.perf_counter() - t
    checkpoint = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    torch.cuda.init()
    idle, peak_before = rss_bytes(), peak_rss_bytes()
    t = time.perf_counter()
    gen = optimize.build(folder, device="cuda", compile=False, progress=False)
    torch.cuda.synchronize()
    peak = peak_rss_bytes()
    report = {"checkpoint_gib": checkpoint / GiB, "write_s": written, "load_s": time.perf_counter() - t,
              "host_rss_idle_gib": idle / GiB, "host_rss_peak_before_load_gib": peak_before / GiB,
              "host_rss_peak_gib": peak / GiB,
              "host_rss_after_gib": rss_bytes() / GiB, "peak_over_idle_gib": (peak - idle) / GiB,
              "device_allocated_gib": torch.cuda.memory_allocated() / GiB, "plan": gen.engine.plan.describe()}
    print("load", json.dumps(report), flush=True)
    return report


def chart(res: dict, out: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = list(res["systems"])
    secs = [res["systems"][n]["seconds"] for n in names]
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.barh(names, secs, color=["tab:green" if n.startswith("ours") else "tab:gray" for n in names])
    for i, s in enumerate(secs):
        ax.text(s, i, f" {s:.2f} s", va="center")
    ax.set_xscale("log")
    ax.set_xlabel(f"seconds, W1 ({res['workload']['items']} items, {res['mode']}), {res['gpu']}")
    fig.tight_layout()
    fig.savefig(out / "w1_seconds.png", dpi=120)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
