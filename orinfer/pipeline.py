"""The pipe()-compatible generator: called, and answering, like transformers' text-generation
pipeline.

Inputs are tokenised as the pipeline tokenises them (the chat template with the generation prompt,
or the plain tokenizer for strings), generated greedily by the engine in one batched run, and turned
into text exactly as the installed transformers' pipeline does it (that step changed in transformers
5: see `_text`). optimize.build makes one; report(), reset() and warmup(steps) are what a benchmark
may use of it besides the call (bench/README.md).
"""

import gc
import os
import time
from contextlib import contextmanager
from typing import Callable

# transformers 4.x otherwise imports TensorFlow, or JAX when Flax is installed, on its first
# tensor-type check: host memory for nothing (0.1 GiB seen), which a Jetson's budget would take from
# the KV cache. Only torch is used here.
os.environ.setdefault("USE_TF", "0")
os.environ.setdefault("USE_FLAX", "0")
import transformers  # noqa: E402

from .dataset import parse_choices  # noqa: E402
from .engine import WARMUP_STEPS, Engine, Report  # noqa: E402
from .observe import Observer  # noqa: E402
from .sequence import Sequence  # noqa: E402

# transformers < 5 decodes prompt + answer and cuts the decoded prompt's length; 5.x decodes the new
# tokens alone.
_TRANSFORMERS = tuple(int(x) for x in transformers.__version__.split(".")[:2])
_DECODE_FULL_AND_CUT = _TRANSFORMERS < (5, 0)
# Phi-3's SDPA and eager attention ignore sliding_window before transformers 4.46 (only
# flash-attention applied it). It never matters for Phi-3-medium here (2047 > 868 + 500 tokens), but
# outputs must equal the installed version's.
SLIDING_WINDOW_APPLIES = _TRANSFORMERS >= (4, 46)


# Inputs are tokenised in chunks as the engine asks for them (one tokenizer call each), so that
# tokenising all but the first pass's worth overlaps the device's work on it.
_TOKENIZE_CHUNK = 64


@contextmanager
def _collector_paused(pause: bool):
    """Python's cyclic garbage collector off for one call. A call allocates ~10^5 small objects that
    live until it returns (token lists, block hashes, tokenizer output) and form no reference
    cycles; the collector would rescan them, and on the first call after start-up the ~3*10^5
    objects of torch and transformers too, on the critical path between passes
    (tests/test_optimize.py checks that a call leaves no cyclic garbage)."""
    enabled = gc.isenabled()
    if pause:
        gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _is_chat(x) -> bool:
    return (
        isinstance(x, (list, tuple))
        and len(x) > 0
        and all(isinstance(m, dict) and "role" in m for m in x)
    )


def prompt_ids(tokenizer, items: list) -> list[list[int]]:
    """Prompt token ids of checked inputs, as the pipeline's preprocessing makes them."""
    ids = [None] * len(items)
    chats = [i for i, item in enumerate(items) if not isinstance(item, str)]
    strings = [i for i, item in enumerate(items) if isinstance(item, str)]
    # The chat template's text, tokenised without extra special tokens, is what
    # apply_chat_template(tokenize=True) gives; plain strings get the tokenizer's defaults, as the
    # pipeline's preprocess does.
    if chats:
        texts = [
            tokenizer.apply_chat_template(
                list(items[i]), tokenize=False, add_generation_prompt=True
            )
            for i in chats
        ]
        for i, row in zip(chats, tokenizer(texts, add_special_tokens=False)["input_ids"]):
            ids[i] = row
    if strings:
        for i, row in zip(strings, tokenizer([items[i] for i in strings])["input_ids"]):
            ids[i] = row
    return ids


