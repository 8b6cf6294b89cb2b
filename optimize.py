"""Build the optimised Phi-3 and a generator that is called, and answers, like transformers' text-generation pipeline.

    gen = optimize.build("./models/Phi-3-medium-4k-instruct")
    gen.warmup()
    outs = gen(KeyDataset(data, "message"), max_new_tokens=500, return_full_text=False, do_sample=False)

Inputs are tokenised as the pipeline tokenises them (the chat template with the generation prompt, or the plain
tokenizer for strings), generated greedily by the orinfer engine in one batched run, and turned into text exactly as
the installed transformers' pipeline does it (that step changed in transformers 5: see `_text`).
"""
import gc
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

# transformers 4.x otherwise imports TensorFlow, or JAX when Flax is installed, on its first tensor-type check: host
# memory for nothing (0.1 GiB seen), which a Jetson's budget would take from the KV cache. Only torch is used here.
os.environ.setdefault("USE_TF", "0")
os.environ.setdefault("USE_FLAX", "0")
import transformers  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from orinfer import kernels  # noqa: E402
from orinfer.config import Phi3Config, eos_token_ids  # noqa: E402
from orinfer.dataset import parse_choices  # noqa: E402
from orinfer.engine import Engine  # noqa: E402
from orinfer.loader import load_weights, serve_from_file, tensor_dtype  # noqa: E402
from orinfer.memory import (GiB, MIN_KV_TOKENS, BudgetTooSmall, MemoryPlan, is_integrated, machine_bytes,  # noqa: E402
                            parse_budget, plan_memory, rss_bytes)
from orinfer.model import Phi3ForCausalLM  # noqa: E402
from orinfer.observe import Observer  # noqa: E402
from orinfer.options import Options  # noqa: E402
from orinfer.sequence import Sequence  # noqa: E402

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# transformers < 5 decodes prompt + answer and cuts the decoded prompt's length; 5.x decodes the new tokens alone.
_TRANSFORMERS = tuple(int(x) for x in transformers.__version__.split(".")[:2])
_DECODE_FULL_AND_CUT = _TRANSFORMERS < (5, 0)
# Phi-3's SDPA and eager attention ignore sliding_window before transformers 4.46 (only flash-attention applied it).
# It never matters for Phi-3-medium here (2047 > 868 + 500 tokens), but outputs must equal the installed version's.
SLIDING_WINDOW_APPLIES = _TRANSFORMERS >= (4, 46)


# Inputs are tokenised in chunks as the engine asks for them (one tokenizer call each), so that tokenising all but
# the first pass's worth overlaps the device's work on it.
_TOKENIZE_CHUNK = 64


@contextmanager
def _collector_paused(pause: bool):
    """Python's cyclic garbage collector off for one call. A call allocates ~10^5 small objects that live until it
    returns (token lists, block hashes, tokenizer output) and form no reference cycles; the collector would rescan
    them, and on the first call after start-up the ~3*10^5 objects of torch and transformers too, on the critical
    path between passes (tests/test_optimize.py checks that a call leaves no cyclic garbage)."""
    enabled = gc.isenabled()
    if pause:
        gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _is_chat(x) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(m, dict) and "role" in m for m in x)


def prompt_ids(tokenizer, items: list) -> list[list[int]]:
    """Prompt token ids of checked inputs, as the pipeline's preprocessing makes them."""
    ids = [None] * len(items)
    chats = [i for i, item in enumerate(items) if not isinstance(item, str)]
    strings = [i for i, item in enumerate(items) if isinstance(item, str)]
    # The chat template's text, tokenised without extra special tokens, is what apply_chat_template(tokenize=True)
    # gives; plain strings get the tokenizer's defaults, as the pipeline's preprocess does.
    if chats:
        texts = [tokenizer.apply_chat_template(list(items[i]), tokenize=False, add_generation_prompt=True)
                 for i in chats]
        for i, row in zip(chats, tokenizer(texts, add_special_tokens=False)["input_ids"]):
            ids[i] = row
    if strings:
        for i, row in zip(strings, tokenizer([items[i] for i in strings])["input_ids"]):
            ids[i] = row
    return ids


