"""Real text, on a GPU (or the CPU): SmolLM2-135M-Instruct in its own Llama layout (tests/real_model.py), a real trained
model, a stand-in for what real text does to drafting and to bf16 agreement, not for Phi-3-medium's accuracy.

    python3 bench/real_text.py --out OUT [--device cuda] [--stages drafting,agreement] [--quick]
        [--variants off,defaults,...] [--dtypes bfloat16,float32] [--loads mc,chats] [--repeat N]

drafting: forward passes per generated token, drafts proposed and accepted, seconds, with drafts off (and off with
  no chained decode steps: what chaining alone is worth), at the defaults, forced on (lookups in every pass) and each
  source alone (the listed choices, the request's own text, the run's pool), on competition-format records (the
  public set and OpenBookQA test items) and on free-form chats, at batch 1, 16 and the whole set; bf16, and fp32 for
  off / defaults / forced; with --repeat N each run is timed N times and the median's run reported.
agreement: the engine (its fast path) against transformers' generate at batch 1, greedy, on the same records, in
  bf16 and fp32: identical outputs and scores k/N; for each bf16 difference the first differing token and
  transformers' top-2 logit margin there; beside transformers' own bf16-against-fp32 agreement.
"""

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import optimize  # noqa: E402
from orinfer.config import eos_token_ids  # noqa: E402
from orinfer.dataset import scored_answer  # noqa: E402
from orinfer.observe import Observer  # noqa: E402
from orinfer.oracle import dtype_argument  # noqa: E402
from orinfer.options import Options  # noqa: E402
from real_model import smollm2  # noqa: E402
from workload import competition_record, fresh_run  # noqa: E402

MC_NEW, CHAT_NEW = 48, 200
CHATS = [
    "List the numbers from 1 to 60, separated by commas.",
    "Count backwards from 40 to 1.",
    "Repeat the sentence 'the quick brown fox jumps over the lazy dog' ten times.",
    "Write the multiplication table of 7, from 7 x 1 to 7 x 12.",
    "Explain step by step how to make a cup of tea.",
    "Write a Python function that returns the n-th Fibonacci number, and explain it.",
    "Write a short poem about the sea in which every line starts with 'The sea'.",
    "Describe the water cycle in five steps.",
    "Write a JSON object describing three books with title and author.",
    "Give me ten tips for studying, as a numbered list.",
    "Summarise the story of Little Red Riding Hood.",
    "Write an HTML page with a table of the planets and their order from the sun.",
    "What are the days of the week in French, Spanish and German? Answer as a list.",
    "Explain what a prime number is and list the primes below 50.",
    "Write a recipe for pancakes with ingredients and steps.",
    "Write a letter to a friend about your holiday.",
]
VARIANTS = {
    "off": Options(speculate=False),
    "off_unchained": Options(speculate=False, chain_decode=False),
    "defaults": Options(),
    "choices": Options(draft_sources=("choices",)),
    "own": Options(draft_sources=("own",)),
    "pool": Options(draft_sources=("pool",)),
    "forced": Options(lookup_draft_tokens=1 << 20),
}


def workloads(mc_items: int) -> dict:
    """name -> (chats, max_new_tokens, answers or None)."""
    public = [
        json.loads(line) for line in (ROOT / "data" / "test_dataset.jsonl").read_text().splitlines()
    ]
    obqa = [
        competition_record(json.loads(line))
        for line in (ROOT / "bench" / "data" / "openbookqa_test.jsonl").read_text().splitlines()
    ]
    mc = (public + obqa)[:mc_items]
    return {
        "mc": ([r["message"] for r in mc], MC_NEW, [r["answer"] for r in mc]),
        "chats": ([[{"role": "user", "content": c}] for c in CHATS], CHAT_NEW, None),
    }


