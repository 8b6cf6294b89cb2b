"""What benchmarks and tests see of a run, through one Observer given to optimize.build() (none by
default: then nothing is recorded). It sees each pass, each finished request's tokens and the host's
phases; it has no say in them: every committed token is the model's argmax."""

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class PassRecord:
    tokens: int  # tokens fed to the model
    # the request (input index) of each sequence in the pass, in the pass's order
    requests: tuple[int, ...]
    build_s: float  # host seconds building the pass's inputs
    # from the launch until its tokens were on the host (host work meanwhile included)
    wait_s: float
    graph: bool  # a CUDA graph was replayed
    started: float  # time.perf_counter() when its launch began
    # CUDA: its start and end on the device's clock (s since the first launch)
    device: tuple[float, float] | None


class Observer:
    """Keeps the last `keep` passes and, per call, the generated tokens of each request and the
    host's phases."""

    def __init__(self, keep: int = 100_000):
        self.passes: deque[PassRecord] = deque(maxlen=keep)
        self.generated: dict[int, list[int]] = {}  # request -> its generated tokens, this call
        # host seconds of this call: tokenize, detokenize, engine
        self.phases: dict[str, float] = {}

    def start_call(self) -> None:
        self.generated, self.phases = {}, {}

    def on_pass(self, record: PassRecord) -> None:
        self.passes.append(record)

    def on_finished(self, request: int, generated: list[int]) -> None:
        self.generated[request] = list(generated)

    def passes_per_request(self, since: int = 0) -> dict[int, int]:
        """How many of the passes recorded from index `since` each request took part in."""
        counts: dict[int, int] = {}
        for record in list(self.passes)[since:]:
            for request in record.requests:
                counts[request] = counts.get(request, 0) + 1
        return counts
