"""adapterkit: parameter-efficient and modular transfer learning for PyTorch and transformers.

Public names only; everything else may change.
"""

from .compose import Average, BatchSplit, Branch, Fuse, Parallel, Split, Stack
from .config import AdapterConfig, get_config, register, register_preset, registered
from .controller import Adapters, Plan, Summary, attach
from .formats.io import AdapterFileError
from .methods import *  # noqa: F403  (every method family's public configs)
from .methods import __all__ as _methods_all
from .quant import dequantize, merge_error, prepare_for_kbit_training, quantize
from .targeting import TargetError

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig",
    "Average",
    "BatchSplit",
    "Branch",
    "Fuse",
    "Parallel",
    "Split",
    "Stack",
    "AdapterFileError",
    "Adapters",
    "Plan",
    "Summary",
    "TargetError",
    "attach",
    "get_config",
    "register",
    "register_preset",
    "registered",
    *_methods_all,
]
__all__ += ["quantize", "prepare_for_kbit_training", "dequantize", "merge_error"]  # quantized bases
