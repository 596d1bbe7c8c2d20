"""Settings of the HTTP/JSON server, built from the proxy's config."""

from __future__ import annotations

from dataclasses import dataclass

# Request line plus headers, at most; beyond, 431.
DEFAULT_MAX_HEADER_SIZE = 64 * 1024
# How long a keep-alive connection may wait for its next request, and a
# request may take to arrive in full, before the connection is closed.
DEFAULT_IDLE_TIMEOUT = 60.0


@dataclass(frozen=True, slots=True)
class HttpJsonOptions:
    """Where the HTTP/JSON server listens and what it accepts.

    ``port`` 0 picks a free port. ``max_body_size`` caps a request body (413
    beyond); ``shutdown_timeout`` is how long in-flight requests may finish
    once `close` is called.
    """

    host: str = "0.0.0.0"
    port: int = 9080
    max_body_size: int = 4 * 1024 * 1024
    shutdown_timeout: float = 10.0
    max_header_size: int = DEFAULT_MAX_HEADER_SIZE
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT

    def __post_init__(self) -> None:
        if not self.host.strip():
            raise ValueError("HTTP/JSON host must not be empty")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"HTTP/JSON port must be between 0 and 65535, got {self.port}")
        for name in ("max_body_size", "max_header_size", "shutdown_timeout", "idle_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"HTTP/JSON {name} must be greater than 0")

    @property
    def address(self) -> str:
        """``host:port`` (IPv6 literals bracketed)."""
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"
