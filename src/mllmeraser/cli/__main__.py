"""`python -m mllmeraser.cli ...`: the command line, as the `mllmeraser` script."""

import sys

from . import main

sys.exit(main())
