"""Stage 'deploy' of dsft."""
