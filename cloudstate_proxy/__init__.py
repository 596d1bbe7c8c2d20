"""An event-sourcing proxy that speaks the Cloudstate protocol (0.2).

The command line is `cloudstate_proxy.cli` (``cloudstate-proxy serve``); in
code, build a `cloudstate_proxy.config.ProxyConfig` and run a
`cloudstate_proxy.app.ProxyApp`. This package module stays free of imports so
that every submodule can be imported on its own.
"""

from __future__ import annotations

from importlib import metadata

__all__ = ["__version__"]

try:
    __version__ = metadata.version("cloudstate-proxy-py")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
