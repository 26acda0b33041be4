"""`python -m fastdiff.cli` (as torchrun runs it): the `fastdiff` command."""

import sys

from fastdiff.cli import main

sys.exit(main())
