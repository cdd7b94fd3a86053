"""``python -m adapterkit.cli`` (and ``torchrun ... -m adapterkit.cli train ...``)."""

from adapterkit.cli import main

if __name__ == "__main__":
    main()
