"""`dsft serve --engine vllm` for real: vLLM's OpenAI server (its CPU build here) started by dsft on loopback,
called with the openai SDK and httpx, answers checked against plain transformers greedy decoding.

Skipped where vLLM is not importable (the main `make test` venv); `make test-vllm` builds a venv with vLLM's
CPU build and runs these. One server for the module: a tiny Llama (R1-Distill-Llama's architecture) whose
tokenizer has <think>/</think> tokens, served with the r1-distill template (so vLLM's deepseek_r1 reasoning
parser runs), a LoRA adapter, an API key and the seed's /generate middleware.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed in this venv (`make test-vllm` builds one with vLLM's CPU build)",
                allow_module_level=True)

import httpx  # noqa: E402
import openai  # noqa: E402
from serve_helpers import assert_greedy_matches, greedy_reference, wait_healthy  # noqa: E402

KEY = "sk-vllm-test"
N = 12
PROMPTS = ["头痛怎么办", "发烧三天了，应该吃什么药？"]
STARTUP_S = 300


def build_tiny_llama_r1(out: Path, adapter_out: Path) -> None:
    """Tiny random Llama (head_dim 32: vLLM's CPU attention needs ≥ 32) + the demo tokenizer with <think> and
    </think> added as tokens (real R1-Distill tokenizers have them) + a random, non-zero LoRA adapter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from dsft.model.tokenizer import embedded_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(str(embedded_tokenizer_dir()))
    tok.add_tokens(["<think>", "</think>"])
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        model.save_pretrained(str(out))
        tok.save_pretrained(str(out))
        torch.manual_seed(1)
        peft = get_peft_model(LlamaForCausalLM.from_pretrained(str(out)),
                              LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                         init_lora_weights=False))
        peft.save_pretrained(str(adapter_out))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_env(tmp: Path) -> dict[str, str]:
    """Modest CPU settings for a shared machine: one OpenMP thread, no core pinning, a 1 GiB KV cache."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", VLLM_CPU_OMP_THREADS_BIND="nobind", VLLM_CPU_KVCACHE_SPACE="1",
               DSFT_HOME=env.get("DSFT_HOME") or str(tmp / "dsft-home"))
    env.pop("DSFT_API_KEY", None)
    return env


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm-serve")
    model, adapter = tmp / "tiny-llama-r1", tmp / "adapter"
    build_tiny_llama_r1(model, adapter)
    port = _free_port()
    log_path = tmp / "server.log"
    cmd = [sys.executable, "-m", "dsft", "serve", "--model", str(model), "--engine", "vllm", "--port", str(port),
           "--served-model-name", "tiny", "--lora", f"med={adapter}", "--chat-template", "r1-distill",
           "--max-model-len", "512", "--max-batch-size", "4", "--dtype", "float32", "--api-key", KEY]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=vllm_env(tmp), start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_healthy(url, timeout_s=STARTUP_S, proc=proc, poll_s=1)
        except AssertionError as err:
            tail = log_path.read_text(encoding="utf-8", errors="replace")[-4000:]
            raise AssertionError(f"{err}\n--- server log (tail) ---\n{tail}") from None
        yield {"url": url, "model": model, "adapter": adapter, "log": log_path, "proc": proc}
    finally:
        # dsft exec'd into vLLM, so proc is vLLM's API server: SIGTERM makes it stop its engine processes
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        try:  # anything left in the server's own process group (started above, nothing else)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)


@pytest.fixture(scope="module")
def client(vllm_server):
    return openai.OpenAI(base_url=vllm_server["url"] + "/v1", api_key=KEY, timeout=120, max_retries=0)


def _r1_ref(server, prompt: str, adapter=None):
    from dsft.model.templates import get_template

    return greedy_reference(server["model"], prompt, N, adapter_dir=adapter, chat_template=get_template("r1-distill"))


def _raw_text(msg) -> str:
    """The model's raw output from vLLM's R1 split: reasoning (before </think>) + content."""
    reasoning = getattr(msg, "reasoning", None) or (msg.model_extra or {}).get("reasoning")
    content = msg.content
    if reasoning is None:
        return content or ""
    return reasoning + ("</think>" + content if content is not None else "")


def test_server_was_started_by_dsft_with_the_mapped_flags(vllm_server):
    log = vllm_server["log"].read_text(encoding="utf-8", errors="replace")
    assert "Traceback" not in log
    for want in ("'enable_lora': True", "'max_lora_rank': 8", "'reasoning_parser': 'deepseek_r1'",
                 "'middleware': ['dsft.serve.seed_compat.SeedGenerateMiddleware']", "'max_num_seqs': 4",
                 "'served_model_name': ['tiny']", "'dtype': 'float32'", "'max_model_len': 512"):
        assert want in log, want
    assert KEY not in log  # the key went through $VLLM_API_KEY, not the command line
    assert vllm_server["proc"].poll() is None


def test_models_lists_base_and_adapter_with_parent(client):
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"tiny", "med"}
    assert (cards["med"].model_extra or {}).get("parent") == "tiny"
    assert (cards["tiny"].model_extra or {}).get("parent") is None


@pytest.mark.parametrize("prompt", PROMPTS)
def test_chat_is_transformers_greedy_with_reasoning_split(vllm_server, client, prompt):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                       max_tokens=N, temperature=0)
    c = r.choices[0]
    assert c.finish_reason in ("length", "stop") and r.usage.completion_tokens <= N and r.usage.prompt_tokens > 0
    # the r1 template opens <think> in the prompt, so the parser puts the output before any </think> in `reasoning`
    assert (c.message.model_extra or {}).get("reasoning") or getattr(c.message, "reasoning", None)
    assert_greedy_matches(_raw_text(c.message), _r1_ref(vllm_server, prompt))


def test_chat_stream_equals_non_stream(client):
    msgs = [{"role": "user", "content": PROMPTS[0]}]
    whole = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=N, temperature=0)
    stream = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=N, temperature=0, stream=True)
    reasoning, content, finish, chunks = "", "", None, 0
    for ch in stream:
        if not ch.choices:
            continue
        chunks += 1
        d = ch.choices[0].delta
        reasoning += (d.model_extra or {}).get("reasoning") or getattr(d, "reasoning", None) or ""
        content += d.content or ""
        finish = ch.choices[0].finish_reason or finish
    assert chunks > 2  # really streamed, token by token
    want = whole.choices[0].message
    assert reasoning == ((want.model_extra or {}).get("reasoning") or getattr(want, "reasoning", None) or "")
    assert content == (want.content or "")
    assert finish == whole.choices[0].finish_reason


def test_lora_adapter_is_applied(vllm_server, client):
    prompt = PROMPTS[0]
    base = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                          max_tokens=N, temperature=0).choices[0].message
    med = client.chat.completions.create(model="med", messages=[{"role": "user", "content": prompt}],
                                         max_tokens=N, temperature=0).choices[0].message
    assert _raw_text(med) != _raw_text(base)
    assert_greedy_matches(_raw_text(med), _r1_ref(vllm_server, prompt, adapter=vllm_server["adapter"]))


def test_completions_is_transformers_greedy_on_the_raw_prompt(vllm_server, client):
    r = client.completions.create(model="tiny", prompt="头痛", max_tokens=N, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop")
    assert_greedy_matches(r.choices[0].text, greedy_reference(vllm_server["model"], "头痛", N, raw=True))


def test_bad_request_is_400_with_the_error_envelope(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=0)
    body = e.value.body
    assert e.value.status_code == 400 and body["code"] == 400 and body["type"] == "BadRequestError"
    assert body["param"] == "max_tokens" and "max_tokens" in body["message"]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert e.value.body["code"] == 404 and "nope" in e.value.body["message"]


def test_api_key_is_required(vllm_server):
    url = vllm_server["url"]
    assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 401
    r = httpx.post(f"{url}/generate", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == 401
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).status_code == 200


def test_seed_generate_through_the_middleware(vllm_server, client):
    url, auth = vllm_server["url"], {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{url}/generate", json={"prompt": PROMPTS[1], "max_tokens": N, "temperature": 0},
                   headers=auth, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) == {"text", "finish_reason", "usage"} and out["usage"]["completion_tokens"] <= N
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPTS[1]}],
                                          max_tokens=N, temperature=0)
    assert out["text"] == _raw_text(chat.choices[0].message)  # reasoning kept, as dsft's own /generate does
    assert_greedy_matches(out["text"], _r1_ref(vllm_server, PROMPTS[1]))
    # the middleware's own validation, and vLLM's 400 passed through unchanged
    bad = httpx.post(f"{url}/generate", json={"prompt": "hi", "max_tokens": "many"}, headers=auth, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"
    big = httpx.post(f"{url}/generate", json={"prompt": "hi", "max_tokens": 100000}, headers=auth, timeout=30)
    assert big.status_code == 400 and big.json()["error"]["code"] == 400 and "max_tokens" in big.json()["error"]["message"]


def test_sigterm_stops_vllm_and_its_engine(vllm_server):
    """Last in the module: the server stops on SIGTERM within a bounded time and leaves no process behind."""
    proc = vllm_server["proc"]
    children = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) >= 2  # the API server and vLLM's engine core (and its worker)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    deadline = time.monotonic() + 30
    while subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "vLLM's engine processes outlived the API server by 30 s"
        time.sleep(0.5)
    assert time.monotonic() - t0 < 90
