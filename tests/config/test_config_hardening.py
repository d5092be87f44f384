"""Bad configs fail in one short line: bounded values, YAML alias bombs, directories, non-UTF-8 files."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

from dsft.cli_common import parse_overrides
from dsft.config import load_config
from dsft.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def _alias_bomb(levels: int = 8, width: int = 9) -> str:
    lines = [f"l0: &l0 [{', '.join(['x'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    return "\n".join(lines) + f"\ntrain:\n  report_to: *l{levels - 1}\n"


def _one_line_error(path: Path) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_yaml_alias_bomb_is_refused_before_it_expands(tmp_path):
    p = tmp_path / "bomb.yaml"
    p.write_text(_alias_bomb(), encoding="utf-8")  # 9^8 = 43 M strings once expanded
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        msg = _one_line_error(p)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "alias" in msg and len(msg) < 300
    assert peak < 5 * 2**20, f"peak {peak / 2**20:.1f} MiB while refusing the bomb"
    assert time.perf_counter() - t0 < 5


def test_sane_aliases_still_work(tmp_path):
    p = tmp_path / "ok.yaml"
    p.write_text("data:\n  dedup_fields: &fields [question, answer]\n  near_dedup: {fields: *fields}\n", encoding="utf-8")
    cfg = load_config(p)
    assert cfg.data.dedup_fields == cfg.data.near_dedup.fields == ["question", "answer"]


def test_recursive_alias_is_one_line(tmp_path):
    p = tmp_path / "rec.yaml"
    p.write_text("train:\n  report_to: &a [*a]\n", encoding="utf-8")
    assert "recursive" in _one_line_error(p) or "alias" in _one_line_error(p)


@pytest.mark.parametrize("yaml_text,key", [
    ("train:\n  num_train_epochs: '{}'\n", "train.num_train_epochs"),
    ("model:\n  name_or_path: [{}]\n", "model.name_or_path"),
    ("train:\n  ? {}\n  : 1\n", "unknown key"),  # explicit keys: YAML caps simple keys at 1,024 characters
    ("training_args:\n  ? {}\n  : 1\nmodel_name: x\n", "unknown key"),
])
def test_error_quotes_at_most_200_characters_of_the_value(tmp_path, yaml_text, key):
    p = tmp_path / "long.yaml"
    p.write_text(yaml_text.format("头" * 50_000), encoding="utf-8")
    msg = _one_line_error(p)
    assert key in msg and msg.count("头") <= 200 and len(msg) < 1000


def _flow_bomb(levels: int = 8, width: int = 9) -> str:
    items = [f"&l0 [{', '.join(['x'] * width)}]"]
    items += [f"&l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "[" + ", ".join(items) + "]"


def test_long_or_exploding_override_values_are_bounded():
    with pytest.raises(ConfigError) as e:
        load_config(None, parse_overrides(["train.num_train_epochs=" + "x" * 100_000]))
    assert len(str(e.value)) < 400 and "characters" in str(e.value)
    with pytest.raises(ConfigError, match="expected KEY=VALUE") as e:
        parse_overrides(["y" * 100_000])
    assert len(str(e.value)) < 400
    with pytest.raises(ConfigError, match="alias") as e:
        parse_overrides(["train.report_to=" + _flow_bomb()])
    assert "\n" not in str(e.value)


def test_directory_and_non_utf8_configs_are_one_line(tmp_path):
    assert "is a directory" in _one_line_error(tmp_path)
    p = tmp_path / "gbk.yaml"
    p.write_bytes("data:\n  system_prompt: 你是医生\n".encode("gb18030"))
    msg = _one_line_error(p)
    assert "not UTF-8" in msg and "line 2" in msg


def _dsft(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "dsft", *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=300)


@pytest.mark.parametrize("argv", [["train", "{dir}"], ["serve", "--config", "{dir}", "--model", "embedded:tiny-deepseek-v3"],
                                  ["data", "prepare", "{bad}"]])
def test_cli_bad_config_exits_2_with_one_line(tmp_path, argv):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"train:\n  seed: \xff\xfe\n")
    r = _dsft(*[a.format(dir=tmp_path, bad=bad) for a in argv], cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("dsft: error:") and "Traceback" not in r.stderr
    assert ("is a directory" in lines[0]) or ("not UTF-8" in lines[0])
