"""Competition submission runner: Phi-3-medium-4k-instruct over the organisers' dataset, in the
organisers' four sections.

    python test_script.py               # ./models/Phi-3-medium-4k-instruct, on the GPU
    python test_script.py --demo        # the embedded tiny random Phi-3, on the CPU, in seconds
    python test_script.py --self-check  # first, on a new board: device, plan and outputs checked

Before the model loads, every path, the data file and every option are checked: a problem is one
line on stderr naming the file and line, and exit code 2. Section 3 (timed) is data load + inference
and yields `outs` in pipe() form and dataset order; Section 4 (untimed) prints the answers and
scores them exactly as the organisers' script does. Each result is appended to OUT.partial as it
finishes and --out is replaced only at the end, so a run that dies loses nothing: --resume runs only
what is missing.
"""

import argparse
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from orinfer.dataset import DataError, fingerprint, read_dataset, scored_answer
from orinfer.runfiles import (
    Results,
    RunLock,
    beside,
    check_data_path,
    forget_pages,
    results_path,
    run_settings,
)

EXIT_CODES = """exit codes:
  0    every record has its result in --out (--self-check: no check failed)
  1    some record has no result (each is named by its line; the others are in --out), or a
       fault inside the run (one line; its traceback in OUT.error.log, the finished results in
       OUT.partial), or (--self-check) a check failed, one line each
  2    a bad input or option: nothing was run, --out is as it was; one line names the file and
       line, or the option
  130  interrupted (Ctrl-C); 143, 129, 131 terminated (SIGTERM, SIGHUP, SIGQUIT): the results
       finished so far are kept in OUT.partial (--resume runs the rest)"""


MODEL, OUT = "./models/Phi-3-medium-4k-instruct", "outputs.jsonl"
# Signals that end a run as Ctrl-C does: the results so far kept, the lock released, one line.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage block and then the error
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class _Help(argparse.RawDescriptionHelpFormatter):
    # the default where there is one to state (not for switches)
    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS):
            return action.help
        return f"{action.help} (default: {action.default})"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def parse_args(argv=None):
    p = _Parser(
        prog="test_script.py", description=__doc__, epilog=EXIT_CODES, formatter_class=_Help
    )
    _run_options(p)
    _engine_options(p)
    _check_options(p)
    args = p.parse_args(argv)
    if args.self_check and (args.out is not None or args.resume):
        option = "--out" if args.out is not None else "--resume"
        p.error(f"argument {option}: --self-check writes no results")
    if args.demo and args.model is not None:
        p.error("argument --model: --demo runs the embedded tiny model; pass one or the other")
    return args


def _run_options(p: argparse.ArgumentParser) -> None:
    """What the run reads and writes."""
    p.add_argument("--model", help=f"local HF folder of the model (default: {MODEL})")
    p.add_argument(
        "--data",
        default="./data/test_dataset.jsonl",
        help="records {'message': [...], 'answer': ...}: JSON lines, or one JSON array of them",
    )
    p.add_argument(
        "--out",
        help=f"results, one JSON line per record, in dataset order (default: {OUT}); "
        "a link to a file is written through",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the results already in --out and OUT.partial (of this data and these "
        "settings only) and run only the other records; its Elapsed_time is not a timing of the "
        "whole data set",
    )
    p.add_argument(
        "--max-new-tokens", type=_positive_int, default=500, help="as in the organisers' script"
    )
    p.add_argument(
        "--demo",
        action="store_true",
        help="run the embedded tiny random Phi-3 on the CPU instead of --model "
        "(answers are nonsense)",
    )


def _engine_options(p: argparse.ArgumentParser) -> None:
    """How the engine runs: each leaves the output the same at float32."""
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="auto keeps the checkpoint's dtype (bf16), as the organisers' torch_dtype='auto' does",
    )
    p.add_argument(
        "--memory-budget",
        default="auto",
        help="bytes the process may use, host and device together (e.g. 28.5GiB); auto reads "
        "MemAvailable on an integrated GPU (Jetson) and free memory on a discrete one",
    )
    p.add_argument(
        "--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)"
    )
    p.add_argument(
        "--no-speculation",
        action="store_true",
        help="decode one token per pass (slower; the same output at float32, in bf16 other "
        "kernel shapes can tip near-ties)",
    )
    p.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        help="launch every pass eagerly (the same output at float32)",
    )
    p.add_argument(
        "--no-compile",
        action="store_true",
        help="keep the elementwise kernels eager (compiling needs Triton; the same output at "
        "float32)",
    )
    p.add_argument(
        "--no-cuda-extension",
        action="store_true",
        help="do not build or use orinfer's CUDA kernels where torch.compile is not taken (the "
        "same output at float32)",
    )
    p.add_argument(
        "--attention",
        default=None,
        metavar="BACKEND",
        help="the attention backend (orinfer/attention: varlen, paged, padded, reference; default: "
        "the first of varlen, paged, padded that runs here and the memory plan affords; the same "
        "output at float32)",
    )


