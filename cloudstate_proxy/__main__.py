"""``python -m cloudstate_proxy`` is ``cloudstate-proxy``."""

from .cli import main

raise SystemExit(main())