def timed_runs(gen, chats: list, new: int, batch: int) -> dict:
    """One workload at one batch size: the call(s), what the engine counted, what the observer saw."""
    fresh_run(gen)
    observer = gen.observer
    observer.passes.clear()
    generated, outputs = {}, []
    start = time.perf_counter()
    for first in range(0, len(chats), batch):
        outputs += gen(chats[first : first + batch], max_new_tokens=new, return_full_text=False)
        generated.update({first + i: t for i, t in observer.generated.items()})
    seconds = time.perf_counter() - start
    stats, tokens = gen.report().stats, sum(map(len, generated.values()))
    per_request = observer.passes_per_request()
    return {
        "seconds": seconds,
        "passes": stats["passes"],
        "generated_tokens": tokens,
        "passes_per_generated_token": stats["passes"] / tokens,
        "request_passes_per_generated_token": sum(per_request.values()) / tokens,
        "draft_tokens": stats["draft_tokens"],
        "accepted_drafts": stats["accepted_drafts"],
        "accepted_share": stats["accepted_drafts"] / max(1, stats["draft_tokens"]),
        "outputs": [o[0]["generated_text"] for o in outputs],
        "tokens": [generated[i] for i in range(len(chats))],
    }


def build(folder: Path, device: str, dtype: str, options: Options):
    gen = optimize.build(
        folder,
        device=device,
        dtype=dtype,
        options=options,
        progress=False,
        observer=Observer(),
        kv_tokens=200_000,
    )
    gen.warmup()
    return gen


def drafting(
    folder: Path,
    device: str,
    loads: dict,
    quick: bool,
    variants: list[str],
    dtypes: list[str],
    repeat: int,
) -> dict:
    out = {}
    for dtype in dtypes:
        for name in variants:
            options = VARIANTS[name]
            if dtype == "float32" and name not in ("off", "defaults", "forced"):
                continue
            gen = build(folder, device, dtype, options)
            for load, (chats, new, _) in loads.items():
                sizes = (len(chats), 16) if quick or dtype == "float32" else (len(chats), 16, 1)
                for batch in dict.fromkeys(sizes):  # 16 chats: batch 16 is the whole set, run once
                    subset = chats if batch > 1 else chats[: 30 if load == "mc" else 8]
                    runs = [timed_runs(gen, subset, new, batch) for _ in range(repeat)]
                    res = sorted(runs, key=lambda r: r["seconds"])[
                        len(runs) // 2
                    ]  # the median's run
                    key = f"{dtype}/{name}/{load}/batch{'all' if batch == len(chats) else batch}"
                    out[key] = {k: v for k, v in res.items() if k not in ("outputs", "tokens")}
                    out[key]["seconds_each"] = [r["seconds"] for r in runs]
                    print(
                        key,
                        {
                            k: round(v, 4) if isinstance(v, float) else v
                            for k, v in out[key].items()
                        },
                        flush=True,
                    )
            out[f"{dtype}/{name}/attention"] = gen.describe()
            del gen
            gc.collect()
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return out


def reference_tokens(folder: Path, device: str, dtype: torch.dtype, chats: list, new: int) -> tuple:
    """transformers' generate at batch 1, greedy: each input's new tokens (to its end token) and the model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, **dtype_argument(dtype)).to(device).eval()
    eos = set(eos_token_ids(folder))
    rows = []
    for chat in chats:
        ids = torch.tensor([optimize.prompt_ids(tokenizer, [chat])[0]], device=device)
        with torch.no_grad():
            new_ids = model.generate(ids, max_new_tokens=new, do_sample=False)[
                0, ids.shape[1] :
            ].tolist()
        end = next((i + 1 for i, t in enumerate(new_ids) if t in eos), len(new_ids))
        rows.append(new_ids[:end])
    return rows, model, tokenizer


def margin(model, tokenizer, chat: list, prefix: list[int], device: str) -> float:
    """transformers' top-2 logit margin at the first position where the two outputs differ."""
    ids = torch.tensor([optimize.prompt_ids(tokenizer, [chat])[0] + prefix], device=device)
    with torch.no_grad():
        top = model(ids).logits[0, -1].float().topk(2).values
    return float(top[0] - top[1])


def score(texts: list[str], answers: list[str]) -> int:
    return sum(scored_answer(t) == a for t, a in zip(texts, answers))


# The Orin's path on any GPU: no Triton (orinfer's CUDA extension: its elementwise kernels and paged attention), no
# graphs.
ORIN_PATH = Options(compile=False, cuda_graphs=False, attention="paged")


