"""`python -m safegate ...` runs the command line."""

import sys

from safegate.cli import main

sys.exit(main())
