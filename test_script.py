"""Competition submission runner: Phi-3-medium-4k-instruct over the organisers' dataset, in the organisers' four sections.

    python test_script.py                # the real model in ./models/Phi-3-medium-4k-instruct, on the GPU
    python test_script.py --demo         # the embedded tiny random Phi-3, on the CPU, in seconds

Before the model loads, the data file and every option are checked: a problem is one line on stderr naming the file
and line, and exit code 2. Section 3 (timed) is data load + inference and yields `outs` in pipe() form and dataset
order; Section 4 (untimed) scores them exactly as the organisers do. Each result is appended to OUT.partial as it
finishes and --out is replaced only at the end, so a run that dies loses nothing: --resume runs only what is missing.
"""
import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

import optimize
from orinfer.dataset import DataError, read_records, read_results


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage block and then the error
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def parse_args(argv=None):
    p = _Parser(prog="test_script.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="./models/Phi-3-medium-4k-instruct", help="local HF folder of the model")
    p.add_argument("--data", default="./data/test_dataset.jsonl", help="JSONL records {'message': [...], 'answer': ...}")
    p.add_argument("--out", default="outputs.jsonl", help="results, one JSON line per record, in dataset order")
    p.add_argument("--resume", action="store_true",
                   help="keep the results already in --out and OUT.partial and run only the other records")
    p.add_argument("--max-new-tokens", type=_positive_int, default=500)
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="auto keeps the checkpoint's dtype (bf16), as the organisers' torch_dtype='auto' does")
    p.add_argument("--memory-budget", default="auto",
                   help="bytes the process may use, host and device together (e.g. 28.5GiB); auto reads MemAvailable "
                        "on an integrated GPU (Jetson) and free memory on a discrete one")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--no-speculation", action="store_true", help="decode one token per pass (same output, slower)")
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--no-compile", action="store_true", help="keep the elementwise kernels eager (compiling needs Triton)")
    p.add_argument("--demo", action="store_true",
                   help="run the embedded tiny random Phi-3 on the CPU instead of --model (answers are nonsense)")
    return p.parse_args(argv)


class Results:
    """The results of a run. --out is written once, at the end, atomically and in dataset order; until then each
    result is appended to the journal OUT.partial as it finishes (one flushed line), so a crash keeps every finished
    result and the previous --out stays as it was."""

    def __init__(self, out: Path, resume: bool, total: int):
        self.out, self.journal = out, out.with_name(out.name + ".partial")
        self.done: dict[int, list] = {}
        if not out.parent.is_dir():
            raise DataError(out, None, f"cannot be written: the folder {out.parent} does not exist")
        if resume:
            for path in (out, self.journal):
                if path.is_file():
                    done, note = read_results(path, total)
                    self.done.update(done)
                    if note:
                        print(note, file=sys.stderr)
        elif self.journal.is_file() and self.journal.stat().st_size:
            raise DataError(self.journal, None, "holds the results of an interrupted run: pass --resume to keep "
                                                "them, or delete the file to start afresh")
        self.resumed = len(self.done)
        try:  # the journal restarts with exactly the results kept (a cut last line is dropped)
            self.sink = open(self.journal, "w", encoding="utf-8")
            self.sink.writelines(self._line(i, o) for i, o in sorted(self.done.items()))
            self.sink.flush()
        except OSError as e:
            raise DataError(self.journal, None, f"cannot be written ({e.strerror})") from None

    @staticmethod
    def _line(index: int, output: list) -> str:
        return json.dumps({"index": index, "output": output}, ensure_ascii=False) + "\n"

    def add(self, index: int, output: list) -> None:
        self.sink.write(self._line(index, output))
        self.sink.flush()
        self.done[index] = output

    def finish(self) -> None:
        """--out replaced by every result, in dataset order; the journal is then no longer needed."""
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text("".join(self._line(i, o) for i, o in sorted(self.done.items())), encoding="utf-8")
        tmp.replace(self.out)
        self.sink.close()
        self.journal.unlink()

    def saved(self) -> str:
        kept = len(self.done)
        return f"{kept} results are kept in {self.journal}; --resume runs the rest" if kept else "no result was lost"


