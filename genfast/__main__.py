"""`python -m genfast ...`: the genfast command."""

import sys

from genfast.cli import main

sys.exit(main())
