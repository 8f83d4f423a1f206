"""The MLflow UI in a real browser: headless Chromium, driven by Playwright, against `mlflow ui` on a
free port of 127.0.0.1, over a store made by running the smoke study (one epoch) and `kdablate
report` on it. What a reader of a study sees there: the experiment with its description, the
cells as child runs of one parent run, grouped by arm or by role, and the parent's report.html
drawn with its figures (report.md links its files through the server).

Needs the `playwright` package and a Chromium (Debian: `apt-get install chromium`, at
/usr/bin/chromium; elsewhere set KDABLATE_CHROMIUM); `playwright install` and its browser
download are not needed. Without them every test here skips, saying which is missing.
Screenshots go to the tests' temporary folder, or to KDABLATE_SCREENSHOTS when it is set.
"""
from __future__ import annotations

import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pytest

from kdablate import cli, tracking
from kdablate.runner import RunOptions, roles, run_study
from kdablate.study import Study, load_study

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path(os.environ.get("KDABLATE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
TIMEOUT_MS = 60_000  # two slow cores: the UI's first load of a page can take seconds


@dataclasses.dataclass(frozen=True)
class Smoke:
    """The store the UI shows: the smoke study's runs and its report, logged to the parent run."""

    folder: Path
    uri: str
    study: Study
    experiment: str
    parent: str
    children: dict[str, str]  # run id -> arm
    report: Path  # the report's folder on disk (what was logged under figures/)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check: Callable[[], Any], timeout: float = TIMEOUT_MS / 1000, what: str = "") -> Any:
    """``check()``'s first truthy value, polled; AssertionError naming ``what`` after ``timeout`` s."""
    deadline, value = time.time() + timeout, None
    while time.time() < deadline:
        if value := check():
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}: last saw {value!r}")


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.status == 200, url
        return r.read()


@pytest.fixture(scope="module")
def chromium():
    """A headless Chromium, or a skip that says what is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; no `playwright install` needed)")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set KDABLATE_CHROMIUM)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def smoke(chromium, tmp_path_factory) -> Smoke:
    """The smoke study at one epoch into a fresh SQLite store, then `kdablate report` on it."""
    folder = tmp_path_factory.mktemp("mlflow_ui")
    uri = f"sqlite:///{folder / 'mlruns.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(folder)
        study = load_study(ROOT / "studies" / "smoke.yaml", ["optim.epochs=1"])
        assert run_study(study, RunOptions(cache_dir=folder / "cache", progress=False)) == 0
        # `kdablate report` takes no overrides: this file names the same cells as smoke.yaml at one epoch.
        path = folder / "smoke.yaml"
        path.write_text(f"extends: {ROOT / 'studies' / 'smoke.yaml'}\nbase: {{optim: {{epochs: 1}}}}\n")
        assert [c.config_hash() for c in load_study(path).cells] == [c.config_hash() for c in study.cells]
        assert cli.main(["report", str(path), "--out", str(folder / "figures")]) == 0
        client = tracking.client()
        exp = client.get_experiment_by_name(study.name).experiment_id
        runs = client.search_runs([exp], max_results=1000)
    parents = [r.info.run_id for r in runs if r.data.tags.get("kind") == "study"]
    assert len(parents) == 1
    children = {r.info.run_id: r.data.tags["arm"] for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0]}
    assert len(children) == len(study.cells) == len(runs) - 1
    return Smoke(folder, uri, study, exp, parents[0], children, folder / "figures" / study.name)


@dataclasses.dataclass(frozen=True)
class Ui:
    """`kdablate ui smoke` serving the store: its base URL and the link it printed."""

    url: str
    link: str
    printed: str


@pytest.fixture(scope="module")
def ui(smoke):
    """`kdablate ui` on the store, on a free port of 127.0.0.1, as a user starts it beside the study
    file (./smoke.yaml); what it prints, read once its link line appears."""
    port, out = free_port(), smoke.folder / "kdablate_ui.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": smoke.uri, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    with open(out, "w") as log:  # its own session: the mlflow server it starts goes with it
        proc = subprocess.Popen([sys.executable, "-m", "kdablate.cli", "ui", "smoke", "--host", "127.0.0.1",
                                 "--port", str(port)], cwd=smoke.folder, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        printed = wait_until(lambda: proc.poll() is not None or ("MLflow UI on" in out.read_text() and out.read_text()),
                             180, "kdablate ui to print its link")
        assert proc.poll() is None, out.read_text()[-3000:]
        assert healthy(url)  # the link is printed only once the server answers
        link = re.search(r"MLflow UI on \S+: (\S+)", printed).group(1)
        yield Ui(url, link, printed)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(ui) -> str:
    return ui.url


def healthy(url: str) -> bool:
    try:
        return fetch(f"{url}/health") is not None
    except OSError:
        return False


@pytest.fixture
def page(chromium, server):
    """A fresh page (its own context: the UI keeps view state per browser profile), en-US."""
    context = chromium.new_context(locale="en-US", viewport={"width": 1600, "height": 1200}, base_url=server)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    yield page
    context.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("KDABLATE_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def row_ids(page) -> set[str]:
    """The run ids of the runs table's rows (AG Grid repeats a row once per pinned part)."""
    return set(page.locator(".ag-row").evaluate_all("rows => rows.map(r => r.getAttribute('row-id'))"))


def name_x(page, run_id: str) -> float:
    """Where the run's name starts in the runs table (children are drawn indented under their parent)."""
    return page.locator(f'.ag-row[row-id="{run_id}"] a[href$="/runs/{run_id}"]').first.bounding_box()["x"]


def test_the_experiment_lists_its_cells_under_one_parent_run(page, smoke, shots):
    """The runs table of `smoke`: one top-level run, the parent; its expander shows every cell
    run, indented under it."""
    page.goto(f"/#/experiments/{smoke.experiment}/runs")
    parent = page.locator(f'.ag-row[row-id="{smoke.parent}"]').first
    parent.wait_for()
    assert page.get_by_text(f"{len(smoke.children) + 1} matching runs").is_visible()
    assert row_ids(page) == {smoke.parent}  # the cells are folded into it
    parent.locator('button[data-component-id*="runnamecellrenderer"]').click()  # the parent's expander
    wait_until(lambda: row_ids(page) == {smoke.parent, *smoke.children}, what="the child runs")
    names = {page.locator(f'.ag-row[row-id="{r}"] a[href$="/runs/{r}"]').first.inner_text() for r in smoke.children}
    assert names == {f"{c.arm}/seed{c.seed}" for c in smoke.study.cells}
    assert min(name_x(page, r) for r in smoke.children) > name_x(page, smoke.parent) + 5
    page.screenshot(path=shots / "runs_under_parent.png")


def test_the_parents_report_html_shows_its_figures(page, smoke, server, shots):
    """figures/report.html in the parent's artifacts: MLflow draws it in a frame, every figure an
    embedded PNG that decodes, the tables as tables, and its links pointing at files the server has."""
    page.goto(f"/#/experiments/{smoke.experiment}/runs/{smoke.parent}/artifacts/figures/report.html")
    frame = page.frame_locator("iframe.mlflow-html-iframe")
    frame.locator("h1").wait_for()
    assert frame.locator("h1").inner_text() == f"Study {smoke.study.name}"
    figures = re.findall(r"^!\[", (smoke.report / "report.md").read_text(), flags=re.M)
    images = frame.locator("img")
    drawn = wait_until(lambda: (found := images.evaluate_all(
        "is => is.map(i => [i.getAttribute('src').slice(0, 22), i.complete && i.naturalWidth > 100])"))
        and all(ok for _, ok in found) and found, what="the figures to decode")
    assert len(drawn) == len(figures) >= 5 and {src for src, _ in drawn} == {"data:image/png;base64,"}
    arms = set(frame.locator("table").first.locator("tbody tr td:first-child").all_inner_texts())
    assert arms == {c.arm for c in smoke.study.cells}
    links = frame.locator("a.artifact").evaluate_all("as => as.map(a => a.href)")
    assert links and all(h.startswith(f"{server}/get-artifact?path=figures%2F") for h in links)
    csv = next(h for h in links if "table.csv" in h)
    assert fetch(csv) == (smoke.report / "table.csv").read_bytes()
    page.screenshot(path=shots / "report_html.png")
    frame.locator("figure").first.screenshot(path=shots / "report_html_figure.png")  # as drawn in the frame


def test_the_parents_report_md_links_its_files_through_the_server(page, smoke, shots):
    """figures/report.md in MLflow's Markdown view: links to the files beside it open them (not a
    404 at the server's root), no figure is left as literal '[x](x.png)' text, and it names
    report.html for the figures."""
    page.goto(f"/#/experiments/{smoke.experiment}/runs/{smoke.parent}/artifacts/figures/report.md")
    csv = page.get_by_role("link", name="CSV", exact=True).first
    csv.wait_for()
    assert csv.get_attribute("href") == f"get-artifact?path=figures%2Ftable.csv&run_uuid={smoke.parent}"
    assert fetch(csv.evaluate("a => a.href")) == (smoke.report / "table.csv").read_bytes()
    assert page.get_by_text(re.compile(r"\]\([a-z_]+\.png\)")).count() == 0
    assert page.get_by_text("report.html", exact=True).first.is_visible()
    page.screenshot(path=shots / "report_md.png")


def group_by(page, key: str) -> set[str]:
    """Group the runs table by the tag ``key``; the groups' names once they are drawn."""
    page.get_by_role("button", name="Group by").click()
    page.get_by_role("menu").get_by_placeholder("Search").fill(key)
    # The menu lists Tags, then Params (cells also log 'arm' as a param): the first item after 'Tags'.
    page.locator("xpath=//div[text()='Tags']/following-sibling::div[@role='menuitemcheckbox'][1]").click()
    page.keyboard.press("Escape")
    groups = page.get_by_text(re.compile(r"^Group: "))
    groups.first.wait_for()
    time.sleep(1)  # the groups are drawn together, but give the grid a moment to settle
    return {t.removeprefix("Group: ") for t in groups.all_inner_texts()}


def test_the_runs_group_by_arm(page, smoke, shots):
    page.goto(f"/#/experiments/{smoke.experiment}/runs")
    assert group_by(page, "arm") == {c.arm for c in smoke.study.cells}
    page.screenshot(path=shots / "group_by_arm.png")


def test_the_runs_group_by_role(page, smoke):
    """Each cell run's 'role' tag: the baseline, the reference arms, the rest 'arm'."""
    page.goto(f"/#/experiments/{smoke.experiment}/runs")
    declared = dict(roles(smoke.study))
    assert group_by(page, "role") == {declared.get(c.arm, "arm") for c in smoke.study.cells}


def test_the_experiment_shows_the_study_description(page, smoke):
    page.goto(f"/#/experiments/{smoke.experiment}/runs")
    page.get_by_text(smoke.study.config.description, exact=True).first.wait_for()


PLOT_TRACES = """card => ({
    bars: card.querySelectorAll('.main-svg g.barlayer .trace.bars .point path').length,
    lines: card.querySelectorAll('.main-svg g.scatterlayer .trace.scatter .lines path.js-line').length,
    x: (card.querySelector('.main-svg .g-xtitle text') || {}).textContent || '',
})"""


def test_the_chart_view_draws_summaries_as_bars_and_epochs_as_lines(page, smoke, shots):
    """The runs page's chart view, with the parent unfolded so its cells are charted: a cell's
    summary metric (logged at step 0) is drawn as a bar chart, a per-epoch metric (logged at steps
    1..epochs; one epoch here) as a line chart over steps. The UI picks a line chart when some run's
    latest step of the metric is >= 1, a bar chart otherwise: plotly's bar traces in the first card,
    its scatter traces (with their line paths) and a 'Step' x axis in the second."""
    page.goto(f"/#/experiments/{smoke.experiment}/runs?compareRunsMode=CHART")
    parent = page.locator(f'.ag-row[row-id="{smoke.parent}"]').first
    parent.wait_for()
    parent.locator('button[data-component-id*="runnamecellrenderer"]').click()  # chart the cells, not the parent
    wait_until(lambda: row_ids(page) == {smoke.parent, *smoke.children}, what="the child runs")
    # The charts are drawn only when scrolled into view: the search (a regex) leaves just these two.
    page.get_by_placeholder("Search metric charts").fill("^(report/test_acc|val/acc)$")
    cards = page.get_by_test_id("experiment-view-compare-runs-card")
    card = {name: cards.filter(has=page.locator(f'h4[title="{name}"]')) for name in ("report/test_acc", "val/acc")}
    drawn = wait_until(lambda: (found := {name: c.evaluate(PLOT_TRACES) for name, c in card.items() if c.count()})
                       and len(found) == 2 and all(t["bars"] or t["lines"] for t in found.values()) and found,
                       what="both charts to be drawn")
    assert drawn["report/test_acc"]["bars"] > 0 and drawn["report/test_acc"]["lines"] == 0, drawn
    assert drawn["val/acc"]["lines"] > 0 and drawn["val/acc"]["bars"] == 0, drawn
    assert drawn["val/acc"]["x"] == "Step", drawn
    page.screenshot(path=shots / "chart_view.png")


def ml_mode(page) -> bool:
    """Whether the UI shows Model training mode (its nav: Runs, Models, Model registry), not GenAI
    mode (Overview, Observability, Sessions, ... and the runs as 'Training runs')."""
    nav = page.get_by_role("link", name="Model registry")
    nav.first.wait_for()
    return nav.first.is_visible() and page.get_by_text("Observability", exact=True).count() == 0


def test_the_printed_link_opens_the_runs_in_model_training_mode(page, smoke, ui, shots):
    """`kdablate ui smoke`, run beside ./smoke.yaml, prints the experiment's link once the server
    answers, with the two recipes; the link opens the runs table in Model training mode. (MLflow
    3.17 keeps the mode in the URL only: a run opened from the table, whose link lacks it, shows
    GenAI mode's sidebar, so the page links below carry it too.)"""
    assert ui.link == f"{ui.url}/#/experiments/{smoke.experiment}/runs?workflowType=machine_learning"
    assert "tags.role != 'arm'" in ui.printed and "Group by -> tag `arm`" in ui.printed
    page.goto(ui.link)
    page.locator(f'.ag-row[row-id="{smoke.parent}"]').first.wait_for()
    assert ml_mode(page)
    page.screenshot(path=shots / "ui_landing.png")


def test_the_parent_run_page_shows_each_arms_answer(page, smoke, shots):
    """The parent's page lists, per arm, the mean, std and n of the reported test accuracy in percent,
    with the values `kdablate report` logged, and its description points at report.html."""
    from analysis.report import metric_name

    logged = tracking.client(smoke.uri).get_run(smoke.parent).data.metrics
    page.goto(f"/#/experiments/{smoke.experiment}/runs/{smoke.parent}?workflowType=machine_learning")
    page.get_by_text("answer/ce/mean", exact=True).first.wait_for()
    assert ml_mode(page)
    text = page.locator("body").inner_text()  # the metrics table: each name, then its value
    for arm in dict.fromkeys(c.arm for c in smoke.study.cells):
        for what in ("mean", "std", "n"):
            name = f"answer/{metric_name(arm)}/{what}"
            assert re.search(rf"^{re.escape(name)}\s+{logged[name]:g}$", text, flags=re.M), (name, logged[name])
    assert page.get_by_text("report.html at this run's artifact root", exact=False).first.is_visible()
    # The page scrolls inside its own panel: bring the metrics table into the view for the screenshot.
    page.get_by_text("answer/ce/mean", exact=True).first.scroll_into_view_if_needed()
    page.screenshot(path=shots / "parent_answer.png")


def test_a_chart_grouped_by_arm_draws_one_bar_per_arm(page, smoke, shots):
    """Group by -> tag `arm` in the chart view: report/test_acc is one bar per arm (the group's
    mean, in percent), every arm named on the axis (ungrouped, the chart holds 10 runs only)."""
    page.goto(f"/#/experiments/{smoke.experiment}/runs?compareRunsMode=CHART&workflowType=machine_learning")
    page.locator(f'.ag-row[row-id="{smoke.parent}"]').first.wait_for()
    arms = list(dict.fromkeys(c.arm for c in smoke.study.cells))
    assert group_by(page, "arm") == set(arms)
    page.get_by_placeholder("Search metric charts").fill("^report/test_acc$")
    card = page.get_by_test_id("experiment-view-compare-runs-card").filter(
        has=page.locator('h4[title="report/test_acc"]'))
    traces = wait_until(lambda: card.count() and (t := card.evaluate(PLOT_TRACES))["bars"] and t, what="the bars")
    labels = card.inner_text().split("\n")  # the bars' arm names, their values, the axis ticks
    assert traces["bars"] == len(arms) and set(arms) <= set(labels), (traces, labels)
    page.screenshot(path=shots / "grouped_chart.png")
