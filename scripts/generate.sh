#!/usr/bin/env bash
# Regenerate coupon/gen/ from proto/ (protobuf-py messages + connectrpc stubs); the ErrorInfo
# detail message keeps its canonical google.rpc name so every client decodes it.
# Needs the test extras installed: pip install -e '.[test]'.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(dirname "$(command -v python)")
out=${1:-coupon/gen}
mkdir -p "$out"
rm -rf "$out"/coupon_pb.py "$out"/coupon_connect.py "$out"/google
python -m grpc_tools.protoc -I proto \
  --plugin=protoc-gen-py="$bin/protoc-gen-py" --py_out="$out" \
  --plugin=protoc-gen-connectrpc="$bin/protoc-gen-connectrpc" --connectrpc_out="$out" \
  proto/coupon.proto proto/google/rpc/error_details.proto
printf '"""Generated from proto/coupon.proto by scripts/generate.sh. DO NOT EDIT."""\n' > "$out/__init__.py"
