"""`esft:` section — Expert-Specialized Fine-Tuning (train.method esft): profile, select and train routed experts."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dsft.config.base import Section

TOP_P_DEFAULT = {"token": 0.2, "gate": 0.1}
"""The paper's thresholds (ESFT-Token 0.2, ESFT-Gate 0.1; arXiv 2407.01906, deepseek-ai/ESFT scripts)."""


class EsftConfig(Section):
    score: Literal["token", "gate"] = "token"
    """Expert relevance: `token` = token selection ratio (share of a layer's top-k slots that pick the expert),
    `gate` = average gate score (the weight the router gives the expert, 0 where it is not in the top-k)."""
    top_p: float | None = Field(None, gt=0, le=1)
    """Per MoE layer, experts are taken in descending score until their cumulative (layer-normalized) score reaches
    top_p. Unset: 0.2 for `token`, 0.1 for `gate` (the paper's)."""
    sample_tokens: int = Field(131072, gt=0)
    """Tokens of the training data (seed-shuffled examples, prompt and answer) the base model is profiled on."""
    train_shared_experts: bool = False
    """Also train the shared experts (the paper's ablation)."""
    train_non_expert_modules: bool = False
    """Also train everything that is not an expert or router: attention, dense MLPs, norms, embeddings, LM head."""
    experts: dict[int, list[int]] | None = None
    """An explicit selection {layer index: [routed expert ids]} instead of profile + top_p (as ESFT's expert_config
    json); layers left out train no routed expert."""

    @model_validator(mode="after")
    def _fill_top_p(self) -> EsftConfig:
        if self.top_p is None:
            object.__setattr__(self, "top_p", TOP_P_DEFAULT[self.score])
            self.model_fields_set.discard("top_p")
        return self
