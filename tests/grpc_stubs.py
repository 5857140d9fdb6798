"""grpcio stubs generated from proto/ at test time, as a brand's gRPC backend would make them.

They are google.protobuf classes (the package's own are protobuf-py), generated into a
temporary directory by grpcio-tools' protoc, so nothing generated for grpcio is committed and
the stubs can never be staler than proto/.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class GrpcStubs:
    pb: ModuleType  # coupon_pb2: the messages
    grpc: ModuleType  # coupon_pb2_grpc: CouponServiceStub


def generate(out: Path) -> GrpcStubs:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            str(ROOT / "proto"),
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            str(ROOT / "proto" / "coupon.proto"),
        ],
        check=True,
        timeout=60,
    )
    # coupon_pb2_grpc imports coupon_pb2 by its top-level name.
    sys.path.insert(0, str(out))
    try:
        return GrpcStubs(
            importlib.import_module("coupon_pb2"), importlib.import_module("coupon_pb2_grpc")
        )
    finally:
        sys.path.remove(str(out))
