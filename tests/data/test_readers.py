"""Readers and schemas on real and hand-built files; bad input gives one line with file and line number."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dsft.config import DataConfig, config_from_dict
from dsft.data.load import load_records
from dsft.data.readers import decode_bytes
from dsft.data.stage import run as prepare
from dsft.errors import DataError
from dsft.run import RunDir, read_jsonl

ROOT = Path(__file__).resolve().parents[2]
QA = {"question": "头痛怎么办？", "context": "头痛三天了", "answer": "多休息，必要时就医。", "domain": "神经科"}


def _load(path, **kw):
    return load_records(DataConfig(path=str(path), **kw), strict=kw.pop("strict", False))


def test_gb18030_detected_and_wrong_encoding_names_the_line(medical_csv, tmp_path):
    recs, rej, info = _load(medical_csv)
    assert info[0]["encoding"] == "gb18030" and info[0]["schema"] == "seed" and len(recs) == 7644 and not rej
    assert recs[0]["id"].endswith(":2") and recs[0]["domain"] and recs[0]["fields"]["answer"]
    with pytest.raises(DataError) as e:
        _load(medical_csv, encoding="utf-8")
    msg = str(e.value)
    assert "\n" not in msg and str(medical_csv) in msg and ":2: not valid utf-8" in msg
    # one bad byte deep in a UTF-8 file: auto mode falls back to GB18030 only if that decodes; 0xff never does
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"question": "a", "answer": "b"}\n' * 3 + b'{"question": "\xff", "answer": "b"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:4: cannot decode"):
        _load(p)


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
def test_utf8_and_bom_csv_tsv_parquet(tmp_path, bom):
    header = "title,ask,answer,department\n"
    body = "头痛怎么办？,头痛三天了,多休息。,神经科\n胃痛,饭后胃痛,少食多餐。,消化科\n"
    (tmp_path / "a.csv").write_bytes(bom + (header + body).encode("utf-8"))
    (tmp_path / "a.tsv").write_bytes(bom + (header + body).replace(",", "\t").encode("utf-8"))
    pq.write_table(pa.Table.from_pylist([QA, {**QA, "answer": "另一个答案。"}]), tmp_path / "a.parquet")
    for name in ("a.csv", "a.tsv", "a.parquet"):
        recs, rej, info = _load(tmp_path / name)
        assert len(recs) == 2 and not rej, name
        assert recs[0]["fields"]["question"] == "头痛怎么办？" and recs[0]["label"] == "神经科", name
        assert recs[0]["messages"][0] == {"role": "user", "content": "头痛怎么办？\n头痛三天了"}


def test_jsonl_broken_line_is_one_clear_error(tmp_path):
    p = tmp_path / "b.jsonl"
    p.write_text(json.dumps(QA, ensure_ascii=False) + "\n\n" + '{"question": "x", "answer": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"b\.jsonl:3: not valid JSON"):
        _load(p)


def test_json_array_line_numbers_and_rejections(tmp_path):
    rows = [QA, {**QA, "answer": ""}, {"question": ["list"], "answer": "x"}, QA]
    p = tmp_path / "c.json"
    p.write_text("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n]\n", encoding="utf-8")
    recs, rej, _ = _load(p)
    assert [r["source"]["line"] for r in recs] == [2, 5]
    assert [(r["line"], r["reason"]) for r in rej] == [(3, "empty_answer"), (4, "bad_type")]
    with pytest.raises(DataError, match=r"c\.json:3: empty_answer: .*--strict"):
        load_records(DataConfig(path=str(p)), strict=True)


def test_jsonl_saved_as_json(tmp_path):
    p = tmp_path / "x.json"
    p.write_text(json.dumps(QA, ensure_ascii=False) + "\n" + json.dumps(QA, ensure_ascii=False) + "\n", encoding="utf-8")
    recs, _, _ = _load(p)
    assert [r["source"]["line"] for r in recs] == [1, 2]


def test_csv_unclosed_quote_names_the_line(tmp_path):
    p = tmp_path / "q.csv"
    p.write_text('title,answer\n头痛,多休息。\n"胃痛,少吃\n辣\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"q\.csv:3: unreadable CSV row"):
        _load(p)


def test_csv_missing_mapped_column(medical_csv):
    with pytest.raises(DataError) as e:
        _load(medical_csv, columns={"question": "title", "answer": "doctor_reply"})
    assert "column 'doctor_reply' (data.columns.answer) not found" in str(e.value) and ":1:" in str(e.value)


def test_alpaca_with_history_and_system(alpaca_json, tmp_path):
    recs, rej, info = _load(alpaca_json)
    assert info[0]["schema"] == "alpaca" and len(recs) == 1000 and not rej
    p = tmp_path / "h.json"
    p.write_text(json.dumps([{"instruction": "再说一遍", "input": "", "output": "好的。", "system": "你是医生",
                              "history": [["你好", "你好！"]]}], ensure_ascii=False), encoding="utf-8")
    (r,), _, _ = _load(p)
    assert [m["role"] for m in r["messages"]] == ["system", "user", "assistant", "user", "assistant"]


def test_sharegpt_tool_calls_and_openai_messages(sharegpt_json, tmp_path):
    recs, rej, info = _load(sharegpt_json)
    assert info[0]["schema"] == "sharegpt" and len(recs) + len(rej) == 300
    withtool = [r for r in recs if any(m["role"] == "tool" for m in r["messages"])]
    assert withtool and all(r["tools"] for r in withtool)
    # the tool schema is in the system turn (the model must see what it is trained to call)
    assert withtool[0]["messages"][0]["role"] == "system" and withtool[0]["tools"] in withtool[0]["messages"][0]["content"]
    # function_call turns are assistant text (never content None) so every chat template keeps them
    call = next(m for m in withtool[0]["messages"] if m["role"] == "assistant")
    assert json.loads(call["content"])["name"]
    p = tmp_path / "o.jsonl"
    p.write_text(json.dumps({"messages": [
        {"role": "user", "content": [{"type": "text", "text": "查天气"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"北京\"}"}}]},
        {"role": "tool", "content": "晴"}, {"role": "assistant", "content": "北京今天晴。"}]}, ensure_ascii=False) + "\n", encoding="utf-8")
    (r,), _, info = _load(p)
    assert info[0]["schema"] == "openai" and r["messages"][0]["content"] == "查天气"
    assert json.loads(r["messages"][1]["content"]) == {"name": "weather", "arguments": {"city": "北京"}}


def test_text_and_decode_bytes():
    assert decode_bytes("头痛三天了，怎么办？".encode("gb18030"), "x")[1] == "gb18030"
    assert decode_bytes(b"\xef\xbb\xbfabc", "x") == ("abc", "utf-8-sig")


def test_empty_dataset_is_an_error(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n", encoding="utf-8")
    cfg = config_from_dict({"run_dir": str(tmp_path / "r"), "data": {"path": str(tmp_path / "e.jsonl")}})
    with pytest.raises(DataError, match="no records"):
        prepare(cfg, RunDir(cfg.run_dir))


def test_rejected_jsonl_counts(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in [QA, {**QA, "question": "", "context": ""}, 5]) + "\n", encoding="utf-8")
    cfg = config_from_dict({"run_dir": str(tmp_path / "r"), "data": {"path": str(p), "test_size": 0.5}})
    m = prepare(cfg, RunDir(cfg.run_dir))
    rej = read_jsonl(Path(cfg.run_dir) / "data" / "rejected.jsonl")
    assert [(r["line"], r["reason"]) for r in rej] == [(2, "empty_question"), (3, "not_an_object")]
    assert m["counts"]["dropped"] == {"empty_question": 1, "not_an_object": 1} and m["counts"]["kept"] == 1


def _dsft(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-m", "dsft", *args], capture_output=True, text=True, timeout=120, env=env)


def test_cli_prepare_stats_and_errors(tmp_path, medical_csv):
    r = _dsft("data", "prepare", "--run-dir", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    assert "1667 in" in r.stdout and (tmp_path / "run" / "data" / "manifest.json").exists()
    r = _dsft("data", "prepare", "--run-dir", str(tmp_path / "run"))
    assert r.returncode == 2 and "--force" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _dsft("data", "prepare", "--run-dir", str(tmp_path / "r2"), "--set", f"data.path={medical_csv}",
              "--set", "data.encoding=utf-8")
    assert r.returncode == 2 and r.stderr.startswith("dsft: error: ") and len(r.stderr.strip().splitlines()) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(QA, ensure_ascii=False) + "\n" + json.dumps({**QA, "answer": " "}, ensure_ascii=False) + "\n",
                   encoding="utf-8")
    r = _dsft("data", "prepare", "--run-dir", str(tmp_path / "r3"), "--set", f"data.path={bad}", "--strict")
    assert r.returncode == 2 and f"{bad}:2: empty_answer" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _dsft("data", "stats", str(medical_csv))
    assert r.returncode == 0 and "gb18030" in r.stdout and "肝病科 3121" in r.stdout
    r = _dsft("data", "stats", "embedded:medical", "--json", "--tokenizer", "embedded:tiny-deepseek-v3")
    st = json.loads(r.stdout)
    assert st["records"] == 1667 and st["exact_duplicates"] == 33 and st["lengths_tokens"]["answer"]["count"] == 1667


def test_sharegpt_tool_calls_render_with_the_deepseek_template(sharegpt_json):
    """function_call turns are assistant text and observations tool turns: the real V3 template renders all of them."""
    from dsft.model.tokenizer import load_tokenizer

    recs, _, _ = _load(sharegpt_json, label_field=None)
    tok = load_tokenizer("embedded:tiny-deepseek-v3")
    rendered = [tok.apply_chat_template(r["messages"], tokenize=False) for r in recs]
    assert len(rendered) == 300 and all("<｜Assistant｜>" in x for x in rendered)
    assert sum("<｜tool▁output▁begin｜>" in x for x in rendered) > 100


def test_cli_split_streams(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({**QA, "id": str(i), "label": "AB"[i % 2]}) + "\n" for i in range(100)), encoding="utf-8")
    r = _dsft("data", "split", str(src), "-o", str(tmp_path / "s"), "--test-size", "0.2", "--buffer", "10")
    assert r.returncode == 0, r.stderr
    assert len(read_jsonl(tmp_path / "s" / "test.jsonl")) == 20 and len(read_jsonl(tmp_path / "s" / "train.jsonl")) == 80
    src.write_text('{"a": 1}\n{broken\n', encoding="utf-8")
    r = _dsft("data", "split", str(src), "-o", str(tmp_path / "s2"))
    assert r.returncode == 2 and "in.jsonl:2: not valid JSON" in r.stderr


def test_mapping_covers_other_schemas(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text(json.dumps({"prompt": "头痛怎么办？", "completion": "多休息。", "dept": "神经科"}, ensure_ascii=False) + "\n"
                 + json.dumps({"dialog": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！"}]}, ensure_ascii=False)
                 + "\n", encoding="utf-8")
    (r,), rej, info = _load(p, columns={"instruction": "prompt", "output": "completion", "domain": "dept"})
    assert info[0]["schema"] == "alpaca" and r["fields"]["question"] == "头痛怎么办？" and r["label"] == "神经科"
    assert rej[0]["reason"] == "empty_question"  # the second row has no prompt/completion: rejected, not lost
    q = tmp_path / "s.jsonl"
    q.write_text(json.dumps({"dialog": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！"}]},
                            ensure_ascii=False) + "\n", encoding="utf-8")
    (r,), _, info = _load(q, columns={"conversations": "dialog"})
    assert info[0]["schema"] == "sharegpt" and r["messages"][-1] == {"role": "assistant", "content": "你好！"}


def test_any_column_can_be_the_label(tmp_path):
    p = tmp_path / "l.csv"
    p.write_text("title,answer,specialty\n头痛怎么办？,多休息。,神经\n胃痛,少食多餐。,消化\n", encoding="utf-8")
    recs, _, _ = _load(p, label_field="specialty")
    assert [r["label"] for r in recs] == ["神经", "消化"] and recs[0]["domain"] is None


def test_json_object_file_single_record_or_wrapper(tmp_path):
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！"}]},
                              ensure_ascii=False), encoding="utf-8")
    recs, _, info = _load(one)
    assert len(recs) == 1 and info[0]["schema"] == "sharegpt"
    wrap = tmp_path / "wrap.json"
    wrap.write_text(json.dumps({"version": 1, "data": [QA, {**QA, "answer": "另一个答案。"}]}, ensure_ascii=False), encoding="utf-8")
    recs, _, info = _load(wrap)
    assert len(recs) == 2 and info[0]["schema"] == "seed"
