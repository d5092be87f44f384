"""Export and eval show progress bars on a terminal (pseudo-terminal) and stay quiet when piped (one bar helper,
dsft.report.progress, serves every stage: the piped half is checked on export)."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": SRC}


def _on_tty(cmd: list[str], timeout: float = 600) -> tuple[int, str]:
    """Run cmd with stdin/stdout/stderr on a pseudo-terminal → (exit status, everything it drew)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, env=_env(), stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    drawn = bytearray()
    try:
        while select.select([master], [], [], timeout)[0]:
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:  # EIO once the child has closed the terminal
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        os.close(master)
    return proc.wait(timeout=60), drawn.decode("utf-8", "replace")


def test_export_and_eval_quant_draw_bars_on_a_terminal_only(tmp_path, tiny_base, tiny_adapter):
    dsft = [sys.executable, "-m", "dsft"]
    export = [*dsft, "export", "--model", str(tiny_base), "--adapter", str(tiny_adapter), "--dtype", "float32",
              "--formats", "merged,int8"]
    rc, drawn = _on_tty([*export, "-o", str(tmp_path / "tty")])
    assert rc == 0, drawn[-2000:]
    assert "export: 100%" in drawn and "2/2" in drawn and "variant" in drawn, drawn[-2000:]

    piped = subprocess.run([*export, "-o", str(tmp_path / "piped")], env=_env(), capture_output=True, text=True,
                           timeout=600)
    assert piped.returncode == 0, piped.stderr[-2000:]
    assert "export:" not in piped.stderr and "%|" not in piped.stderr + piped.stdout

    rows = [{"messages": [{"role": "user", "content": f"问题{i}：头痛怎么办？"},
                          {"role": "assistant", "content": "多休息，必要时就医。"}]} for i in range(6)]
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    quant = [*dsft, "eval", "quant", str(tmp_path / "tty"), "--eval-data", str(data)]
    rc, drawn = _on_tty(quant)
    assert rc == 0, drawn[-2000:]
    assert "eval int8" in drawn and ("sample/s" in drawn or "s/sample" in drawn), drawn[-2000:]
