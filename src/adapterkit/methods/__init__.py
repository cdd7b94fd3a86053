"""Method families, one file each. Importing this package registers every built-in method.

Every submodule is imported here (so its configs register themselves). The names a submodule lists
in ``PUBLIC`` (its config classes, e.g. ``PUBLIC = ("LoRA",)``) are re-exported as ``adapterkit.<name>``;
adding a method family therefore touches no shared file.
"""

from __future__ import annotations

import importlib
import pkgutil

__all__: list[str] = []

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
    if _info.name.startswith("_"):
        continue
    _module = importlib.import_module(f"{__name__}.{_info.name}")
    for _name in getattr(_module, "PUBLIC", ()):
        globals()[_name] = getattr(_module, _name)
        __all__.append(_name)
