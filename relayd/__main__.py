"""``python -m relayd``: the same as the ``relayd`` console script."""

from __future__ import annotations

import sys

from relayd.cli import main

if __name__ == "__main__":
    sys.exit(main())