def agreement(folder: Path, device: str, loads: dict, paths: list[str]) -> dict:
    """The engine's bf16 and fp32 outputs (whole set) against transformers' at batch 1, token for token, on each of
    `paths`: fast (this GPU's defaults), orin (the Orin's path)."""
    out, theirs = {}, {}
    runs = [("float32", torch.float32, Options()), ("bfloat16", torch.bfloat16, Options())]
    orin = [
        ("float32_orin_path", torch.float32, ORIN_PATH),
        ("bfloat16_orin_path", torch.bfloat16, ORIN_PATH),
    ]
    for dtype, torch_dtype, options in ("fast" in paths) * runs + ("orin" in paths) * orin:
        gen = build(folder, device, dtype.removesuffix("_orin_path"), options)
        for load, (chats, new, answers) in loads.items():
            ours = timed_runs(gen, chats, new, len(chats))
            rows, model, tokenizer = reference_tokens(folder, device, torch_dtype, chats, new)
            theirs[torch_dtype, load] = rows  # transformers' rows, whichever path of ours
            differences = []
            for i, (a, b) in enumerate(zip(ours["tokens"], rows)):
                if a != b:
                    j = next(
                        (j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))
                    )
                    differences.append(
                        {
                            "record": i,
                            "position": j,
                            "ours": a[j] if j < len(a) else None,
                            "theirs": b[j] if j < len(b) else None,
                            "their_top2_margin": margin(model, tokenizer, chats[i], b[:j], device),
                        }
                    )
            texts = [tokenizer.decode(r, skip_special_tokens=True) for r in rows]
            out[f"{dtype}/{load}"] = {
                "records": len(chats),
                "identical": len(chats) - len(differences),
                "differences": differences,
                "score_ours": score(ours["outputs"], answers) if answers else None,
                "score_theirs": score(texts, answers) if answers else None,
            }
            print(
                dtype,
                load,
                {k: v for k, v in out[f"{dtype}/{load}"].items() if k != "differences"},
                "margins",
                sorted(round(d["their_top2_margin"], 3) for d in differences),
                flush=True,
            )
            del model
        del gen
        gc.collect()
    for load in loads:  # transformers' own bf16 against its fp32
        bf16, fp32 = theirs[torch.bfloat16, load], theirs[torch.float32, load]
        same = sum(a == b for a, b in zip(bf16, fp32))
        out[f"transformers_bf16_vs_fp32/{load}"] = {"records": len(fp32), "identical": same}
        print("transformers bf16 vs fp32", load, same, "/", len(fp32), flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--stages", default="drafting,agreement")
    ap.add_argument(
        "--mc-items", type=int, default=100, help="competition-format records: the public set first"
    )
    ap.add_argument("--quick", action="store_true", help="no batch-1 runs (the CPU's)")
    ap.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"drafting's variants, of {','.join(VARIANTS)}",
    )
    ap.add_argument("--dtypes", default="bfloat16,float32", help="drafting's dtypes")
    ap.add_argument(
        "--loads", default="mc,chats", help="workloads: mc (competition-format records), chats"
    )
    ap.add_argument(
        "--repeat", type=int, default=1, help="drafting: time each run N times, report the median"
    )
    ap.add_argument(
        "--paths",
        default="fast",
        help="agreement: fast (this GPU's defaults) and/or orin (no Triton: the CUDA extension, paged attention)",
    )
    ap.add_argument("--orin-path", action="store_true", help="agreement: --paths fast,orin")
    args = ap.parse_args()
    paths = ["fast", "orin"] if args.orin_path else args.paths.split(",")
    folder = smollm2("llama")
    loads = {k: v for k, v in workloads(args.mc_items).items() if k in args.loads.split(",")}
    import transformers

    result = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": "SmolLM2-135M-Instruct in its own Llama layout",
    }
    for stage in args.stages.split(","):
        result[stage] = (
            agreement(folder, args.device, loads, paths)
            if stage == "agreement"
            else drafting(
                folder,
                args.device,
                loads,
                args.quick,
                args.variants.split(","),
                args.dtypes.split(","),
                args.repeat,
            )
        )
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "real_text.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
