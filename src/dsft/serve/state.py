"""What the routes of one server share: the engine (None while loading), model names, the API key, metrics."""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from dsft.config import ServeConfig
from dsft.serve.engine import BASE_ADAPTER, Engine
from dsft.serve.errors import ApiError
from dsft.serve.metrics import Metrics

log = logging.getLogger("dsft.serve")

API_KEY_ENV = "DSFT_API_KEY"
# answered without the API key unless serve.auth_all: probes, scrapers and API tooling carry no secrets
OPEN_PATHS = frozenset({"/health", "/metrics", "/openapi.json"})


class ServerState:
    """The engine (None while loading), names, auth key and metrics of one app."""

    def __init__(self, model_dir: str, cfg: ServeConfig, engine: Engine | None = None):
        self.model_dir = model_dir
        self.cfg = cfg
        self.engine = engine
        self.load_error: str | None = None
        p = Path(str(model_dir))
        self.model_id = cfg.served_model_name or (p.stem if p.suffix == ".gguf" else p.name) or "model"
        self.adapters = dict(cfg.lora_modules)
        self.created = int(time.time())
        self.api_key = cfg.api_key or os.environ.get(API_KEY_ENV) or None
        self.open_paths = frozenset() if cfg.auth_all else OPEN_PATHS
        self.metrics = Metrics(self)
        self.ready = threading.Event()
        if engine is not None:
            self.ready.set()

    def load(self) -> None:
        """Load the model and start the engine (run in a thread so /health can answer 503 meanwhile)."""
        from dsft.serve.engine import load_engine

        common = dict(chat_template=self.cfg.chat_template, max_queue=self.cfg.max_queue,
                      max_model_len=self.cfg.max_model_len, on_token=self.metrics.on_tokens,
                      on_first_token=self.metrics.ttft.observe)
        try:
            if self.cfg.engine == "llamacpp":
                from dsft.serve.llamacpp import load_llamacpp_engine

                if self.adapters:
                    raise ValueError("LoRA adapters need the transformers engine (merge them before GGUF export)")
                eng = load_llamacpp_engine(self.model_dir, **common)
            else:
                eng = load_engine(self.model_dir, adapters=self.adapters, dtype=self.cfg.dtype, esft_delta=self.cfg.esft_delta,
                                  max_batch_size=self.cfg.max_batch_size, **common)
            eng.start()
            self.engine = eng
        except Exception as err:  # noqa: BLE001 - reported by /health and by serve_in_background
            self.load_error = f"{type(err).__name__}: {err}" if not getattr(err, "exit_code", None) else str(err)
            log.error("model load failed: %s", self.load_error)
        finally:
            self.ready.set()

    def authorized(self, path: str, authorization: str) -> bool:
        """May a request with this Authorization header value reach this path?"""
        if not self.api_key or path in self.open_paths:
            return True
        scheme, _, token = authorization.partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), self.api_key.encode())

    def engine_or_503(self) -> Engine:
        if self.engine is None:
            msg = f"model failed to load: {self.load_error}" if self.load_error else "the model is still loading"
            raise ApiError(503, msg, headers={"Retry-After": "5"})
        return self.engine

    def adapter_for(self, model: str | None) -> str:
        """The engine's adapter name for a request's `model` (404 for a model this server does not serve)."""
        if model is None or model == self.model_id:
            return BASE_ADAPTER
        if model in self.adapters:
            return model
        raise ApiError(404, f"The model `{model[:200]}` does not exist.", param="model")

    def model_cards(self) -> list[dict[str, Any]]:
        ctx = self.engine.max_model_len if self.engine is not None else None
        base = {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "dsft",
                "root": self.model_dir, "parent": None, "max_model_len": ctx}
        return [base] + [{"id": name, "object": "model", "created": self.created, "owned_by": "dsft", "root": path,
                          "parent": self.model_id, "max_model_len": ctx} for name, path in self.adapters.items()]
