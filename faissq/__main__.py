"""`python -m faissq` runs the `faissq` command (where the console script is not installed)."""

from __future__ import annotations

import sys

from faissq.cli.main import main

sys.exit(main())
