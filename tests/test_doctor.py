"""`dsft doctor MODEL_DIR` on real tokenizer folders: a good template (exit 0), a broken one (exit 1, one line naming
the token and both snippets), bad input (exit 2, one line); and the train stage's refusal of the broken one."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from dsft.cli import main
from dsft.errors import TrainError
from dsft.model.tokenizer import load_tokenizer, resolve_tokenizer_path
from dsft.train.encode import check_template_parity


def _folder(tmp_path, name: str, template: str | None = None):
    src = resolve_tokenizer_path("deepseek-r1-distill-qwen-7b")
    dest = tmp_path / name
    shutil.copytree(src, dest)
    if template is not None:
        cfg = json.loads((dest / "tokenizer_config.json").read_text(encoding="utf-8"))
        cfg["chat_template"] = template
        (dest / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False), encoding="utf-8")
    return dest


def _broken(tmp_path):
    """R1-Distill's template whose generation prompt adds a newline its history form does not have."""
    tpl = json.loads((resolve_tokenizer_path("deepseek-r1-distill-qwen-7b") / "tokenizer_config.json")
                     .read_text(encoding="utf-8"))["chat_template"]
    tpl = tpl.replace("{{'<｜Assistant｜><think>\\n'}}", "{{'<｜Assistant｜>\\n'}}")
    tpl = tpl.replace("{% set content = content.split('</think>')[-1] %}", "")
    assert "<｜Assistant｜>\\n'" in tpl
    return _folder(tmp_path, "broken", tpl)


def test_doctor_on_a_good_folder_exits_0_with_the_table(tmp_path):
    good = _folder(tmp_path, "good")
    res = subprocess.run([sys.executable, "-m", "dsft", "doctor", str(good)], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "train" in out and "serve" in out and "vllm" in out and "modelfile" in out
    assert "multi-turn, history think #3" in out and out.rstrip().endswith("dsft doctor: ok")


def test_doctor_on_a_broken_template_exits_1_naming_the_token(tmp_path, capsys):
    rc = main(["doctor", str(_broken(tmp_path))])
    out = capsys.readouterr().out
    assert rc == 1
    last = out.rstrip().splitlines()[-1]
    assert last.startswith("dsft doctor: template parity (broken): the train path differs")
    assert "at token" in last and "vs inference" in last and "\\n" in last  # both snippets, the extra newline shown
    assert "≠" in out  # the table marks the differing cells


def test_doctor_json(tmp_path, capsys):
    rc = main(["doctor", str(_broken(tmp_path)), "--json"])
    table = json.loads(capsys.readouterr().out)
    assert rc == 1 and table["ok"] is False
    bad = [c for c in table["checks"] if c["status"] == "diff"]
    assert {c["path"] for c in bad} >= {"train"} and all(isinstance(c["position"], int) for c in bad)


@pytest.mark.parametrize("args,msg", [(["doctor", "/nonexistent/model"], "not a model folder")])
def test_doctor_bad_input_is_one_line_exit_2(args, msg, capsys):
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_doctor_folder_without_template_is_refused(tmp_path, capsys):
    folder = _folder(tmp_path, "plain")
    cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg.pop("chat_template")
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    assert main(["doctor", str(folder)]) == 2
    assert "no chat template" in capsys.readouterr().err


def test_train_refuses_the_broken_template_unless_forced(tmp_path, caplog):
    tok = load_tokenizer(str(_broken(tmp_path)))
    records = [{"messages": [{"role": "user", "content": "头痛怎么办？"}, {"role": "assistant", "content": "多休息。"}]}]
    with pytest.raises(TrainError) as e:
        check_template_parity(tok, records, template="broken", force=False)
    line = str(e.value)
    assert "\n" not in line and "at token" in line and "model.force_template: true" in line
    assert "--force-template" in line
    table = check_template_parity(tok, records, template="broken", force=True)
    assert not table.ok and "training anyway" in caplog.text
    assert "your data, record 1" in {c.conversation for c in table.checks}


def test_train_cli_force_template_sets_the_config_key(tmp_path, monkeypatch):
    from dsft.train import cli as train_cli

    seen = {}

    def fake_config_and_run(args):
        seen["overrides"] = list(args.overrides)
        raise SystemExit(0)

    monkeypatch.setattr("dsft.cli_common.config_and_run", fake_config_and_run)
    import argparse

    p = argparse.ArgumentParser()
    train_cli.register(p.add_subparsers())
    args = p.parse_args(["train", "cfg.yaml", "--force-template"])
    with pytest.raises(SystemExit):
        args.func(args)
    assert "model.force_template=true" in seen["overrides"]
