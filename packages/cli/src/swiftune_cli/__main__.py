"""``python -m swiftune_cli``: the ``swiftune`` command (torchrun starts its workers this way)."""

import sys

from swiftune_cli.main import main

if __name__ == "__main__":
    sys.exit(main())
