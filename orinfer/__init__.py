"""orinfer: a batched, exact greedy engine for Phi-3 models, behind optimize.py's pipe()-compatible
generator.

The surface other code may use (optimize.py, test_script.py, bench/ and the tests): `Options` (how
the engine runs), `Observer` and `PassRecord` (what a benchmark or test sees of a run),
`read_records` and `DataError` (the data file). Importing the package loads no torch: test_script.py
answers --help and bad inputs without it. optimize.build returns an orinfer.pipeline.Generator,
whose call, report(), reset(), warmup(steps), observer and model are the rest of the surface
(bench/README.md). The modules below them (engine, scheduler, runner, the layouts, model, attention,
kernels, ...) are the engine's own; README's Layout maps them.
"""

from .dataset import DataError, read_records
from .observe import Observer, PassRecord
from .options import Options

__all__ = ["DataError", "Observer", "Options", "PassRecord", "read_records"]
