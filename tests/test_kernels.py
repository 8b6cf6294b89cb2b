"""The compiled (fused) elementwise kernels give eager's values, and the engine's output stays the pipeline's.

On the CPU torch.compile generates C++ rather than Triton, but the graphs it fuses, and the rounding rules it is
told to follow, are the same ones the GPU path gets.
"""
import pytest
import torch
from conftest import NEW

from orinfer import kernels


needs_compile = pytest.mark.skipif(not kernels.compile_supported(),
                                   reason=f"compiled kernels need torch >= 2.6 (this is {torch.__version__})")


@pytest.fixture
def compiled():
    eager = dict(kernels._EAGER)
    kernels.use_compiled(True)
    yield eager
    kernels.use_compiled(False)


@needs_compile
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernels_equal_eager(compiled, dtype):
    g = torch.Generator().manual_seed(0)
    for tokens in (1, 7, 33, 50):  # static kernels for 1 and 7, then one with a symbolic token count
        def rand(*shape):
            return torch.randn(*shape, generator=g).to(dtype)
        qkv = rand(tokens, 6 * 64)
        q = qkv[:, :320].view(tokens, 5, 64)  # query and key heads: a strided view of qkv_proj's output
        cos, sin = rand(tokens, 1, 64), rand(tokens, 1, 64)
        gate, up = rand(tokens, 96), rand(tokens, 96)
        h, w = rand(tokens, 80), rand(80)
        # Elementwise: bit for bit, half-precision roundings included.
        assert torch.equal(kernels.rope(q, cos, sin), compiled["rope"](q, cos, sin))
        assert torch.equal(kernels.silu_mul(gate, up.clone()), compiled["silu_mul"](gate.clone(), up.clone()))
        # A reduction: the mean's summation order may differ, by float32 ulps before the final rounding.
        tol = {"rtol": 1e-6 if dtype == torch.float32 else 8e-3, "atol": 0}
        a, b = kernels.rms_norm(h, w, 1e-5).float(), compiled["rms_norm"](h, w, 1e-5).float()
        assert torch.allclose(a, b, **tol)
        delta = rand(tokens, 80)
        (sum_a, a), (sum_b, b) = kernels.add_rms_norm(delta, h, w, 1e-5), compiled["add_rms_norm"](delta, h, w, 1e-5)
        assert torch.equal(sum_a, sum_b) and torch.equal(sum_a, h + delta)
        assert torch.allclose(a.float(), b.float(), **tol)


@needs_compile
def test_compiled_engine_equals_pipeline(compiled, gen, expected, public_chats, longest_chat):
    outs = gen(public_chats + [longest_chat], max_new_tokens=NEW, return_full_text=False)
    assert outs == expected
    assert kernels.compiled()  # the compiled functions really were the ones called


def test_compile_is_refused_without_triton(tiny_dir):
    import optimize
    assert not kernels.compile_available(torch.device("cpu"))
    with pytest.raises(optimize.SetupError, match="Triton"):
        optimize.build(tiny_dir, device="cpu", compile=True, progress=False)


def test_the_gate_admits_only_proven_versions(monkeypatch):
    for version, admitted in (("2.3.1+cu121", False), ("2.4.0a0+07cecf4168.nv24.05", False), ("2.5.1", False)):
        monkeypatch.setattr(torch, "__version__", version)
        assert kernels.compile_supported() is admitted
