"""Run the shopping cart user function: ``python -m examples.shoppingcart``.

Listens on HOST:PORT from the environment (default 0.0.0.0:8080).
"""

from __future__ import annotations

import logging
import os

from user_function_sdk import serve

from .cart import create_entity


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    host = os.environ.get("HOST", "0.0.0.0")
    port = int(os.environ.get("PORT", "8080"))
    serve([create_entity()], host, port)


if __name__ == "__main__":
    main()