class Generator:
    """pipe()-compatible greedy text generation over the orinfer engine."""

    def __init__(self, engine: Engine, tokenizer, progress: bool = True):
        self.engine, self.tokenizer, self.progress = engine, tokenizer, progress

    def describe(self) -> str:
        """The attention layout and kernels this generator runs (one line)."""
        runner = self.engine.runner
        layout = "varlen FlashAttention" + (" + packed Triton kernel" if runner.packed else "") if runner.varlen \
            else "padded SDPA"
        lookup = self.engine.lookup_budget
        return (f"attention: {layout}; elementwise kernels {'compiled' if self.engine.model.kernels.fused else 'eager'}"
                + (f"; lookup drafts while a pass has < {lookup} tokens" if lookup else "; no lookup drafts"))

    def warmup(self) -> None:
        try:
            self.engine.warmup()
            self([{"role": "user", "content": "Can you provide ways to eat combinations of bananas and dragonfruits?"}],
                 max_new_tokens=8, progress=False)
        except Exception as e:
            compiling = type(e).__module__.startswith(("torch._dynamo", "torch._inductor"))
            if not (self.engine.model.kernels.fused and compiling):
                raise
            # torch.compile fails on the first call, here (e.g. no C compiler for Triton's launcher): say the way out.
            raise RuntimeError(f"warm-up failed while compiling the fused kernels ({type(e).__name__}: {e}); "
                               "build with Options(compile=False) (test_script.py --no-compile)") from e
        # Nothing of the warm-up reaches the timed run: its chat's prompt blocks leave the prefix cache.
        self.engine.reset_prefix_cache()
        # What exists now (torch, transformers, the model, compiled kernels: ~3*10^5 objects) lives until exit: the
        # cyclic collector stops rescanning it, which it otherwise does in the timed data load after a call.
        gc.collect()
        gc.freeze()

    def __call__(self, inputs, max_new_tokens: int | None = None, return_full_text: bool = True,
                 do_sample: bool = False, temperature: float | None = None, batch_size: int | None = None,
                 on_result: Callable[[int, list], None] | None = None,
                 on_error: Callable[[int, str], None] | None = None, progress: bool | None = None, **unsupported):
        """Same call and same output nesting as pipeline("text-generation"). `batch_size` is accepted and ignored
        (the engine batches by memory). `on_result(i, output)` is called as each input finishes. An input the
        engine cannot finish (its tokens outgrow the KV cache, its text does not tokenise) does not stop the
        others: `on_error(i, why)` is called for it and its output is None; without `on_error` the call raises
        RecordError once every other input has finished."""
        if do_sample:
            raise ValueError("only greedy decoding is supported (do_sample=True was given)")
        if unsupported:
            raise TypeError(f"unsupported generation arguments: {sorted(unsupported)}")
        if max_new_tokens is None or max_new_tokens < 1:
            raise ValueError("pass max_new_tokens (>= 1): the organisers' script uses 500")
        single = isinstance(inputs, str) or _is_chat(inputs)
        items = [inputs] if single else list(inputs)
        failures: dict[int, str] = {}

        def failed(i: int, why: str) -> None:
            failures[i] = why
            if on_error is not None:
                on_error(i, why)

        outputs = self._generate(items, max_new_tokens, return_full_text, on_result, failed,
                                 self.progress if progress is None else progress)
        if failures and on_error is None:
            raise RecordError(failures)
        return outputs[0] if single else outputs

    @staticmethod
    def _check(items: list) -> None:
        """Every input is a string or a chat ending with a user turn (before any work starts)."""
        for i, item in enumerate(items):
            if _is_chat(item):
                if item[-1]["role"] != "user":
                    raise ValueError(f"record {i}: a chat must end with a user turn (assistant prefill is not supported)")
            elif not isinstance(item, str):
                raise TypeError(f"record {i}: expected a string or a chat (list of role/content dicts), got {type(item).__name__}")

    def _candidates(self, items: list) -> list[list[list[int]]]:
        """Token ids of each input's listed choices (drafts only; one tokenizer call). No <|end|> after them: the
        pass that verifies a whole choice samples the token after it anyway, and feeding <|end|> would compute a
        position nothing reads."""
        if not (self.engine.options.speculate and "choices" in self.engine.options.draft_sources):
            return [[] for _ in items]
        choices = [parse_choices(item if isinstance(item, str) else item[-1]["content"]) for item in items]
        flat = [c for cs in choices for c in cs]
        rows = iter(self.tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else [])
        return [[row for row in (next(rows) for _ in cs) if row] for cs in choices]

    def _text(self, prompt_ids: list[int], generated: list[int]) -> str:
        tok = self.tokenizer
        if _DECODE_FULL_AND_CUT:
            full = tok.decode(prompt_ids + generated, skip_special_tokens=True, clean_up_tokenization_spaces=True)
            return full[len(tok.decode(prompt_ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)):]
        return tok.decode(generated, skip_special_tokens=True)

    def _output(self, item, prompt_ids: list[int], generated: list[int], return_full_text: bool) -> list:
        text = self._text(prompt_ids, generated)
        if return_full_text:
            text = item + text if isinstance(item, str) else list(item) + [{"role": "assistant", "content": text}]
        return [{"generated_text": text}]

    def _tokenized(self, items: list, first: int, on_error: Callable[[int, str], None]) -> list:
        """(prompt ids, candidates) of each input, None for one that fails to tokenise (reported, not raised). One
        tokenizer call per chunk; only a failing chunk is tokenised again input by input, to find the culprit."""
        try:
            return list(zip(prompt_ids(self.tokenizer, items), self._candidates(items)))
        except Exception as e:
            if len(items) == 1:
                on_error(first, f"the input could not be tokenised ({type(e).__name__}: {e})")
                return [None]
        return [row for i, item in enumerate(items, first) for row in self._tokenized([item], i, on_error)]

    def _generate(self, items, max_new_tokens, return_full_text, on_result, on_error, progress) -> list:
        t0 = time.perf_counter()
        self._check(items)
        prompts: list = [None] * len(items)
        outputs: list = [None] * len(items)
        spent = {"tokenize": 0.0, "detokenize": 0.0}

        def requests():
            """Tokenised a chunk at a time, as the engine draws them: most of it overlaps the first pass."""
            for first in range(0, len(items), _TOKENIZE_CHUNK):
                t = time.perf_counter()
                chunk = items[first:first + _TOKENIZE_CHUNK]
                seqs = []
                for i, row in enumerate(self._tokenized(chunk, first, on_error), first):
                    if row is None:
                        continue
                    p, c = row
                    if not p:
                        on_error(i, "the prompt is empty after tokenisation")
                        continue
                    prompts[i] = p
                    seqs.append(Sequence(index=i, token_ids=list(p), num_prompt_tokens=len(p),
                                         max_new_tokens=max_new_tokens, candidates=c))
                spent["tokenize"] += time.perf_counter() - t
                yield from seqs

        def finish(seq: Sequence) -> None:
            t = time.perf_counter()
            if seq.error is not None:
                on_error(seq.index, seq.error)
            else:
                try:
                    outputs[seq.index] = self._output(items[seq.index], prompts[seq.index], seq.generated,
                                                      return_full_text)
                except Exception as e:
                    on_error(seq.index, f"its {seq.num_generated} new tokens could not be turned into text "
                                        f"({type(e).__name__}: {e})")
                else:
                    if on_result is not None:
                        on_result(seq.index, outputs[seq.index])
            spent["detokenize"] += time.perf_counter() - t

        observer = self.engine.observer
        if observer is not None:
            observer.start_call()
        with _collector_paused(self.engine.options.pause_gc):
            self.engine.generate(requests(), on_finish=finish, progress=progress, total=len(items))
        if observer is not None:
            observer.phases.update(tokenize=spent["tokenize"], detokenize=spent["detokenize"],
                                   engine=time.perf_counter() - t0 - spent["tokenize"] - spent["detokenize"])
        return outputs


