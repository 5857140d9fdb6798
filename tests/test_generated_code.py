"""coupon/gen must be exactly what scripts/generate.sh produces from proto/."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "generate.sh"), str(tmp_path)],
        check=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )
    committed = ROOT / "coupon" / "gen"
    fresh = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.py"))
    assert fresh == sorted(str(p.relative_to(committed)) for p in committed.rglob("*.py"))
    for name in fresh:
        assert (tmp_path / name).read_text() == (committed / name).read_text(), (
            f"coupon/gen/{name} is stale: run scripts/generate.sh and commit the result"
        )
