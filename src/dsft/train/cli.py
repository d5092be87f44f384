"""CLI of the 'train' stage (first cut pending)."""

from __future__ import annotations

from dsft.errors import DsftError


def register(sub) -> None:
    p = sub.add_parser("train", help="train stage (being built)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    raise DsftError("'dsft train' is not built yet")
