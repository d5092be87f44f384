"""Issue 15's acceptance, end to end through the CLI: a tiny DeepSeek-V3 in the shipped FP8 layout (dsft.model.shipped:
FP8 + scales, per-expert tensors, an MTP layer, 3 shards, the real DeepSeek-V3 tokenizer) + a LoRA trained by
`dsft train` on the frozen e4m3 base → `dsft export` merged FP8 (loads back with dsft, and with plain transformers
after dequantization) and merged BF16 (plain transformers + DeepSeek-V3's chat template); MTP tensors as the input's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_stream_merge import read_all

from dsft.model import fp8

pytestmark = pytest.mark.slow
SRC = str(Path(__file__).resolve().parents[2] / "src")
IDS = [0, 3476, 477, 4195, 7803, 1306, 14]


def _dsft(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "dsft", *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, f"dsft {' '.join(args)}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


def _plain(code: str, cwd: Path) -> dict:
    """Run `code` in a fresh python with plain transformers (no dsft on the path); its last stdout line as JSON."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env, cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


PLAIN = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
d = sys.argv[1]
tok = AutoTokenizer.from_pretrained(d)
m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
chat = tok.apply_chat_template([{"role": "user", "content": "头痛怎么办？"}], add_generation_prompt=True, tokenize=False)
ids = torch.tensor([IDS])
with torch.no_grad():
    logits = m(input_ids=ids, use_cache=False).logits[0].float()
    gen = m.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
print(json.dumps({"cls": type(m).__name__, "chat": chat, "logits": logits.tolist(), "gen": int(gen.shape[1]),
                  "dsft": "dsft" in sys.modules}))
""".replace("IDS", repr(IDS))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from dsft.model.shipped import write_shipped

    root = tmp_path_factory.mktemp("e2e")
    base = write_shipped(root / "v3")
    cfg = {"run_dir": str(root / "run"), "model": {"name_or_path": str(base)},
           "data": {"max_seq_length": 96},
           "train": {"max_steps": 3, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
                     "learning_rate": 5e-3, "lr_scheduler": "constant", "warmup_steps": 0, "logging_steps": 1,
                     "save_steps": 1000, "report_to": ["none"]}}
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    _dsft("data", "prepare", str(root / "cfg.yaml"))
    _dsft("train", str(root / "cfg.yaml"))
    return {"root": root, "base": base, "cfg": root / "cfg.yaml", "adapter": root / "run" / "train" / "adapter"}


def _adapter_logits(base: Path, adapter: Path) -> torch.Tensor:
    """Logits of the FP8 base + the adapter, unmerged (dsft's FP8 loader, PEFT on top)."""
    from dsft.model.adapters import load_adapter
    from dsft.model.load import load_model

    m = load_adapter(load_model(base, dtype="float32"), adapter).eval()
    with torch.no_grad():
        return m(input_ids=torch.tensor([IDS]), use_cache=False).logits[0].float()


def _close(got, want: torch.Tensor, rel: float) -> float:
    diff = float((torch.as_tensor(got) - want).abs().max())
    assert diff <= rel * float(want.abs().max()) + 1e-4, (diff, float(want.abs().max()))
    return diff


def _dequantized_copy(src: Path, dst: Path) -> Path:
    """A plain folder of src with every FP8 weight × its scales in float32 and no quantization_config."""
    from safetensors.torch import save_file

    sd = read_all(src)
    out = {k: (fp8.dequantize(v, sd[k + "_scale_inv"]) if v.dtype == fp8.FP8_DTYPE else v)
           for k, v in sd.items() if not k.endswith("_scale_inv")}
    dst.mkdir()
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("quantization_config")
    (dst / "config.json").write_text(json.dumps(cfg))
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (src / f).exists():
            (dst / f).write_bytes((src / f).read_bytes())
    return dst


def test_fp8_lora_exports_merged_fp8_and_bf16_with_mtp_kept(trained):
    root, base, adapter = trained["root"], trained["base"], trained["adapter"]
    _dsft("export", str(trained["cfg"]), "--dtype", "fp8")
    merged8 = root / "run" / "export" / "merged"
    m = json.loads((root / "run" / "export" / "manifest.json").read_text())
    assert m["merge"] == "stream" and m["dtype"] == "fp8"
    assert set(m["requant_error"]) >= {"attention", "dense_mlp", "shared_experts", "routed_experts"}
    _dsft("export", "--model", str(base), "--adapter", str(adapter), "-o", str(root / "out16"), "--dtype", "bfloat16")
    merged16 = root / "out16" / "merged"

    src, out8, out16 = read_all(base), read_all(merged8), read_all(merged16)
    mtp = [k for k in src if k.startswith("model.layers.3.")]
    assert len(mtp) > 20 and any(src[k].dtype == fp8.FP8_DTYPE for k in mtp)
    for k in mtp:
        assert torch.equal(out8[k].reshape(-1).view(torch.uint8), src[k].reshape(-1).view(torch.uint8)), k
        if k.endswith("_scale_inv"):
            assert k not in out16
        else:
            want = fp8.dequantize(src[k], src[k + "_scale_inv"]).to(torch.bfloat16) if src[k].dtype == fp8.FP8_DTYPE else src[k]
            assert torch.equal(out16[k].reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), k
    for d in (merged8, merged16):
        assert json.loads((d / "config.json").read_text())["num_nextn_predict_layers"] == 1

    want = _adapter_logits(base, adapter)
    # FP8 merge, loaded back with dsft (kept e4m3): the adapter's logits within the re-quantization error
    from dsft.model.load import load_model

    with torch.no_grad():
        got8 = load_model(merged8, dtype="float32").eval()(input_ids=torch.tensor([IDS]), use_cache=False).logits[0]
    _close(got8, want, 0.05)
    # … and with plain transformers after dequantization
    deq = _dequantized_copy(merged8, root / "merged8-dequantized")
    res8 = _plain(PLAIN.replace("d = sys.argv[1]", f"d = {str(deq)!r}"), root)
    assert res8["cls"] == "DeepseekV3ForCausalLM" and not res8["dsft"]
    _close(res8["logits"], got8, 1e-4)
    # BF16 merge: plain transformers, DeepSeek-V3's chat template, generation
    res16 = _plain(PLAIN.replace("d = sys.argv[1]", f"d = {str(merged16)!r}"), root)
    assert res16["cls"] == "DeepseekV3ForCausalLM" and not res16["dsft"] and res16["gen"] == len(IDS) + 3
    assert res16["chat"] == "<｜begin▁of▁sentence｜><｜User｜>头痛怎么办？<｜Assistant｜>"
    _close(res16["logits"], want, 0.03)

    # eval measures the FP8 export as stored (export.dtype fp8 names a storage format, not a torch dtype)
    cfg = yaml.safe_load(trained["cfg"].read_text(encoding="utf-8"))
    cfg["eval"] = {"max_samples": 3, "max_new_tokens": 3, "compare_base": False}
    cfg["export"] = {"dtype": "fp8", "report": True, "report_samples": 2, "report_new_tokens": 3}
    ecfg = root / "eval.yaml"
    ecfg.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    _dsft("eval", str(ecfg))
    _dsft("eval", str(ecfg), "--variants")
    ev = json.loads((root / "run" / "eval" / "eval.json").read_text())
    assert "merged" in ev["models"] and ev["models"]["merged"]["perplexity"] > 1
    qr = json.loads((root / "run" / "eval" / "quant_report.json").read_text())
    assert qr["dtype"] == "fp8" and qr["rows"] and qr["rows"][0]["perplexity"] > 1, qr
