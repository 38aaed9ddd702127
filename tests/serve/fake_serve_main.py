"""Run the real server stack (DrainingServer + app) over the fake engine, for subprocess tests.

Usage: python -m tests.serve.fake_serve_main PORT SHUTDOWN_TIMEOUT STEP_DELAY
"""

import logging
import sys

import uvicorn

from hybridserve.serve.app import build_app
from hybridserve.serve.context import ServeSettings
from hybridserve.serve.server import DrainingServer
from tests.serve.fake_engine import FakeEngineClient
from tests.serve.helpers import make_tokenizer


def main() -> int:
    port, timeout, delay = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
    logging.basicConfig(level=logging.INFO)
    engine = FakeEngineClient(make_tokenizer(), step_delay=delay)
    engine.reply = lambda prompt, params: "x" * 200 + "<|im_end|>"
    app = build_app(ServeSettings(["tiny"], shutdown_timeout=timeout), engine=engine)
    server = DrainingServer(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"),
                            app.state.ctx, timeout)
    server.run()
    return server.exit_code


if __name__ == "__main__":
    sys.exit(main())