def _check_options(p: argparse.ArgumentParser) -> None:
    """--self-check and what it compares."""
    p.add_argument(
        "--self-check",
        action="store_true",
        help="check the device, the memory plan, the kernels and the outputs against "
        "transformers on the same weights, and estimate Section 3's time; untimed, writes no "
        "--out (docs/JETSON.md)",
    )
    p.add_argument(
        "--check-records",
        type=_positive_int,
        default=8,
        metavar="K",
        help="--self-check: records compared with transformers (the longest, and others spread "
        "over --data)",
    )
    p.add_argument(
        "--check-tokens",
        type=_positive_int,
        default=24,
        metavar="T",
        help="--self-check: new tokens compared in each record (transformers at batch 1: a pass "
        "a token)",
    )


class Refused(Exception):
    """The run cannot start (exit 2): its one line is the message."""


class Stopped(BaseException):
    """A signal that ends the run as Ctrl-C does: SIGINT (exit 130), SIGTERM (143), SIGHUP (129),
    SIGQUIT (131)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        name = signal.Signals(signum).name
        self.code = 128 + signum
        self.word = {"SIGINT": "interrupted", "SIGTERM": "terminated"}.get(
            name, f"terminated by {name}"
        )


@contextmanager
def _signals_stop_the_run():
    """STOP_SIGNALS end the run through Stopped, once: a second one while the first is handled (the
    journal being closed, the message written), or one while an error is reported (after
    `settle()`), is ignored rather than break the handling with a traceback."""
    stopping = []

    def handler(signum, frame):
        if not stopping:
            stopping.append(signum)
            raise Stopped(signum)

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield lambda: stopping.append(None)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _model_dir(args) -> tuple[str | Path, str | None]:
    if args.demo:
        from orinfer.tiny import demo_model_dir

        try:
            return demo_model_dir(), args.device or "cpu"
        except OSError as e:
            raise Refused(
                f"error: the demo model cannot be built in {e.filename or 'the cache folder'} "
                f"({e.strerror}): set XDG_CACHE_HOME to a folder you can write"
            ) from None
    return args.model or MODEL, args.device


def _prepare(args, prepare, model_dir, device):
    """optimize.prepare (or the tests' `prepare`) with this run's options: the set-up, before any
    weight loads."""
    import optimize

    options = optimize.Options(
        speculate=not args.no_speculation,
        cuda_graphs=not args.no_cuda_graphs,
        compile=False if args.no_compile else None,
        cuda_extension=False if args.no_cuda_extension else None,
        attention=args.attention,
    )
    return (prepare or optimize.prepare)(
        model_dir,
        device=device,
        dtype=args.dtype,
        memory_budget=args.memory_budget,
        options=options,
    )


def self_check(args, prepare, model_dir, device, records: list, lines: list) -> int:
    """--self-check (orinfer/selfcheck.py) on this data file with this run's options: untimed, no
    --out. A record that does not fit the KV cache is its memory check's failure, not a refusal."""
    import optimize
    from orinfer import selfcheck

    chats = [r["message"] for r in records]
    try:
        setup = _prepare(args, prepare, model_dir, device)
        lengths = setup.prompt_lengths(chats)
    except optimize.InputError as e:
        raise DataError(Path(args.data), lines[e.index], str(e)) from None
    except optimize.SetupError as e:
        raise Refused(f"error: {e}") from None
    refused = None
    try:
        setup = setup.sized_for(lengths, args.max_new_tokens)
    except optimize.InputError as e:  # the unsized plan: the check of the longest record reports it
        refused = f"line {lines[e.index]}: {e}"
    checks = selfcheck.Checks(sys.stdout)
    try:
        selfcheck.run(
            setup,
            chats,
            lines,
            args.max_new_tokens,
            args.memory_budget,
            args.check_records,
            args.check_tokens,
            refused,
            checks,
        )
    # the lines so far are out; this one says where it stopped (the traceback: _fault)
    except Exception as e:
        print(
            f"[FAIL] self-check stopped during {checks.step}: {type(e).__name__}: {str(e)[:300]}",
            flush=True,
        )
        raise
    return selfcheck.report(checks, sys.stdout)


def set_up(
    args, prepare, model_dir, device, data_path: Path, records: list, lines: list, todo: list
):
    """Section 1 (untimed): options, device, memory plan, and every prompt with its answer's room
    checked against the KV cache the plan leaves (the pool then sized to this run), all before the
    weights load; then the load."""
    # here, not above: --help and a bad input answer without loading torch and transformers
    import optimize

    try:
        setup = _prepare(args, prepare, model_dir, device)
        lengths = setup.prompt_lengths([records[i]["message"] for i in todo])
        setup = setup.sized_for(lengths, args.max_new_tokens)
    except optimize.InputError as e:
        raise DataError(data_path, lines[todo[e.index]], str(e)) from None
    except optimize.SetupError as e:
        raise Refused(f"error: {e}") from None
    machine = setup.describe_machine()
    if machine:
        print(machine, file=sys.stderr)
    print(setup.plan.describe(), file=sys.stderr)
    gen = setup.load()
    if gen.load_report is not None:
        print(gen.load_report.describe(), file=sys.stderr)
    print(gen.describe(), file=sys.stderr)
    return gen


def report(outs: dict, data: list, elapsed: float, results: Results, ran: int) -> None:
    """Section 4 (untimed), as the organisers' script prints it: every answer, then the time and the
    score. `outs`: record index -> its output; a record without one (named on stderr) is printed as
    such and scored as wrong."""
    print("===== Answers =====")
    correct = 0
    for i in range(len(data)):
        out = outs.get(i)
        answer = scored_answer(out[0]["generated_text"]) if out is not None else None
        correct += answer is not None and answer == data[i].get("answer")
        print(answer if answer is not None else "(no result)")
    print("===== Perf result =====")
    if results.resumed:  # its time covers some records only: not the line a timing run prints
        print(
            f"Elapsed_time (a resumed run, not a timing: {ran} of {len(data)} records ran in it): "
            f"{elapsed}"
        )
    else:
        print("Elapsed_time: ", elapsed)
    print(f"Correctness: {correct}/{len(data)}")
    unscored = sum("answer" not in record for record in data)
    if unscored:
        print(
            f"({unscored} of the {len(data)} records have no 'answer' to score against: counted as "
            "not correct)"
        )


def run(
    args, prepare, model_dir, device, results: Results, checked, data_path: Path, todo: list
) -> int:
    """Sections 1-4 on the records `todo` of the data file as `checked` (read_dataset) before the
    model loads. Of that read only the file's identity goes on past Section 1: Section 3 reads the
    file again, as the organisers' script does, and takes its records, their lines and the records
    to run from that read."""
    from optimize import RecordError

    gen = set_up(args, prepare, model_dir, device, data_path, checked.records, checked.lines, todo)
    identity = checked.identity
    del checked, todo
    generation_args = {"max_new_tokens": args.max_new_tokens, "return_full_text": False,
                       "temperature": 0.0, "do_sample": False}  # fmt: skip

    # Section 2: warm-up (untimed): kernels, allocator pools, CUDA graphs; the prefix cache is
    # emptied after it.
    gen.warmup()
    results.begin()
    # Section 3 reads the file from the disk, not from the check's page cache
    forget_pages(data_path)

    # Section 3: timed — data load + inference.
    failures: dict[int, str] = {}
    start = time.time()
    dataset = read_dataset(data_path)
    if dataset.identity != identity:
        raise DataError(
            data_path,
            None,
            "changed since it was checked before the model loaded: nothing was run; run again "
            "once the file is final",
        )
    data, lines = dataset.records, dataset.lines
    todo = [i for i in range(len(data)) if i not in results.done]
    try:
        gen(
            [data[i]["message"] for i in todo],
            on_result=lambda j, out: results.add(todo[j], out, data[todo[j]]),
            on_error=lambda j, why: failures.__setitem__(todo[j], why),
            **generation_args,
        )
    except RecordError:  # the records named in `failures`; every other result is in `results`
        pass
    outs = dict(results.done)
    end = time.time()

    # Section 4: untimed — the answers and the accuracy, scored as the organisers score them.
    results.finish()
    report(outs, data, end - start, results, len(todo))
    return _no_results(failures, data_path, lines, results)


def _no_results(failures: dict[int, str], data_path: Path, lines: list[int], results) -> int:
    """Each record without a result, named by its line on stderr; the exit code (1 if any)."""
    for i, why in sorted(failures.items()):
        print(f"{data_path}:{lines[i]}: no result: {why}", file=sys.stderr)
    if not failures:
        return 0
    print(
        f"{len(failures)} records have no result (scored as wrong; {results.out} holds the "
        "others): fix the cause above and run again with --resume",
        file=sys.stderr,
    )
    return 1


def _start(args, prepare) -> int:
    """Paths, lock, data and kept results checked (in that order, nothing loaded), then the run."""
    data_path = Path(args.data)
    check_data_path(data_path)
    if args.self_check:  # no --out, no lock: it writes nothing
        checked = read_dataset(data_path)
        return self_check(args, prepare, *_model_dir(args), checked.records, checked.lines)
    out = results_path(OUT if args.out is None else args.out, data_path)
    args.out = str(out)  # the file written (a link's target): the error log and messages name it
    lock = RunLock(out)
    note = lock.acquire()
    results = None
    try:
        if note:
            print(note, file=sys.stderr)
        checked = read_dataset(data_path)
        model_dir, device = _model_dir(args)
        results = Results(
            out,
            args.resume,
            [fingerprint(r["message"]) for r in checked.records],
            run_settings(model_dir, args.dtype, args.max_new_tokens),
        )
        todo = [i for i in range(len(checked.records)) if i not in results.done]
        if not todo:
            results.finish()
            print(
                f"every record of {data_path} already has its result in {out}: nothing to run",
                file=sys.stderr,
            )
            return 0
        return run(args, prepare, model_dir, device, results, checked, data_path, todo)
    except (Stopped, KeyboardInterrupt, Exception) as e:
        e.saved = results.saved() if results is not None else "nothing had started"
        raise
    finally:
        try:
            if results is not None:
                results.close()
        finally:
            lock.release()


def main(argv=None, prepare=None) -> int:
    """The whole run; what goes wrong is one line on stderr and an exit code, never a traceback
    (EXIT_CODES). `prepare` makes the set-up (default optimize.prepare; tests hand in one that
    changes the plan or the generator)."""
    # an ASCII or Latin-1 terminal still gets the whole report
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = parse_args(argv)
    with _signals_stop_the_run() as settle:
        try:
            return _start(args, prepare)
        except (DataError, Refused) as e:
            settle()
            print(e, file=sys.stderr)
            return 2
        except (Stopped, KeyboardInterrupt) as e:
            settle()
            word, code = (e.word, e.code) if isinstance(e, Stopped) else ("interrupted", 130)
            print(f"{word}: {getattr(e, 'saved', 'nothing had started')}", file=sys.stderr)
            return code
        # a fault inside the engine: the details go to a file, the user gets what was kept
        except Exception as e:
            settle()
            return _fault(e, args)


def _fault(e: Exception, args) -> int:
    import errno
    import os
    import tempfile
    import traceback

    saved = getattr(e, "saved", "nothing had started")
    # stdout closed early (`| head`): no report to print, and none at exit either
    if isinstance(e, BrokenPipeError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        print(
            f"error: no space left on the disk ({e.filename or e.strerror}): {saved}; free some "
            "space, then run again with --resume",
            file=sys.stderr,
        )
        return 1
    if "torch" in sys.modules:  # only an engine that ran can have run out of memory
        from orinfer.memory import is_out_of_memory

        if is_out_of_memory(e):
            e = RuntimeError(
                "the device ran out of memory outside the engine's passes (the load or the "
                f"warm-up; {type(e).__name__}: {str(e).splitlines()[0][:160]}): this board gives "
                "less than the plan's budget: run --self-check, or pass a lower --memory-budget"
            )
    # The self-check writes nothing beside the user's files: its log goes to the temporary folder.
    log = (
        Path(tempfile.gettempdir()) / f"orinfer-self-check-{os.getpid()}.error.log"
        if args.self_check
        else beside(Path(args.out), ".error.log")
    )
    try:
        log.write_text(traceback.format_exc(), encoding="utf-8")
        where = f"traceback in {log}"
    except OSError:
        log.unlink(missing_ok=True)
        where = "no log could be written"
    print(f"error: {type(e).__name__}: {e} ({where}); {saved}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
