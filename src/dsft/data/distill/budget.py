"""The token / cost budget of a distillation: what was spent (across resumed runs) and whether it is used up."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dsft.config.distill import BudgetConfig


@dataclass
class Budget:
    """Counts prompt and completion tokens; `spent` says which limit (if any) has been reached."""

    cfg: BudgetConfig
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, usage: dict[str, Any]) -> None:
        self.prompt_tokens += int(usage.get("prompt_tokens", 0))
        self.completion_tokens += int(usage.get("completion_tokens", 0))

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def cost(self) -> float:
        c = self.cfg
        return (self.prompt_tokens * c.input_price_per_million + self.completion_tokens * c.output_price_per_million) / 1e6

    def spent(self) -> str | None:
        """None while there is budget left, else which limit was reached (one line)."""
        c = self.cfg
        if c.max_tokens is not None and self.tokens >= c.max_tokens:
            return f"token budget spent: {self.tokens:,} of {c.max_tokens:,} tokens"
        if c.max_cost is not None and self.cost >= c.max_cost:
            return f"cost budget spent: {self.cost:.4f} of {c.max_cost:.4f} {c.currency}"
        return None

    def summary(self) -> dict[str, Any]:
        c = self.cfg
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "tokens": self.tokens, "cost": round(self.cost, 6), "currency": c.currency,
                "max_tokens": c.max_tokens, "max_cost": c.max_cost, "spent": self.spent()}
