"""Stage 'plan' of dsft."""
