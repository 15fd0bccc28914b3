#!/usr/bin/env bash
# Runs buf (npm's @bufbuild/buf, pinned in scripts/buf/package-lock.json) from the repository root,
# installing it on first use:  bash scripts/buf.sh lint  |  bash scripts/buf.sh breaking --against ...
set -euo pipefail
cd "$(dirname "$0")/.."
BUF=scripts/buf/node_modules/.bin/buf
if [ ! -x "$BUF" ]; then
  npm ci --prefix scripts/buf --no-audit --no-fund --loglevel=error >&2
fi
exec "$BUF" "$@"
