"""`python -m decider` runs the `decider` command."""

import sys

from decider.cli import main

sys.exit(main())
