"""Run llama.cpp's convert_hf_to_gguf.py (subprocess entry point), mapping dsft's demo tokenizer to deepseek-v3.

Usage: python -m dsft.export._gguf_convert LLAMA_CPP_DIR MODEL_DIR --outfile F --outtype f16|q8_0 [--pre NAME]

llama.cpp recognises a BPE pre-tokenizer by hashing how a fixed text tokenizes, so a tokenizer with DeepSeek-V3's
exact pre-tokenizer but a smaller vocabulary (the embedded demo model) is "not recognized". dsft checks the
pre-tokenizer JSON equals DeepSeek-V3's (see gguf.py) and passes `--pre deepseek-v3`; then, and only for an
unrecognized hash, this wrapper answers that name. Real DeepSeek tokenizers are recognized by llama.cpp itself.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    conv_dir, rest = argv[0], argv[1:]
    pre = None
    if "--pre" in rest:
        i = rest.index("--pre")
        pre = rest[i + 1]
        del rest[i:i + 2]
    sys.path.insert(0, conv_dir)
    import convert_hf_to_gguf  # noqa: E402  (llama.cpp's converter, from conv_dir)
    from conversion import base  # noqa: E402

    if pre:
        original = base.TextModel.get_vocab_base_pre

        def get_vocab_base_pre(self, tokenizer) -> str:
            try:
                return original(self, tokenizer)
            except NotImplementedError:
                return pre

        base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = ["convert_hf_to_gguf.py", *rest]
    convert_hf_to_gguf.main()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
