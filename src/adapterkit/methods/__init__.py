"""Method families, one file each. Importing this package registers every built-in method."""

from . import bitfit, heads, lora  # noqa: F401
