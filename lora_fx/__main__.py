"""``python -m lora_fx ...`` runs the ``lora-fx`` command line (see :mod:`lora_fx.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
