"""Stage 'train' of dsft."""
