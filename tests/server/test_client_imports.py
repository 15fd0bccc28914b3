"""The client is light: a service that only calls the server must not load torch or the kernels."""

import subprocess
import sys

PROBE = """
import sys
from mistral_grpc.client import ChatClient, build_request
build_request("Hi", max_tokens=3)
heavy = sorted(name for name in sys.modules if name == "torch" or name.startswith(("torch.", "mistral_grpc._C")))
print(",".join(heavy))
"""


def test_client_imports_neither_torch_nor_the_extension() -> None:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"the client pulled in: {done.stdout.strip()}"
