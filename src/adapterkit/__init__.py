"""adapterkit: parameter-efficient and modular transfer learning for PyTorch and transformers.

Public names only; everything else may change.
"""

from .config import AdapterConfig, get_config, register, register_preset, registered
from .controller import Adapters, Plan, Summary, attach
from .formats.io import AdapterFileError
from .methods.lora import LoRA
from .targeting import TargetError

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig",
    "AdapterFileError",
    "Adapters",
    "LoRA",
    "Plan",
    "Summary",
    "TargetError",
    "attach",
    "get_config",
    "register",
    "register_preset",
    "registered",
]
