"""Thin entry script: `python cmd/server.py --config FILE` (same as `coupon-server`)."""

from __future__ import annotations

import sys
from pathlib import Path

# Run from a checkout without installing: make the repository root importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coupon.server import main

if __name__ == "__main__":
    sys.exit(main())
