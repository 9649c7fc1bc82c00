#!/bin/sh
# Regenerate the Python stubs of service/grpc/grpc_predict_v2.proto (checked in; needs grpcio-tools, a test extra).
# The stubs need a protobuf runtime at least as new as the generator's (see protobuf in pyproject.toml).
set -eu
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. service/grpc/grpc_predict_v2.proto
