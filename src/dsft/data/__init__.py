"""Stage 'data' of dsft."""
