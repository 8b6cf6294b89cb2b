"""The model's parts that the engine-against-pipeline tests do not isolate: the MLP taken in parts of rows."""
import dataclasses

import pytest
import torch

from orinfer.config import Phi3Config
from orinfer.kernels import EAGER
from orinfer.model import MLP
from orinfer.tiny import ASSETS

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("rows", [1, 7, 50])
def test_mlp_in_parts_of_rows_gives_every_rows_result(rows):
    cfg = dataclasses.replace(Phi3Config.from_folder(ASSETS), hidden_size=64, intermediate_size=176)
    whole, parts = MLP(cfg, EAGER), MLP(cfg, EAGER, rows=rows)
    g = torch.Generator().manual_seed(0)
    for a, b in zip(whole.parameters(), parts.parameters()):
        a.data = b.data = torch.randn(a.shape, generator=g) * 0.05
    x = torch.randn(23, 64, generator=g)
    out = parts(x)
    assert out.shape == (23, 64)
    torch.testing.assert_close(out, whole(x), rtol=1e-5, atol=1e-6)  # float32: a product of other rows rounds alike
    torch.testing.assert_close(parts(x[:5]), whole(x[:5]), rtol=1e-5, atol=1e-6)
