"""sluice's generated gRPC API (``sluice.v1``) and the distribution's version."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sluice")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
