"""Stage 'ui' of dsft: `dsft ui`, a local web dashboard over the run directories (runs, curves, reports, launch, chat)."""
