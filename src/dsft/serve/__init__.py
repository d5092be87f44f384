"""Stage 'serve' of dsft: the seed's /generate and an OpenAI-compatible API over a continuous-batching engine."""

from dsft.serve.background import serve_in_background
from dsft.serve.stage import run

__all__ = ["run", "serve_in_background"]
