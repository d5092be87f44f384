"""What the run page computes from a run's files (views.py)."""

from __future__ import annotations

import json

from dsft.ui.views import data_view


def test_labels_with_equal_counts_are_listed_by_name(tmp_path):
    """Ties used to follow the set's hash order, so the same run's page changed between dashboard processes."""
    names = ["消化科", "心血管科", "肝病科", "神经科", "内分泌科", "呼吸科", "肾内科", "血液科"]
    (tmp_path / "data").mkdir()
    report = {"labels": {"before": {n: 260 for n in names} | {"普通内科": 300}, "after": {n: 5 for n in names}}}
    (tmp_path / "data" / "data_report.json").write_text(json.dumps(report, ensure_ascii=False), encoding="utf-8")
    rows = data_view(tmp_path, {"report": "data_report.json"})["labels"]
    assert [r["label"] for r in rows] == ["普通内科", *sorted(names)]
    assert rows[0]["after"] == 0 and rows[1]["before_pct"] == 100.0 * 260 / 300
