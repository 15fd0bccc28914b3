#!/usr/bin/env bash
# Sets up ./.venv with everything the server and the tests need and builds the extension
# (CPU kernels always; CUDA kernels too wherever nvcc is installed). Safe to run again, and quick:
# each step runs only when its inputs changed since it last succeeded (stamps in the venv):
#   packages   pyproject.toml, setup.py, this script   -> pip
#   extension  csrc/, proto/, setup.py                 -> an incremental build (ninja, in build/)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"

# (This machine's local package mirror warns once per missing folder: filter only that noise.)
pip_install() { "$VENV/bin/pip" install --quiet --disable-pip-version-check "$@" 2> >(grep -v "^WARNING: Location" >&2); }
digest() { find "$@" -type f -not -path '*/node_modules/*' -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1; }

PACKAGES=(pyproject.toml setup.py scripts/setup.sh)
EXTENSION=(csrc proto setup.py)
# Each digest is taken before its step runs and written once the step succeeded, so a file edited
# during a build makes the next run build again.
packages=$(digest "${PACKAGES[@]}")
extension=$(digest "${EXTENSION[@]}")
if [ "$(cat "$VENV/.setup-packages" 2>/dev/null)" != "$packages" ]; then
  # torch first, and the build tools: the extension builds against this torch (--no-build-isolation).
  pip_install torch==2.14.1 setuptools wheel ninja pybind11 grpcio-tools
  # The package and its dependencies only: the extension is built below, incrementally, in build/.
  MISTRAL_GRPC_SKIP_EXTENSION=1 pip_install --no-build-isolation -e ".[test]"
  echo "$packages" >"$VENV/.setup-packages"
fi
if [ "$(cat "$VENV/.setup-extension" 2>/dev/null)" != "$extension" ] || ! compgen -G "python/mistral_grpc/_C*.so" >/dev/null; then
  "$PY" setup.py --quiet build_ext --inplace  # also regenerates the gRPC stubs from proto/
  "$PY" -c "import mistral_grpc.ops" || { echo "setup: the extension did not build or load" >&2; exit 1; }
  echo "$extension" >"$VENV/.setup-extension"
fi
