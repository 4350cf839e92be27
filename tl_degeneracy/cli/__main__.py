"""`python -m tl_degeneracy.cli`: the `tl-degeneracy` command (for `torchrun`)."""

import sys

from tl_degeneracy.cli import main

sys.exit(main())
