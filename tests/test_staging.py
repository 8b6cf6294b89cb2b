"""orinfer/staging.py: every copy up through reused pinned buffers (the GPU half runs where CUDA is)."""

import pytest
import torch

from orinfer.staging import Staging, pinned, writable


@pytest.mark.unit
def test_a_host_tensor_is_written_through_its_memoryview():
    buffer = torch.zeros(16, dtype=torch.uint8)
    view = writable(buffer[4:])
    view[:3] = b"abc"
    assert len(view) == 12 and bytes(buffer[4:7].tolist()) == b"abc" and buffer[:4].sum() == 0


@pytest.mark.unit
def test_on_the_cpu_each_send_fills_a_fresh_buffer():
    staging = Staging(torch.device("cpu"))
    first = staging.send(8, lambda b: b.view(torch.int64).fill_(7))
    second = staging.send(8, lambda b: b.view(torch.int64).fill_(9))
    assert first.view(torch.int64).item() == 7 and second.view(torch.int64).item() == 9


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_buffer_is_reused_once_its_copy_is_done_and_grows_to_the_largest():
    staging = Staging(torch.device("cuda"))
    ups = [staging.send(n, lambda b: b.fill_(n % 251)) for n in (100, 3 << 20)]
    torch.cuda.synchronize()
    assert [int(u[0]) for u in ups] == [100, (3 << 20) % 251]
    held = [b for b, _ in staging._buffers]
    assert all(b.is_pinned() for b in held) and [b.numel() for b in held] == [2 << 20, 4 << 20]
    again = staging.send(1 << 20, lambda b: b.fill_(5))  # both free: no new buffer
    torch.cuda.synchronize()
    assert int(again[-1]) == 5 and len(staging._buffers) == 2
    assert pinned(3).numel() == (2 << 20) // 8
