"""Fixed probe conversations (Chinese + English) for model checks when no held-out data is at hand."""

from __future__ import annotations

PROBE_CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "头痛、发烧三天，应该怎么办？"},
     {"role": "assistant", "content": "建议多喝水、休息，体温超过38.5℃时可服用退烧药，症状持续请就医。"}],
    [{"role": "user", "content": "What should I do about a persistent cough?"},
     {"role": "assistant", "content": "Rest, drink fluids, and see a doctor if it lasts more than 3 weeks."}],
    [{"role": "user", "content": "高血压患者饮食要注意什么？"},
     {"role": "assistant", "content": "少盐少油，多吃蔬菜水果，戒烟限酒，规律运动。"}],
]
