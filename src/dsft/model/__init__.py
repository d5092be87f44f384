"""Models and tokenizers: loading (safe by default), DeepSeek chat templates, the tiny embedded model."""
