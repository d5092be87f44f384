"""`python -m dsft` = the `dsft` command (also what `accelerate launch -m dsft` runs)."""

import sys

from dsft.cli import main

sys.exit(main())
