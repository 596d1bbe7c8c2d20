"""A projection as its own process, through `run_projection`: the Recorder over
persistence id "cart", named "p". Arguments: EVENT_LOG_TARGET DATABASE_URL CONSUMER."""

from __future__ import annotations

import logging
import sys

from user_function_sdk import run_projection

from .helpers import Recorder, projection


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    target, database_url, consumer = sys.argv[1:4]
    run_projection(projection("p", Recorder(consumer), target, database_url))


if __name__ == "__main__":
    main()
