"""`mistral-grpc serve` on the fake engine: serve() with its signal handling, in its own process.

    python serve_fake.py STEP_DELAY GRACE_PERIOD    (logs "SERVING model ... on port N" when ready)

A second stop signal exits 128 + its number, as `mistral-grpc serve` does.
"""

import asyncio
import logging
import sys

from fake_engine import FakeEngine
from mistral_grpc.server.app import ServeOptions, StoppedBySignal, serve

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    step_delay, grace_period = float(sys.argv[1]), float(sys.argv[2])
    engine = FakeEngine(step_delay=step_delay, pieces=tuple(f" w{i}" for i in range(100)))
    try:
        asyncio.run(serve(engine, ServeOptions(host="localhost", port=0, grace_period=grace_period)))
    except StoppedBySignal as stopped:
        sys.exit(128 + stopped.signum)
