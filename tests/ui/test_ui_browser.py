"""The dashboard in a real headless Chromium over real runs: runs list, run page, form launch with a live loss
curve, stop then resume, schema errors next to the field, compare, and chat (a run's model and an OpenAI URL)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def wait_for(cond, timeout: float = 120.0, every: float = 0.3, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def by_id(drv, el_id: str):
    from selenium.webdriver.common.by import By

    return drv.find_element(By.ID, el_id)


def css(drv, selector: str):
    from selenium.webdriver.common.by import By

    return drv.find_elements(By.CSS_SELECTOR, selector)


def set_field(drv, el_id: str, value: str) -> None:
    el = by_id(drv, el_id)
    el.clear()
    el.send_keys(value)


@pytest.fixture()
def early_demo(request):
    """In one process, start the demo run now so it trains while the form tests run (xdist: each worker its own)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        request.getfixturevalue("demo_run")


def test_bad_values_show_the_schema_error_next_to_the_field_and_line(browser, ui, runs_dir, early_demo, shots):
    browser.get(f"{ui}/new")
    set_field(browser, "f-name", "bad-lr")
    set_field(browser, "f-train.learning_rate", "-0.5")
    set_field(browser, "f-lora.r", "many")
    by_id(browser, "launch").click()
    slot = css(browser, '.field-error[data-for="train.learning_rate"]')[0]
    wait_for(lambda: slot.text, 20, what="the learning-rate error")
    assert "greater than 0" in slot.text and "-0.5" in slot.text
    assert "valid integer" in css(browser, '.field-error[data-for="lora.r"]')[0].text
    assert "invalid" in by_id(browser, "f-train.learning_rate").get_attribute("class")
    assert not css(browser, '.field-error[data-for="train.method"]')[0].text  # only the bad fields are marked
    browser.save_screenshot(str(shots / "ui-new-run.png"))
    assert not (runs_dir / "bad-lr").exists()  # nothing was created or launched

    # the YAML editor: the same schema, errors with their line
    by_id(browser, "tab-yaml").click()
    by_id(browser, "yaml").clear()
    by_id(browser, "yaml").send_keys("model:\n  name_or_path: embedded:tiny-deepseek-v3\ntrain:\n  method: lorax\n")
    by_id(browser, "yaml-validate").click()
    items = wait_for(lambda: [li.text for li in css(browser, "#yaml-errors li")], 20, what="YAML errors")
    assert any(t.startswith("line 4: train.method") for t in items), items


def test_form_launch_shows_the_loss_curve_moving_then_stop_and_resume(browser, ui, runs_dir, shots):
    browser.get(f"{ui}/new")
    for field, value in {"f-name": "form-run", "f-train.max_steps": "400", "f-data.max_samples": "120",
                         "f-data.max_seq_length": "96", "f-train.save_steps": "3", "f-eval.max_samples": "4"}.items():
        set_field(browser, field, value)
    by_id(browser, "launch").click()
    wait_for(lambda: browser.current_url.endswith("/runs/form-run"), 30, what="the run page")
    training = by_id(browser, "training")
    points = lambda: int(training.get_attribute("data-points") or 0)  # noqa: E731
    first = wait_for(points, 240, what="the first training steps on the curve")
    wait_for(lambda: points() >= first + 2, 120, what="the loss curve to move (new SSE points)")
    line = css(browser, "#chart-loss polyline.series")[0]
    assert int(line.get_attribute("data-n")) >= first + 2
    assert by_id(browser, "status").text == "running"
    browser.save_screenshot(str(shots / "ui-run-live.png"))

    # a page reload picks the curve up again (log over HTTP, then SSE from the next line)
    browser.refresh()
    training = by_id(browser, "training")
    wait_for(lambda: points() >= first + 2, 60, what="the curve after a reload")

    rd = runs_dir / "form-run"
    wait_for(lambda: any((rd / "train" / "checkpoints").glob("checkpoint-*")), 120, what="a checkpoint")
    by_id(browser, "stop").click()
    wait_for(lambda: by_id(browser, "status").text == "stopped", 90, what="the run to stop")
    job = json.loads((rd / "ui" / "job.json").read_text(encoding="utf-8"))
    assert job["state"] == "stopped" and job["returncode"] in (130, -2), job  # Ctrl-C: dsft exits 130
    assert not (rd / "train" / "manifest.json").exists()
    steps = [json.loads(x)["step"] for x in (rd / "train" / "log.jsonl").read_text().splitlines() if '"loss"' in x]
    stopped_at = max(steps)
    newest_ckpt = max(int(p.name.split("-")[1]) for p in (rd / "train" / "checkpoints").glob("checkpoint-*"))
    assert newest_ckpt <= stopped_at
    assert by_id(browser, "resume").is_enabled()

    by_id(browser, "resume").click()
    wait_for(lambda: by_id(browser, "status").text == "running", 30, what="the resumed run")
    last_step = lambda: int(by_id(browser, "training").get_attribute("data-last-step") or 0)  # noqa: E731
    wait_for(lambda: last_step() > stopped_at, 240, what="training past the step where it stopped")
    job = json.loads((rd / "ui" / "job.json").read_text(encoding="utf-8"))
    assert job["action"] == "resume" and any("--resume" in c for c in job["commands"][0])
    log = (rd / "ui" / "job.log").read_text(encoding="utf-8")
    assert "resumed from" in log or "--resume auto" in log
    by_id(browser, "stop").click()  # done: do not spend the CPU on the rest of the run
    wait_for(lambda: by_id(browser, "status").text == "stopped", 90, what="the second stop")