class Generator:
    """pipe()-compatible greedy text generation over the orinfer engine."""

    def __init__(self, engine: Engine, tokenizer, progress: bool = True, load_report=None):
        self.engine, self.tokenizer, self.progress = engine, tokenizer, progress
        # loader.LoadReport: how the checkpoint was read (None: weights given)
        self.load_report = load_report

    @property
    def model(self):
        """The engine's model (its parameters are the very tensors a reference model may be built
        on)."""
        return self.engine.model

    @property
    def observer(self) -> Observer | None:
        return self.engine.observer

    def report(self) -> Report:
        return self.engine.report()

    def reset(self) -> None:
        """Forget every cached prompt prefix and zero the counters: a later call reuses nothing of
        an earlier one."""
        self.engine.reset()

    def release(self) -> None:
        """Give back the KV pool and the CUDA graphs; the model stays (the self-check builds
        transformers' model on its tensors). The generator cannot run after this."""
        self.engine.release()

    def describe(self) -> str:
        return self.engine.describe()

    def warmup(self, steps: tuple[str, ...] = WARMUP_STEPS + ("chat",)) -> None:
        """Untimed preparation before the clock: the engine's steps (engine.WARMUP_STEPS), then
        "chat": one short chat through this generator (tokenizer and detokenizer paths). A step
        asked for again runs again, except the graphs' capture, done once. The prefix cache is left
        empty: nothing of the warm-up reaches the timed run."""
        try:
            self.engine.warmup(tuple(s for s in steps if s != "chat"))
            if "chat" in steps:
                self(
                    [
                        {
                            "role": "user",
                            "content": "Can you provide ways to eat combinations of bananas and "
                            "dragonfruits?",
                        }
                    ],
                    max_new_tokens=8,
                    progress=False,
                )
        except Exception as e:
            compiling = type(e).__module__.startswith(("torch._dynamo", "torch._inductor"))
            if not (self.engine.model.kernels.fused and compiling):
                raise
            # torch.compile fails on the first call, here (e.g. no C compiler for Triton's
            # launcher): say the way out.
            raise RuntimeError(
                f"warm-up failed while compiling the fused kernels ({type(e).__name__}: {e}); "
                "build with Options(compile=False) (test_script.py --no-compile)"
            ) from e
        self.engine.reset_prefix_cache()
        # What exists now (torch, transformers, the model, compiled kernels: ~3*10^5 objects) lives
        # until exit: the cyclic collector stops rescanning it, which it otherwise does in the timed
        # data load after a call.
        gc.collect()
        gc.freeze()

    def __call__(
        self,
        inputs,
        max_new_tokens: int | None = None,
        return_full_text: bool = True,
        do_sample: bool = False,
        temperature: float | None = None,
        batch_size: int | None = None,
        on_result: Callable[[int, list], None] | None = None,
        on_error: Callable[[int, str], None] | None = None,
        progress: bool | None = None,
        **unsupported,
    ):
        """Same call and same output nesting as pipeline("text-generation"). `batch_size` is
        accepted and ignored (the engine batches by memory). `on_result(i, output)` is called as
        each input finishes. An input the engine cannot finish (its tokens outgrow the KV cache, its
        text does not tokenise) does not stop the others: `on_error(i, why)` is called for it as it
        fails, and once every other input has finished the call raises RecordError, which holds the
        finished outputs: the call never returns None in place of an output."""
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

        outputs = self._generate(
            items,
            max_new_tokens,
            return_full_text,
            on_result,
            failed,
            self.progress if progress is None else progress,
        )
        if failures:
            raise RecordError(failures, {i: o for i, o in enumerate(outputs) if i not in failures})
        return outputs[0] if single else outputs

    @staticmethod
    def _check(items: list) -> None:
        """Every input is a string or a chat ending with a user turn (before any work starts)."""
        for i, item in enumerate(items):
            if _is_chat(item):
                if item[-1]["role"] != "user":
                    raise ValueError(
                        f"record {i}: a chat must end with a user turn (assistant prefill is not "
                        "supported)"
                    )
            elif not isinstance(item, str):
                raise TypeError(
                    f"record {i}: expected a string or a chat (list of role/content dicts), got "
                    f"{type(item).__name__}"
                )

    def _candidates(self, items: list) -> list[list[list[int]]]:
        """Token ids of each input's listed choices (drafts only; one tokenizer call). No <|end|>
        after them: the pass that verifies a whole choice samples the token after it anyway, and
        feeding <|end|> would compute a position nothing reads."""
        if not (self.engine.options.speculate and "choices" in self.engine.options.draft_sources):
            return [[] for _ in items]
        choices = [
            parse_choices(item if isinstance(item, str) else item[-1]["content"]) for item in items
        ]
        flat = [c for cs in choices for c in cs]
        rows = iter(self.tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else [])
        return [[row for row in (next(rows) for _ in cs) if row] for cs in choices]

    def _text(self, prompt_ids: list[int], generated: list[int]) -> str:
        tok = self.tokenizer
        if _DECODE_FULL_AND_CUT:
            full = tok.decode(
                prompt_ids + generated, skip_special_tokens=True, clean_up_tokenization_spaces=True
            )
            return full[
                len(
                    tok.decode(
                        prompt_ids, skip_special_tokens=True, clean_up_tokenization_spaces=True
                    )
                ) :
            ]
        return tok.decode(generated, skip_special_tokens=True)

    def _output(
        self, item, prompt_ids: list[int], generated: list[int], return_full_text: bool
    ) -> list:
        text = self._text(prompt_ids, generated)
        if return_full_text:
            text = (
                item + text
                if isinstance(item, str)
                else list(item) + [{"role": "assistant", "content": text}]
            )
        return [{"generated_text": text}]

    def _tokenized(self, items: list, first: int, on_error: Callable[[int, str], None]) -> list:
        """(prompt ids, candidates) of each input, None for one that fails to tokenise (reported,
        not raised). One tokenizer call per chunk; only a failing chunk is tokenised again input by
        input, to find the culprit."""
        try:
            return list(zip(prompt_ids(self.tokenizer, items), self._candidates(items)))
        except Exception as e:
            if len(items) == 1:
                on_error(first, f"the input could not be tokenised ({type(e).__name__}: {e})")
                return [None]
        return [
            row
            for i, item in enumerate(items, first)
            for row in self._tokenized([item], i, on_error)
        ]

    def _generate(
        self, items, max_new_tokens, return_full_text, on_result, on_error, progress
    ) -> list:
        t0 = time.perf_counter()
        self._check(items)
        prompts: list = [None] * len(items)
        outputs: list = [None] * len(items)
        spent = {"tokenize": 0.0, "detokenize": 0.0}

        def requests():
            """Tokenised a chunk at a time, as the engine draws them: most of it overlaps the first
            pass."""
            for first in range(0, len(items), _TOKENIZE_CHUNK):
                t = time.perf_counter()
                chunk = items[first : first + _TOKENIZE_CHUNK]
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
                                         max_new_tokens=max_new_tokens, candidates=c))  # fmt: skip
                spent["tokenize"] += time.perf_counter() - t
                yield from seqs

        def finish(seq: Sequence) -> None:
            t = time.perf_counter()
            if seq.error is not None:
                on_error(seq.index, seq.error)
            else:
                try:
                    outputs[seq.index] = self._output(
                        items[seq.index], prompts[seq.index], seq.generated, return_full_text
                    )
                except Exception as e:
                    on_error(
                        seq.index,
                        f"its {seq.num_generated} new tokens could not be turned into text "
                        f"({type(e).__name__}: {e})",
                    )
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
            engine = time.perf_counter() - t0 - spent["tokenize"] - spent["detokenize"]
            observer.phases.update(engine=engine, **spent)
        return outputs


class RecordError(RuntimeError):
    """Some inputs of a call could not be finished (the others were): `failures` maps input index ->
    why, and `outputs` input index -> output for the others."""

    def __init__(self, failures: dict[int, str], outputs: dict[int, list] | None = None):
        self.failures, self.outputs = failures, outputs or {}
        super().__init__("; ".join(f"input {i}: {why}" for i, why in sorted(failures.items())))
