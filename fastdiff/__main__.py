"""`python -m fastdiff ...` runs the CLI (the same as the `fastdiff` script)."""

import sys

from fastdiff.cli import main

sys.exit(main())
