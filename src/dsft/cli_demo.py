"""CLI of 'dsft demo' (pending)."""

from __future__ import annotations

from dsft.errors import DsftError


def register(sub) -> None:
    p = sub.add_parser("demo", help="demo (being built)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    raise DsftError("'dsft demo' is not built yet")
