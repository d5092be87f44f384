"""Ollama Modelfile templates (Go text/template) derived from a DeepSeek chat template, and rendering them with Go.

The TEMPLATE is not written by hand per model: its pieces (user tag, assistant tag in history, generation prompt,
end of turn, tool-output wrappers) are read off the Jinja chat template by rendering it on marker conversations, so
R1's `<｜Assistant｜><think>\\n` generation prompt or V3.1's `</think>` tag come out exactly as the template writes
them. `render_go` runs Go's own text/template (the engine Ollama uses) when a Go toolchain is on PATH.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from dsft.errors import ModelError

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
OUT_END = "<｜tool▁output▁end｜>"
U, A, B, S, T1, T2 = "\x01U\x01", "\x01A\x01", "\x01B\x01", "\x01S\x01", "\x01T1\x01", "\x01T2\x01"


def render_jinja(template: str, messages: list[dict[str, Any]], *, add_generation_prompt: bool,
                 bos: str = BOS, eos: str = EOS) -> str:
    """Render a chat template the way transformers does (sandboxed Jinja, trim_blocks + lstrip_blocks)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg: str):
        raise ModelError(f"chat template: {msg}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            bos_token=bos, eos_token=eos)


def _between(text: str, a: str, b: str) -> str:
    i = text.index(a) + len(a)
    return text[i: text.index(b, i)]


def deepseek_pieces(template: str) -> dict[str, str]:
    """The pieces of a `<｜User｜>`-style DeepSeek template, read off renders of marker conversations."""
    def r(msgs, gen=False):
        return render_jinja(template, msgs, add_generation_prompt=gen)

    u, ua = [{"role": "user", "content": U}], [{"role": "user", "content": U}, {"role": "assistant", "content": A}]
    p = {"prefix": r([{"role": "system", "content": S}, *u]).split(S)[0],  # BOS (the system prompt follows)
         "gen": r(u, True)[len(r(u)):], "hist": _between(r(ua), U, A), "eot": r(ua).split(A)[1]}
    p["user"] = r(u).split(U)[0][len(p["prefix"]):]
    tools = [*ua, {"role": "tool", "content": T1}, {"role": "tool", "content": T2}, {"role": "assistant", "content": B}]
    full = r(tools)
    p["out_first"] = _between(full, A + p["eot"], T1)
    mid, after = _between(full, T1, T2), _between(full, T2, B)
    if not (mid.startswith(OUT_END) and after.startswith(OUT_END)):
        raise ModelError("chat template: tool outputs are not closed by <｜tool▁output▁end｜>; cannot derive a Modelfile")
    p["out_next"], p["after_tool"] = mid[len(OUT_END):], after[len(OUT_END):]
    return p


def _lit(s: str) -> str:
    """s as literal template text (a string constant action if it could be read as an action)."""
    return "{{ " + json.dumps(s, ensure_ascii=False) + " }}" if "{{" in s or "}}" in s else s


def deepseek_go_template(template: str, *, with_bos: bool) -> str:
    """An Ollama TEMPLATE rendering chats as the Jinja template's generation prompt does (with_bos: write BOS,
    for tokenizers whose GGUF does not add it by itself)."""
    p = {k: _lit(v) for k, v in deepseek_pieces(template).items()}
    bos = p["prefix"] if with_bos else ""
    return (
        f"{bos}{{{{ if .System }}}}{{{{ .System }}}}{{{{ end }}}}"
        "{{ $tool := false }}{{ $first := true }}"
        "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
        f"{{{{ if eq .Role \"user\" }}}}{{{{ $tool = false }}}}{p['user']}{{{{ .Content }}}}"
        f"{{{{ else if eq .Role \"assistant\" }}}}{{{{ if $tool }}}}{p['after_tool']}{{{{ else }}}}{p['hist']}{{{{ end }}}}"
        f"{{{{ .Content }}}}{{{{ if not $last }}}}{p['eot']}{{{{ end }}}}{{{{ $tool = false }}}}"
        f"{{{{ else if eq .Role \"tool\" }}}}{{{{ if $first }}}}{p['out_first']}{{{{ else }}}}{p['out_next']}{{{{ end }}}}"
        f"{{{{ .Content }}}}{_lit(OUT_END)}{{{{ $tool = true }}}}{{{{ $first = false }}}}"
        "{{ end }}"
        f"{{{{ if and $last (ne .Role \"assistant\") }}}}{{{{ if $tool }}}}{p['after_tool']}{{{{ else }}}}{p['gen']}"
        "{{ end }}{{ end }}{{ end }}"
    )


def drops_history_think(template: str) -> bool:
    """The template cuts a history assistant turn down to the text after `</think>` (R1, V3.1)."""
    text = render_jinja(template, [{"role": "user", "content": U},
                                   {"role": "assistant", "content": "<think>\x01R\x01</think>" + A},
                                   {"role": "user", "content": U}], add_generation_prompt=False)
    return "\x01R\x01" not in text


def ollama_messages(messages: list[dict[str, Any]], *, drop_think: bool) -> dict[str, Any]:
    """The data Ollama gives a TEMPLATE for a chat request: `.System` (system messages joined by a blank line) and
    `.Messages` (role + content of each message, system ones included). drop_think: history turns arrive without their think block
    (Ollama keeps reasoning apart from content for thinking models; here: the text after `</think>`, as the Jinja
    template cuts it)."""
    system = [m.get("content") or "" for m in messages if m.get("role") == "system"]
    out: list[dict[str, str]] = []
    for m in messages:
        content = m.get("content") or ""
        if drop_think and m.get("role") == "assistant" and "</think>" in content:
            content = content.split("</think>")[-1]
        out.append({"Role": str(m.get("role")), "Content": content})
    return {"System": "\n\n".join(system), "Messages": out}


_GO_RENDER = r'''package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type job struct {
	Template string                 `json:"template"`
	Data     map[string]interface{} `json:"data"`
}

func main() {
	var jobs []job
	if err := json.NewDecoder(os.Stdin).Decode(&jobs); err != nil {
		panic(err)
	}
	out := make([]interface{}, len(jobs))
	for i, j := range jobs {
		t, err := template.New("m").Parse(j.Template)
		if err != nil {
			out[i] = map[string]string{"error": err.Error()}
			continue
		}
		var sb strings.Builder
		if err := t.Execute(&sb, j.Data); err != nil {
			out[i] = map[string]string{"error": err.Error()}
			continue
		}
		out[i] = map[string]string{"text": sb.String()}
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
'''


def go_renderer() -> Path | None:
    """A small binary that renders Go text/templates (built once with the Go toolchain), or None without `go`."""
    go = shutil.which("go")
    if go is None:
        return None
    from dsft.model.paths import dsft_home

    tag = hashlib.sha256(_GO_RENDER.encode()).hexdigest()[:12]
    folder = dsft_home() / "tools" / f"gotemplate-{tag}"
    exe = folder / "render"
    if exe.exists():
        return exe
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "main.go").write_text(_GO_RENDER, encoding="utf-8")
    env = {**os.environ, "GOCACHE": os.environ.get("GOCACHE", str(folder / "gocache")), "GO111MODULE": "off",
           "GOFLAGS": ""}
    env.setdefault("HOME", str(folder))
    tmp = folder / f".render-{os.getpid()}"
    res = subprocess.run([go, "build", "-o", str(tmp), "main.go"], cwd=folder, env=env, capture_output=True,
                         text=True, timeout=300)
    if res.returncode != 0:
        raise ModelError(f"building the Go template renderer failed: {res.stderr.strip()[:200]}")
    os.replace(tmp, exe)
    return exe


