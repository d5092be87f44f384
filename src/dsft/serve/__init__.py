"""Stage 'serve' of dsft: the seed's /generate and an OpenAI-compatible API over a continuous-batching engine."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from dsft.serve.app import create_app
    from dsft.serve.background import serve_in_background

__all__ = ["serve_in_background", "create_app"]


def __getattr__(name: str):
    if name == "serve_in_background":
        from dsft.serve.background import serve_in_background

        return serve_in_background
    if name == "create_app":
        from dsft.serve.app import create_app

        return create_app
    raise AttributeError(name)
