"""Pinned host buffers for copies to a CUDA device, reused once their last copy is done. A copy from
pageable memory makes torch wait for everything queued on the stream before it returns (the pass in
flight, when the next is being launched), and a pinned allocation can stall the host: so every copy
up goes through one of a few page-locked buffers, without waiting. The pass's integers
(pass_inputs.py) and the token table's rows read on the host (loader.FileRows) go up this way.
"""

import ctypes
from typing import Callable

import torch

from .integers import power_of_two


def pinned(n: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """A pinned host buffer of >= n elements: a power of two, and at least 2 MiB (a competition
    run's largest pass needs ~0.6 MiB of integers), so that few sizes are ever allocated."""
    least = (2 << 20) // dtype.itemsize
    return torch.empty(max(least, power_of_two(n)), dtype=dtype, pin_memory=True)


def writable(buffer: torch.Tensor) -> memoryview:
    """A contiguous host tensor's bytes as a writable memoryview (a file can be read into it)."""
    size = buffer.numel() * buffer.element_size()
    return memoryview((ctypes.c_char * size).from_address(buffer.data_ptr())).cast("B")


class Staging:
    """The buffers of one device's copies up (`send`)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._buffers: list[tuple[torch.Tensor, torch.cuda.Event]] = []

    def send(self, nbytes: int, fill: Callable[[torch.Tensor], None]) -> torch.Tensor:
        """`fill` writes a host uint8 [nbytes] buffer; returns those bytes on the device, their copy
        queued on the current stream. On a CPU device, the buffer itself (a fresh one each call)."""
        if self.device.type != "cuda":
            buffer = torch.empty(nbytes, dtype=torch.uint8)
            fill(buffer)
            return buffer
        free = [
            i
            for i, (buffer, copied) in enumerate(self._buffers)
            if buffer.numel() >= nbytes and copied.query()
        ]
        if not free:
            # as large as the largest held: the buffers converge on the largest copy's size, as
            # many as copies are ever in flight at once (the memory plan books two)
            largest = max((buffer.numel() for buffer, _ in self._buffers), default=0)
            self._buffers.append((pinned(max(nbytes, largest), torch.uint8), torch.cuda.Event()))
            free = [len(self._buffers) - 1]
        buffer, copied = self._buffers[free[0]]
        fill(buffer[:nbytes])
        on_device = buffer[:nbytes].to(self.device, non_blocking=True)
        copied.record()
        return on_device
