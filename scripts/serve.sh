#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the server; with no flags it serves the demo model on :50051.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${VENV:-.venv}/bin/mistral-grpc" serve "$@"
