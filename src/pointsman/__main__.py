"""`python -m pointsman` is the `pointsman` command."""

import sys

from pointsman.cli import main

sys.exit(main())