def run(args, results: Results, data_path: Path, records: list[dict], lines: list[int], todo: list[int],
        prepare) -> int:
    model_dir, device = args.model, args.device
    if args.demo:
        from orinfer.tiny import demo_model_dir
        model_dir, device = demo_model_dir(), args.device or "cpu"

    # Section 1: set-up (untimed). Everything is checked before the weights load: options, device, memory plan,
    # and that every prompt fits the KV cache the plan leaves.
    options = optimize.Options(speculate=not args.no_speculation, cuda_graphs=not args.no_cuda_graphs,
                               compile=False if args.no_compile else None)
    setup = prepare(model_dir, device=device, dtype=args.dtype, memory_budget=args.memory_budget, options=options)
    lengths = [len(p) for p in optimize.prompt_ids(setup.tokenizer, [records[i]["message"] for i in todo])]
    for i, n in zip(todo, lengths):
        if n + 1 > setup.plan.kv_tokens:
            raise DataError(data_path, lines[i], f"the prompt's {n} tokens do not fit the KV cache, "
                                                 f"{setup.plan.kv_tokens} tokens at this memory budget: raise "
                                                 "--memory-budget")
    print(setup.plan.describe(), file=sys.stderr)
    gen = setup.load()
    print(gen.describe(), file=sys.stderr)
    generation_args = {"max_new_tokens": args.max_new_tokens, "return_full_text": False, "temperature": 0.0,
                       "do_sample": False}

    # Section 2: warm-up (untimed) — kernels, allocator pools, CUDA graphs.
    gen.warmup()

    # Section 3: timed — data load + inference.
    failures: dict[int, str] = {}
    start = time.time()
    data = read_records(data_path)[0]
    gen([data[i]["message"] for i in todo], on_result=lambda j, out: results.add(todo[j], out),
        on_error=lambda j, why: failures.__setitem__(todo[j], why), **generation_args)
    outs = [results.done.get(i) for i in range(len(data))]
    end = time.time()

    # Section 4: untimed — accuracy, scored as the organisers score it.
    correct = 0
    for i, out in enumerate(outs):
        if out is None:
            continue
        answer = out[0]["generated_text"].lstrip().replace("\n", "")
        if answer == data[i].get("answer"):
            correct += 1
    results.finish()
    print("===== Perf result =====")
    print("Elapsed_time: ", end - start)
    print(f"Correctness: {correct}/{len(data)}")
    if results.resumed:
        print(f"({results.resumed} records were resumed from {results.out}; Elapsed_time covers the other {len(todo)})")
    for i, why in sorted(failures.items()):
        print(f"{data_path}:{lines[i]}: no result: {why}", file=sys.stderr)
    if failures:
        print(f"{len(failures)} records have no result (scored as wrong; {results.out} holds the others): fix the "
              "cause above and run again with --resume", file=sys.stderr)
        return 1
    return 0


def main(argv=None, prepare=optimize.prepare) -> int:
    """The whole run; what goes wrong is one line on stderr and an exit code, never a traceback: 2 for a bad input
    or option (nothing was run), 1 for records left without a result or a fault inside, 130 for an interrupt.
    `prepare` makes the set-up (tests hand in one that changes the plan or the generator)."""
    args = parse_args(argv)
    results = None
    try:
        data_path = Path(args.data)
        data, lines = read_records(data_path)
        results = Results(Path(args.out), args.resume, len(data))
        todo = [i for i in range(len(data)) if i not in results.done]
        if not todo:
            results.finish()
            print(f"every record of {data_path} already has its result in {results.out}: nothing to run",
                  file=sys.stderr)
            return 0
        return run(args, results, data_path, data, lines, todo, prepare)
    except DataError as e:
        print(e, file=sys.stderr)
        return 2
    except optimize.SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: {results.saved() if results else 'nothing had started'}", file=sys.stderr)
        return 130
    except Exception as e:  # a fault inside the engine: the details go to a file, the user gets what was kept
        log = Path(args.out).with_name(Path(args.out).name + ".error.log")
        try:
            log.write_text(traceback.format_exc(), encoding="utf-8")
            where = f"traceback in {log}"
        except OSError:
            where = "no log could be written"
        print(f"error: {type(e).__name__}: {e} ({where}); {results.saved() if results else 'nothing had started'}",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
