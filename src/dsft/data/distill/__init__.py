"""`dsft data distill`: prompts → teacher samples (resumable) → verified, filtered traces → a reasoning mix."""