class RecordError(RuntimeError):
    """Some inputs of a call could not be finished (the others were): `failures` maps input index -> why."""

    def __init__(self, failures: dict[int, str]):
        self.failures = failures
        super().__init__("; ".join(f"input {i}: {why}" for i, why in sorted(failures.items())))


def resolve_dtype(dtype: str, cfg: Phi3Config) -> torch.dtype:
    name = cfg.torch_dtype if dtype == "auto" else dtype
    if name not in _DTYPES:
        raise ValueError(f"dtype {name!r}: choose auto, bfloat16, float16 or float32")
    return _DTYPES[name]


class SetupError(Exception):
    """What is wrong with the model folder, the device or an option, found before any weight is loaded."""


class InputError(ValueError):
    """One input that the run cannot take (found before any weight is loaded): `index` says which."""

    def __init__(self, index: int, what: str):
        super().__init__(what)
        self.index = index


@dataclass(frozen=True)
class Setup:
    """All that build() decides before the weights load: the folder's config and tokenizer, the device, the dtype
    and the memory plan. A caller checks its inputs against it (prompt_lengths, sized_for) before the load."""
    folder: Path
    cfg: Phi3Config
    eos: list[int]
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    plan: MemoryPlan
    options: Options  # its `compile` resolved to True or False
    plan_inputs: dict = field(default_factory=dict)  # plan_memory's arguments besides the budget and the run's needs

    def plan_for(self, budget: int, kv_tokens_wanted: int | None = None) -> MemoryPlan:
        return plan_memory(budget=budget, kv_tokens_wanted=kv_tokens_wanted, **self.plan_inputs)

    def least_budget(self, kv_tokens: int) -> int | None:
        """The smallest budget (to 0.01 GiB) whose plan leaves `kv_tokens` tokens of KV cache; None if none can."""
        def fits(budget: int) -> bool:
            try:
                return self.plan_for(budget).kv_tokens >= kv_tokens
            except MemoryError:
                return False
        step = GiB // 100
        low, high = 0, self.plan_inputs["weights"] + 8 * GiB + 2 * kv_tokens * self.cfg.kv_bytes_per_token
        if not fits(high):
            return None
        while high - low > step:  # low never fits, high does
            mid = (low + high) // 2
            low, high = (low, mid) if fits(mid) else (mid, high)
        return -(-high // step) * step

    def prompt_lengths(self, items: list) -> list[int]:
        """Each input's prompt tokens, counted with a tokenizer instance of its own, thrown away after: a check made
        before the clock fills no cache (the BPE cache of tokenizers < 0.20 has no bound) that the run then uses."""
        tokenizer = AutoTokenizer.from_pretrained(self.folder)
        try:
            return [len(p) for p in prompt_ids(tokenizer, items)]
        except Exception:  # find the input at fault, one at a time
            for i, item in enumerate(items):
                try:
                    prompt_ids(tokenizer, [item])
                except Exception as e:
                    raise InputError(i, f"the prompt cannot be tokenised ({type(e).__name__}: {e})") from None
            raise

    def sized_for(self, lengths: list[int], max_new_tokens: int) -> "Setup":
        """This set-up with its KV pool sized to a run of prompts of these lengths and answers of up to
        max_new_tokens (no larger than what the run can hold at once); an InputError names the longest input when
        the budget's cache cannot hold it whole, with the budget that would."""
        needs = [n + max_new_tokens for n in lengths]
        longest = max(range(len(needs)), key=needs.__getitem__)
        if needs[longest] > self.plan.kv_tokens:
            least = self.least_budget(needs[longest])
            hint = f"pass --memory-budget {least / GiB:.2f}GiB or more" if least else "no budget holds it"
            raise InputError(longest, f"the prompt's {lengths[longest]} tokens and up to {max_new_tokens} new tokens "
                                      f"need {needs[longest]} tokens of KV cache, and the memory budget "
                                      f"({self.plan.budget / GiB:.2f} GiB) leaves {self.plan.kv_tokens}: {hint}, or "
                                      "lower --max-new-tokens")
        at_once = sum(sorted(needs, reverse=True)[:self.plan.max_num_seqs])
        return replace(self, plan=self.plan_for(self.plan.budget, at_once))

    def load(self, init: Callable[[Phi3ForCausalLM], None] | None = None, progress: bool = True,
             observer: Observer | None = None) -> Generator:
        """The weights onto the device (or `init` fills those on the device), and the generator. A token table the
        plan keeps off the device is read from the checkpoint's file either way."""
        if self.device.type == "cuda" and self.plan.device_cap is not None:
            # Fragmentation can grow torch's cache past the plan (0.2-0.3 GiB seen with 512-token passes); capped,
            # the allocator first frees cached blocks, and only then fails (the engine then halves its passes),
            # rather than take memory the host's share needs.
            index = torch.cuda.current_device() if self.device.index is None else self.device.index
            total = torch.cuda.get_device_properties(index).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, self.plan.device_cap / total), index)
        model = Phi3ForCausalLM(self.cfg, self.device, self.dtype,
                                kernels.compiled() if self.options.compile else kernels.EAGER,
                                embedding_on_host=self.plan.embedding_on_host, mlp_rows=self.plan.mlp_rows)
        if init is None:
            load_weights(model, self.folder)
        else:
            init(model)
            serve_from_file(model, self.folder)
        return Generator(Engine(model, self.eos, self.plan, self.options, observer=observer), self.tokenizer, progress)


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise SetupError(f"device {name!r}: expected cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SetupError(f"device {name!r}: this torch ({torch.__version__}) sees no CUDA device")
        if (dev.index or 0) >= torch.cuda.device_count():
            raise SetupError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def prepare(model_dir: str | Path, device: str | None = None, dtype: str = "auto", memory_budget: str | int = "auto",
            options: Options = Options(), unified_memory: bool | None = None) -> Setup:
    """Read a local HF Phi-3 folder's config and tokenizer and plan the memory, loading no weight: any problem with
    the folder, the device or an option is a SetupError (one line) here, before the long part of a start."""
    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise SetupError(f"no model at {folder} (config.json not found). Put the HF folder of "
                         "Phi-3-medium-4k-instruct there, pass --model, or try the embedded tiny model with --demo")
    dev = _device(device)
    if options.compile is None:
        options = replace(options, compile=kernels.compile_available(dev))
    elif options.compile and not (kernels.compile_available(dev) if dev.type == "cuda" else kernels.compile_supported()):
        raise SetupError(f"compile=True needs a torch >= 2.6, with Triton on CUDA (device {dev}, torch "
                         f"{torch.__version__})")
    try:
        cfg = Phi3Config.from_folder(folder)
        if not SLIDING_WINDOW_APPLIES:
            cfg = replace(cfg, sliding_window=None)
        eos = eos_token_ids(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        torch_dtype = resolve_dtype(dtype, cfg)
        itemsize = torch.finfo(torch_dtype).bits // 8
        shared = is_integrated(dev) if unified_memory is None else unified_memory
        budget = parse_budget(memory_budget, dev)
        inputs = dict(cfg=cfg, weights=cfg.num_parameters * itemsize, itemsize=itemsize, shared_host=shared,
                      host_bytes=rss_bytes(), cuda=dev.type == "cuda",
                      table_in_checkpoint=tensor_dtype(folder, "model.embed_tokens.weight") == torch_dtype)
    except (OSError, ValueError, KeyError) as e:
        raise SetupError(f"{folder}: {e}" if isinstance(e, (OSError, KeyError)) else str(e)) from e
    most = machine_bytes(dev, shared)
    if budget > most:
        if memory_budget not in (None, "auto"):
            raise SetupError(f"--memory-budget {budget / GiB:.2f} GiB is more than this machine has "
                             f"({most / GiB:.2f} GiB)")
        budget = most  # RSS + MemAvailable counts a file's mapped pages twice
    setup = Setup(folder, cfg, eos, tokenizer, dev, torch_dtype, None, options, inputs)
    try:
        return replace(setup, plan=setup.plan_for(budget))
    except BudgetTooSmall as e:
        least = setup.least_budget(MIN_KV_TOKENS)
        raise SetupError(f"{e}: at least {least / GiB:.2f} GiB is needed" if least else str(e)) from None


def build(model_dir: str | Path, device: str | None = None, dtype: str = "auto", memory_budget: str | int = "auto",
          options: Options = Options(), progress: bool = True, unified_memory: bool | None = None,
          init: Callable[[Phi3ForCausalLM], None] | None = None, observer: Observer | None = None,
          kv_tokens: int | None = None) -> Generator:
    """Load a local HF Phi-3 folder straight onto the device and return the pipe()-compatible generator
    (prepare, then Setup.load).

    `unified_memory` (default: detected) counts the host process and CUDA context inside the budget, as on a Jetson;
    the benchmark sets it to emulate the Orin on a discrete GPU. `init` fills the weights on the device instead of the
    folder's checkpoint (benchmarks: random weights; the folder then needs only config and tokenizer files, and the
    token table where the plan reads it from the file). `options`: how the engine runs (orinfer/options.py);
    `observer`: what a benchmark or test sees of the run (orinfer/observe.py). `kv_tokens`: the most KV cache the
    caller's inputs can use at once (None: all the budget leaves; test_script.py sizes it with Setup.sized_for)."""
    setup = prepare(model_dir, device, dtype, memory_budget, options, unified_memory)
    if kv_tokens is not None:
        setup = replace(setup, plan=setup.plan_for(setup.plan.budget, kv_tokens))
    return setup.load(init, progress, observer)
