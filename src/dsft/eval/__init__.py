"""Stage 'eval' of dsft."""
