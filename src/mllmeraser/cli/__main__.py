"""`python -m mllmeraser.cli ...`: the command line, as the `mllmeraser` script."""

import sys

from .main import main

sys.exit(main())
