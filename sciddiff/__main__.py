"""``python -m sciddiff``: the same as the ``sciddiff`` console script."""

from sciddiff.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
