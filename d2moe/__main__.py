"""`python -m d2moe ...`: the `d2moe` command, for environments without its script on PATH."""

import sys

from d2moe.cli import main

sys.exit(main())
