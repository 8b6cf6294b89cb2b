"""The compiled (fused) elementwise kernels give eager's values, and the engine's output stays the pipeline's.

On the CPU torch.compile generates C++ rather than Triton, but the graphs it fuses, and the rounding rules it is
told to follow, are the same ones the GPU path gets.
"""

import pytest
import torch
from conftest import NEW, generator

from orinfer import kernels
from orinfer.options import Options


needs_compile = pytest.mark.skipif(
    not kernels.compile_supported(),
    reason=f"compiled kernels need torch >= 2.6 (this is {torch.__version__})",
)


@pytest.fixture
def compiled():
    return kernels.compiled()


@needs_compile
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernels_equal_eager(compiled, dtype):
    eager = kernels.EAGER
    g = torch.Generator().manual_seed(0)
    for tokens in (
        1,
        7,
        33,
        50,
    ):  # static kernels for 1 and 7, then one with a symbolic token count

        def rand(*shape):
            return torch.randn(*shape, generator=g).to(dtype)

        qkv = rand(tokens, 6 * 64)
        q = qkv[:, :320].view(
            tokens, 5, 64
        )  # query and key heads: a strided view of qkv_proj's output
        cos, sin = rand(tokens, 1, 64), rand(tokens, 1, 64)
        gate, up = rand(tokens, 96), rand(tokens, 96)
        h, w = rand(tokens, 80), rand(80)
        # Elementwise: bit for bit, half-precision roundings included.
        assert torch.equal(eager.rope(q, cos, sin), compiled.rope(q, cos, sin))
        assert torch.equal(
            eager.silu_mul(gate.clone(), up.clone()), compiled.silu_mul(gate, up)
        )  # eager is in place
        # A reduction: the mean's summation order may differ, by float32 ulps before the final rounding.
        tol = {"rtol": 1e-6 if dtype == torch.float32 else 8e-3, "atol": 0}
        a, b = eager.rms_norm(h, w, 1e-5).float(), compiled.rms_norm(h, w, 1e-5).float()
        assert torch.allclose(a, b, **tol)
        delta = rand(tokens, 80)
        (sum_a, a), (sum_b, b) = (
            eager.add_rms_norm(delta, h, w, 1e-5),
            compiled.add_rms_norm(delta, h, w, 1e-5),
        )
        assert torch.equal(sum_a, sum_b) and torch.equal(sum_a, h + delta)
        assert torch.allclose(a.float(), b.float(), **tol)


@needs_compile
def test_compiled_engine_equals_pipeline(tiny_dir, expected, public_chats, longest_chat):
    gen = generator(tiny_dir, Options(compile=True))
    assert (
        gen.engine.model.kernels is kernels.compiled()
    )  # the compiled functions really are the ones called
    outs = gen(public_chats + [longest_chat], max_new_tokens=NEW, return_full_text=False)
    assert outs == expected


def test_compile_is_refused_where_it_is_not_proven(tiny_dir):
    import optimize

    assert not kernels.compile_available(torch.device("cpu"))  # the CPU stays eager unless asked
    if kernels.compile_supported():  # asked for on the CPU, inductor writes C++
        assert optimize.prepare(
            tiny_dir, device="cpu", options=Options(compile=True)
        ).options.compile
    else:
        with pytest.raises(optimize.SetupError, match="needs a torch >= 2.6"):
            optimize.prepare(tiny_dir, device="cpu", options=Options(compile=True))


@pytest.mark.unit
def test_the_gate_admits_only_proven_versions():
    for version in ("2.3.1+cu121", "2.4.0a0+07cecf4168.nv24.05", "2.5.1"):
        assert not kernels.compile_supported(version)
