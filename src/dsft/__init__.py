"""dsft: raw domain data → fine-tuned, compressed, served DeepSeek model, in one tool."""

__version__ = "0.1.0"
