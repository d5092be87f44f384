"""Stage 'eval' of dsft: metrics, predictors, reports and the quantization report; the stage is dsft.eval.stage.run."""
