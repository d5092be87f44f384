"""Stage 'serve' of dsft."""
