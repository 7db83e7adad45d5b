"""`python -m gpushared` runs the daemon."""

import sys

from gpushared.app import main

sys.exit(main())
