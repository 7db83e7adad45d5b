"""`python -m gpusharectl` runs the CLI."""

import sys

from gpusharectl.cli import main

sys.exit(main())
