"""`make run`: the shopping-cart user function and the proxy, on the embedded store.

Starts both as real processes, waits until the proxy serves, prints how to call
it, and stops both cleanly on Ctrl-C. Carts live in `.state/journal.db` and
survive a restart. Ports come from USER_FUNCTION_PORT (8080), HTTP_PORT (9000, gRPC)
and HTTP_JSON_PORT (9080, HTTP/JSON).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

from tools.launch import ROOT, start_proxy, start_user_function, wait_port, wait_serving


def main() -> int:
    uf_port = int(os.environ.get("USER_FUNCTION_PORT", "8080"))
    port = int(os.environ.get("HTTP_PORT", "9000"))
    http_json_port = int(os.environ.get("HTTP_JSON_PORT", "9080"))
    state = ROOT / ".state"
    journal = os.environ.get("JOURNAL_URL", f"sqlite://{state / 'journal.db'}")
    logs = state / "logs"
    user_function = start_user_function("examples.shoppingcart", uf_port, logs)
    proxy = None
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        wait_port(uf_port, process=user_function)
        proxy = start_proxy(
            uf_port, port, journal, logs, extra_args=["--http-json-port", str(http_json_port)]
        )
        wait_serving(f"127.0.0.1:{port}", process=proxy)
        print(_banner(port, http_json_port, journal, logs), flush=True)
        while not stop.wait(0.5):
            for process in (user_function, proxy):
                if not process.alive():
                    print(f"{process.name} exited:\n{process.log_tail()}", file=sys.stderr)
                    return 1
        print("stopping ...", flush=True)
        return 0
    finally:
        if proxy is not None:
            proxy.stop()
        user_function.stop()


def _banner(port: int, http_json_port: int, journal: str, logs: Path) -> str:
    return f"""
The shopping cart is served on 127.0.0.1:{port} (gRPC) and 127.0.0.1:{http_json_port}
(HTTP/JSON); journal: {journal}; logs: {logs}.

Call it with grpcurl (no proto files needed, the proxy serves reflection):
  grpcurl -plaintext \\
      -d '{{"user_id": "alice", "product_id": "apple", "name": "Apple", "quantity": 2}}' \\
      127.0.0.1:{port} com.example.shoppingcart.ShoppingCart/AddItem
  grpcurl -plaintext -d '{{"user_id": "alice"}}' \\
      127.0.0.1:{port} com.example.shoppingcart.ShoppingCart/GetCart

with curl (HTTP/JSON):
  curl -X POST -H 'Content-Type: application/json' \\
      -d '{{"productId": "apple", "name": "Apple", "quantity": 2}}' \\
      http://127.0.0.1:{http_json_port}/cart/alice/items/add
  curl http://127.0.0.1:{http_json_port}/carts/alice

or with the example client:
  .venv/bin/python -m examples.shoppingcart.client --target 127.0.0.1:{port} add alice apple Apple 2
  .venv/bin/python -m examples.shoppingcart.client --target 127.0.0.1:{port} get alice

Ctrl-C stops both processes.
"""


if __name__ == "__main__":
    sys.exit(main())
