"""Stage 'export': merge the adapter into the base, save plain-transformers folders and quantized variants.

The stage function is dsft.export.stage.run; the files it writes load through dsft.model (dsft.model.artefacts)
and are measured by the eval stage (dsft.eval.quant_report).
"""
