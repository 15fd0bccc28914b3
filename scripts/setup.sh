#!/usr/bin/env bash
# Sets up ./.venv with everything the server and the tests need and builds the extension
# (CPU kernels always; CUDA kernels too wherever nvcc is installed). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# (This machine's local package mirror warns once per missing folder: filter only that noise.)
pip_install() { "$VENV/bin/pip" install --quiet --disable-pip-version-check "$@" 2> >(grep -v "^WARNING: Location" >&2); }
# torch first, and the build tools: the extension builds against this torch (--no-build-isolation).
pip_install torch==2.14.1 setuptools wheel ninja pybind11 grpcio-tools
pip_install --no-build-isolation -e ".[test]"
"$VENV/bin/python" -c "import mistral_grpc" || { echo "setup: the extension did not build or load" >&2; exit 1; }