def test_finished_demo_run_listed_shown_compared_and_chatted_with(browser, ui, finished_demo, runs_dir, shots):
    browser.get(f"{ui}/")
    row = wait_for(lambda: css(browser, 'tr[data-run="demo"]'), 20, what="the demo row")[0]
    text = row.text
    assert "finished" in text and "lora" in text and "embedded:tiny-deepseek-v3" in text
    assert "accuracy" in text and "12" in text  # 12 steps
    browser.save_screenshot(str(shots / "ui-runs.png"))

    # the run page: plan, data, curves, eval, export, config; Chinese drawn with a CJK font
    browser.set_window_size(1400, 3400)
    try:
        browser.get(f"{ui}/runs/demo")
        wait_for(lambda: by_id(browser, "training").get_attribute("data-points") == "12", 20, what="the 12-step curve")
        assert "FITS" in by_id(browser, "plan").text and len(css(browser, "#plan .bar > div")) >= 4
        data = by_id(browser, "accounting").text
        assert "in 1,667 = kept 300 + dropped 1,367" in data  # max_samples leaves 300 of the packaged 1,667
        assert "内分泌科" in by_id(browser, "labels").text and len(css(browser, "#length-hist > div")) == 20
        assert "accuracy" in by_id(browser, "eval-table").text and css(browser, "table.cm")
        gen = by_id(browser, "generations").text
        assert any("\u4e00" <= ch <= "\u9fff" for ch in gen)  # Chinese prompts, references and generations
        assert "export/merged" in by_id(browser, "artefacts").text and "MiB" in by_id(browser, "artefacts").text
        if (finished_demo / "resolved_config.yaml").is_file():
            assert "max_steps: 12" in by_id(browser, "config-text").text
        else:  # a CLI run that wrote no resolved config says so
            assert "no resolved config" in by_id(browser, "config").text
        # the Chinese glyphs are drawn with a CJK font, not tofu: their rendered width is a full em each
        widths = browser.execute_script(
            "const s = document.createElement('span'); s.style.fontSize = '20px'; s.textContent = '内分泌科心血管科';"
            "document.body.appendChild(s); const w = s.getBoundingClientRect().width; s.remove(); return w;")
        assert 150 <= widths <= 170, widths
        browser.save_screenshot(str(shots / "ui-run.png"))
    finally:
        browser.set_window_size(1400, 1800)

    # compare: the demo against a second run (the form's run when this process made it, else a copy of the demo)
    other = "form-run" if (runs_dir / "form-run" / "train" / "log.jsonl").is_file() else "demo-copy"
    if other == "demo-copy" and not (runs_dir / other).exists():
        shutil.copytree(finished_demo, runs_dir / other)
    browser.get(f"{ui}/")
    for name in ("demo", other):
        css(browser, f'input[type=checkbox][value="{name}"]')[0].click()
    by_id(browser, "compare").click()
    wait_for(lambda: len(css(browser, "#cmp-loss polyline.series")) == 2, 30, what="two overlaid loss curves")
    assert "eval accuracy" in by_id(browser, "cmp-metrics").text or "train loss last" in by_id(browser, "cmp-metrics").text
    browser.save_screenshot(str(shots / "ui-compare.png"))

    check_chat_answers_from_the_runs_model_and_from_an_openai_url(browser, ui, finished_demo, shots)


def _chat(browser, prompt: str) -> str:
    set_field(browser, "prompt", prompt)
    by_id(browser, "send").click()
    done = wait_for(lambda: [m for m in css(browser, ".msg.assistant") if m.get_attribute("data-state") != "streaming"],
                    180, what="the streamed answer")
    assert done[-1].get_attribute("data-state") == "done", done[-1].text
    return done[-1].find_element("css selector", ".text").text


def check_chat_answers_from_the_runs_model_and_from_an_openai_url(browser, ui: str, finished_demo: Path, shots: Path) -> None:
    """The playground streams an answer from the run's exported model, then from a plain OpenAI-compatible URL."""
    browser.get(f"{ui}/chat?run=demo")
    answer = _chat(browser, "头痛、发烧三天，应该怎么办？")
    assert answer.strip()
    assert "merged" in by_id(browser, "chat-msg").text  # the run's exported model answered
    browser.save_screenshot(str(shots / "ui-chat.png"))

    from dsft.config import ServeConfig
    from dsft.serve import serve_in_background

    with serve_in_background(str(finished_demo / "export" / "merged"), ServeConfig(port=0, api_key="k-test")) as url:
        browser.get(f"{ui}/chat")
        from selenium.webdriver.support.ui import Select

        Select(by_id(browser, "target")).select_by_value("url")
        set_field(browser, "base-url", f"{url}/v1")
        set_field(browser, "api-key", "k-test")
        assert _chat(browser, "发烧怎么办？").strip()
        set_field(browser, "api-key", "wrong")
        set_field(browser, "prompt", "咳嗽怎么办？")
        by_id(browser, "send").click()
        err = wait_for(lambda: [m for m in css(browser, ".msg.assistant") if m.get_attribute("data-state") == "error"],
                       60, what="the upstream's 401 shown as an error")
        assert "401" in err[-1].text
