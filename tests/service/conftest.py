"""The service tests run real server processes through tests/server's harness, and service/load.py."""

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS / "server"))  # harness.ServerProcess, serve_fake.py
