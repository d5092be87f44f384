"""Models and tokenizers: loading every artefact dsft reads or writes (HF folders, adapters, fp16/bf16, dsft int8/int4,
bitsandbytes, GGUF — see dsft.model.artefacts), DeepSeek chat templates, the tiny embedded model."""
