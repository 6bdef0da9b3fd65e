"""Fault injection for the reliability tests, armed only by the ``SLUICE_FAULT_INJECT`` variable.

The value is a comma-separated list of ``kind=request_id`` entries:

- ``fail-request=ID``: the request ``ID`` fails while its tokens stream, as a bug in one request's
  processing would; it ends with INTERNAL (or an INTERNAL error message on GenerateStream) and the
  other requests go on.
- ``crash-engine=ID``: the engine's loop raises right after admitting the request ``ID``, as a
  device failure would; the server reports NOT_SERVING and exits non-zero.

A server started with the variable set says so in a start-up warning.
"""

from __future__ import annotations

from dataclasses import dataclass

FAULT_INJECT_ENV = "SLUICE_FAULT_INJECT"
FAULT_KINDS = ("fail-request", "crash-engine")


class InjectedFault(RuntimeError):
    """The failure a fault plan asked for."""


@dataclass(frozen=True, slots=True)
class FaultPlan:
    """Which requests fail, and which one crashes the engine; empty: no faults (the default)."""

    fail_request_ids: frozenset[str] = frozenset()
    crash_engine_ids: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, value: str | None) -> FaultPlan:
        """The plan written in ``value`` (the variable's text); ``ValueError`` names a bad entry."""
        ids: dict[str, set[str]] = {kind: set() for kind in FAULT_KINDS}
        for entry in (value or "").split(","):
            if not entry.strip():
                continue
            kind, sep, request_id = (part.strip() for part in entry.partition("="))
            if kind not in ids or not sep or not request_id:
                raise ValueError(f"{FAULT_INJECT_ENV}: expected kind=request_id with kind one of "
                                 f"{', '.join(FAULT_KINDS)}; got {entry.strip()!r}")
            ids[kind].add(request_id)
        return cls(frozenset(ids["fail-request"]), frozenset(ids["crash-engine"]))

    def __bool__(self) -> bool:
        return bool(self.fail_request_ids or self.crash_engine_ids)

    def check_delta(self, request_id: str) -> None:
        """Called for each delta the servicer streams; raises for a request meant to fail."""
        if request_id in self.fail_request_ids:
            raise InjectedFault(f"injected failure of request {request_id}")

    def crashes_engine(self, request_id: str) -> bool:
        return request_id in self.crash_engine_ids


def crash_engine() -> None:
    """Run in the engine's loop: the exception ends it as a real failure would."""
    raise InjectedFault("injected engine crash")
