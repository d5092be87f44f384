"""Stage 'export' of dsft."""
