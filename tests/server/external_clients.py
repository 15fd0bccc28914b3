"""Clients outside Python's gRPC stack: the grpcurl binary and a Node.js @grpc/grpc-js client."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
NODE, NPM = shutil.which("node"), shutil.which("npm")
# The Node.js client, its package.json and the committed package-lock.json; `npm ci` installs the
# locked packages into node/node_modules (git-ignored).
NODE_DIR = Path(__file__).parent / "node"


def grpcurl(target: str, *args: str, body: str | None = None,
            headers: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    command = [GRPCURL, "-plaintext", *[arg for h in headers for arg in ("-H", h)]]
    command += ["-d", body] if body is not None else []
    return subprocess.run([*command, target, *args], capture_output=True, text=True, timeout=60)


def json_stream(text: str) -> list[dict]:
    """grpcurl prints one JSON object per message, one after the other."""
    decoder, objects, position = json.JSONDecoder(), [], 0
    text = text.strip()
    while position < len(text):
        obj, position = decoder.raw_decode(text, position)
        objects.append(obj)
        position = len(text) - len(text[position:].lstrip())
    return objects


def install_node_client() -> Path:
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        installed = subprocess.run([NPM, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, capture_output=True,
                                   text=True, timeout=600)
        assert installed.returncode == 0, f"npm ci failed:\n{installed.stderr}"
    return NODE_DIR / "stream_chat.js"


def node_stream(node_client: Path, target: str, body: str) -> tuple[int, list[dict]]:
    """Runs the Node.js client's StreamChat: (exit status, the chunks or the error it printed)."""
    done = subprocess.run([NODE, str(node_client), target, body], capture_output=True, text=True, timeout=120)
    assert not done.stderr, done.stderr
    return done.returncode, [json.loads(line) for line in done.stdout.splitlines()]
