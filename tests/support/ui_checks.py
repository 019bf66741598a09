"""What a user sees in the MLflow UI, checked in headless Chromium driven by Playwright.

Used by tests/plugin/test_ui_browser.py on its own small server, and by `PYTHONPATH=tests python -m support.ui_checks URL
MODEL VERSION OUT_DIR` against a running `tunelens demo` to take the README's screenshots.
"""
from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

CHROMIUM = shutil.which("chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@dataclass
class UiFindings:
    """What the pages showed; each check is asserted by the caller."""

    version_page_text: str
    report_rendered: bool
    report_layer_bars: int
    eval_table_text: str
    side_by_side_rendered: bool
    screenshots: list[Path]


# MLflow's UI opens its assistant panel on a browser's first visit, covering a quarter of the page.
# Its state lives in localStorage as `<key>_v<version>` JSON (the UI's useLocalStorage hook):
# mark the first-visit opening as done and the panel as closed before any page script runs.
CLOSE_ASSISTANT = """
try {
  localStorage.setItem("mlflow.assistant.fab.autoOpenedOnFirstLoad_v1", "true");
  localStorage.setItem("mlflow.assistant.panelOpen_v1", "false");
} catch (e) {}
"""


def _frame_with(page, selector: str, timeout_ms: int):
    """The artifact viewer renders HTML in a sandboxed iframe: find the frame holding `selector`."""
    deadline_steps = timeout_ms // 500
    for _ in range(deadline_steps):
        for frame in page.frames:
            try:
                if frame.query_selector(selector):
                    return frame
            except Exception:  # noqa: BLE001 - frames come and go while the viewer loads
                pass
        page.wait_for_timeout(500)
    return None


def check_ui(url: str, model: str, version: str, out_dir: Path, timeout_ms: int = 60_000) -> UiFindings:
    """Open the version page, the analysis report, the evaluation's table and page (the
    comparison's, for a version compared among several); screenshot each."""
    from mlflow import MlflowClient
    from playwright.sync_api import sync_playwright

    client = MlflowClient(url)
    tags = client.get_model_version(model, version).tags
    analysis_run = client.get_run(tags["tunelens.analysis.run_id"])
    eval_run = client.get_run(tags["tunelens.eval.run_id"])
    # a version evaluated among several candidates points at the comparison's run and pages
    matrix = any(a.path == "tunelens/matrix.html"
                 for a in client.list_artifacts(eval_run.info.run_id, "tunelens"))
    table_file, page_file, table_shot, page_shot = (
        ("matrix_table.json", "matrix.html", "matrix-table.png", "matrix.png") if matrix else
        ("eval_table.json", "side_by_side.html", "evaluation-table.png", "side-by-side.png"))
    out_dir.mkdir(parents=True, exist_ok=True)
    shots: list[Path] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        page.add_init_script(CLOSE_ASSISTANT)

        page.goto(f"{url}/#/models/{model}/versions/{version}")
        page.wait_for_selector("text=tunelens.analysis.status", timeout=timeout_ms)
        page.wait_for_selector("text=tunelens.verdict", timeout=timeout_ms)
        version_text = page.inner_text("body")
        shots.append(out_dir / "version-page.png")
        page.screenshot(path=shots[-1], full_page=True)

        page.goto(f"{url}/#/experiments/{analysis_run.info.experiment_id}/runs/"
                  f"{analysis_run.info.run_id}/artifactPath/tunelens/report.html")
        report = _frame_with(page, "[data-rendered='true']", timeout_ms)
        bars = len(report.query_selector_all("#layer-chart .bar")) if report else 0
        shots.append(out_dir / "analysis-report.png")
        page.screenshot(path=shots[-1])

        page.goto(f"{url}/#/experiments/{eval_run.info.experiment_id}/runs/"
                  f"{eval_run.info.run_id}/artifactPath/tunelens/{table_file}")
        page.wait_for_selector("text=_output", timeout=timeout_ms)
        table_text = page.inner_text("body")
        shots.append(out_dir / table_shot)
        page.screenshot(path=shots[-1])

        # same run page: the artifact viewer does not follow a changed artifactPath in the URL,
        # so open the file from the artifact tree as a user does
        page.get_by_text(page_file, exact=True).click()
        side_by_side = _frame_with(page, "table#rows", timeout_ms)
        shots.append(out_dir / page_shot)
        page.screenshot(path=shots[-1])
        browser.close()
    return UiFindings(version_text, report is not None, bars, table_text, side_by_side is not None,
                      shots)


def add_alias_in_ui(url: str, model: str, version: str, alias: str, screenshot: Path,
                    timeout_ms: int = 60_000) -> str:
    """Add `alias` to the version in its page's alias editor, as a user does (Add, type the alias,
    Enter, Save aliases), and return the text of the alerts saving brought up (the error; empty
    when none showed up); the page is screenshot with the editor open."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        page.add_init_script(CLOSE_ASSISTANT)
        page.goto(f"{url}/#/models/{model}/versions/{version}")
        page.get_by_title("Add aliases").click(timeout=timeout_ms)
        dialog = page.get_by_role("dialog")
        dialog.get_by_role("combobox").fill(alias)
        page.keyboard.press("Enter")
        alerts = dialog.get_by_role("alert")
        shown_before = alerts.all_inner_texts()  # e.g. "also being used on version 1"
        dialog.get_by_role("button", name="Save aliases").click()
        try:
            page.wait_for_function("n => document.querySelectorAll('[role=dialog] [role=alert]')"
                                   ".length > n", arg=len(shown_before), timeout=timeout_ms // 4)
        except PlaywrightTimeout:
            pass
        message = "\n".join(text for text in alerts.all_inner_texts() if text not in shown_before)
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=screenshot)
        browser.close()
    return message


if __name__ == "__main__":
    findings = check_ui(sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4]))
    print("report rendered:", findings.report_rendered, "layer bars:", findings.report_layer_bars,
          "side by side rendered:", findings.side_by_side_rendered)
    print("\n".join(str(p) for p in findings.screenshots))
