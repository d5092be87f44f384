"""CLI of 'dsft run' (pending)."""

from __future__ import annotations

from dsft.errors import DsftError


def register(sub) -> None:
    p = sub.add_parser("run", help="run (being built)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    raise DsftError("'dsft run' is not built yet")