def render_go(jobs: list[tuple[str, dict[str, Any]]]) -> list[str] | None:
    """Render (Go template, data) pairs with Go's text/template; None when no Go toolchain is installed."""
    exe = go_renderer()
    if exe is None:
        return None
    payload = json.dumps([{"template": t, "data": d} for t, d in jobs], ensure_ascii=False)
    res = subprocess.run([str(exe)], input=payload, capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise ModelError(f"Go template renderer failed: {res.stderr.strip()[:200]}")
    out = []
    for r in json.loads(res.stdout):
        if "error" in r:
            raise ModelError(f"Modelfile TEMPLATE does not render: {r['error'][:200]}")
        out.append(r["text"])
    return out


def gguf_adds_bos(model_dir: str | Path) -> bool:
    """Whether llama.cpp (and so Ollama) adds BOS by itself to a GGUF converted from this folder: the converter
    copies `add_bos_token` from tokenizer_config.json, else reads a TemplateProcessing post-processor that starts
    with BOS. Unset counts as no (the Modelfile then writes BOS itself)."""
    folder = Path(model_dir)
    try:
        cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cfg = {}
    if isinstance(cfg.get("add_bos_token"), bool):
        return bool(cfg["add_bos_token"])
    try:
        post = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")).get("post_processor") or {}
    except (OSError, ValueError):
        return False
    for proc in post.get("processors", [post]):
        single = proc.get("single") or [] if proc.get("type") == "TemplateProcessing" else []
        if len(single) > 1 and (single[0].get("SpecialToken") or {}).get("id") == _token(cfg.get("bos_token")):
            return True
    return False


def _token(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value
