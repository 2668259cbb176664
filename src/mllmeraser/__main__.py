"""`python -m mllmeraser ...` (and `torchrun -m mllmeraser fit ...`): the command line, as the `mllmeraser` script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
