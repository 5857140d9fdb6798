"""The Dockerfile and compose.yaml, built and run with podman by scripts/container_test.sh.

The script does the work (images from Debian's packages, the image against PostgreSQL, SIGTERM,
the compose stack with two replicas); this test runs it as part of the suite, shows its figures
and checks each of its proofs. scripts/test.sh installs podman, runc, mmdebstrap and
podman-compose when run as root, as CI does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "container_test.sh"
TOOLS = ("podman", "runc", "mmdebstrap", "podman-compose", "curl")
VERIFIER_OK = "OK: exactly 100 distinct codes, the rest sold out; GetCampaign agrees"


@pytest.mark.containers
def test_image_and_compose_stack_built_and_run_with_podman(
    capsys: pytest.CaptureFixture[str],
) -> None:
    if os.geteuid() != 0:
        pytest.skip("the container test runs as root (rootless podman needs subuid set-up)")
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    assert not missing, f"{missing} not installed: run scripts/test.sh as root, it installs them"

    done = subprocess.run(
        ["bash", str(SCRIPT)],
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=1200,  # a hang guard: a cold machine makes two Debian images first
        check=False,
    )
    figures = [line for line in done.stdout.splitlines() if line.startswith("container_test:")]
    with capsys.disabled():
        print("\n" + "\n".join(figures))
    assert done.returncode == 0, done.stdout[-6000:]

    def figure(prefix: str) -> str:
        lines = [line for line in figures if line.startswith(f"container_test: {prefix}")]
        assert len(lines) == 1, (prefix, figures)
        return lines[0]

    assert "MB, built in" in figure("image localhost/coupon-issuer:")
    assert "HEALTHCHECK: healthy" in figure("PID 1: coupon-server as ")
    assert VERIFIER_OK in figure("verifier vs the container:")
    assert "SIGTERM: exit code 0, stopped in" in figure("SIGTERM:")
    assert VERIFIER_OK in figure("verifier vs the compose stack (both replicas):")
    assert "= 100" in figure("compose: codes issued per replica")
    assert "the campaign still has 100 codes" in figure("compose: after down and up")
    assert "cleaned up:" in figure("cleaned up:")
