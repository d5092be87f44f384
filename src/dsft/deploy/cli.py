"""CLI of the 'deploy' stage (first cut pending)."""

from __future__ import annotations

from dsft.errors import DsftError


def register(sub) -> None:
    p = sub.add_parser("deploy", help="deploy stage (being built)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    raise DsftError("'dsft deploy' is not built yet")
