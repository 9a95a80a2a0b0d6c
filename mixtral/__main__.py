"""`python -m mixtral ...` (also what torchrun launches)."""

import sys

from mixtral.cli import main

sys.exit(main())
