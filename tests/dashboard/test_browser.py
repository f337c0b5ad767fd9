"""The dashboard in a real browser: every page, headless Chromium, no error on screen.

Two tiny runs are scanned into a temporary runs folder, ``headscope dashboard`` serves
it on a free port, and Playwright drives the system's Chromium (Debian's ``chromium``
package; never ``playwright install``) through every page. A page fails when it shows
an exception or an ``st.error`` panel, when the browser logs an error or an uncaught
JavaScript exception, when Streamlit sends it back to the main page (unknown url
path), when it does not show exactly one title, or when it never finishes running.
Three more tests click: a head heatmap cell on Overview (opens that head), the Head
page's own-prompt form (runs the model in the server), and the sidebar's run picker
followed by every sidebar link. Full-page screenshots land in ``$HEADSCOPE_SCREENSHOTS``
(default ``.pytest_cache/screenshots/``), with a ``pages.json`` summary (titles,
info/warning panels, problems, seconds).

Nothing here waits a fixed time for the page: every wait is for something the page or
its websocket shows (a script run that answered every rerun the page asked for, the app's
running state gone, every element drawn, no request in flight), so a slow
machine only makes the test slower. The one bound is pytest-timeout's, per test, sized
for a loaded machine; a dashboard process that dies fails the wait at once.

Skips, with the reason, when Playwright or Chromium is missing, unless
``HEADSCOPE_REQUIRE_BROWSER=1`` (set by ``.ci/run`` once it installed Chromium), which
turns the skip into a failure. ``HEADSCOPE_CHROMIUM`` names another Chromium binary.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import pytest

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - depends on the environment
    sync_playwright = None

# The outer bound, per test (fixture setup included: the first test also scans the two
# runs and starts the server). That first test took 65-105 s with the machine to itself
# and up to ~145 s with two CPU-bound processes beside it on two cores: 600 s leaves 4x.
pytestmark = pytest.mark.timeout(600)

# url path of each page (Streamlit serves the default page, Runs, at "/").
PAGES = {
    "runs": "/",
    "overview": "/overview",
    "head": "/head",
    "sinks": "/sinks",
    "roles": "/roles",
    "redundancy": "/redundancy",
    "safety": "/safety",
    "export": "/export",
}
DETECTORS = "previous_token,induction,first_token_sink,layer_redundancy,head_families"
# Scanned in this order: the sidebar starts on the newest run, tiny-gpt2.
RUNS = {"tiny": "tiny:llama:3", "tiny-gpt2": "tiny:gpt2:3"}
VIEWPORT = {"width": 1400, "height": 900}
# Opening a page by its own url, Streamlit's frontend first probes the endpoints under
# that path (``/head/_stcore/health``) before falling back to the root: two harmless 404s.
BENIGN_CONSOLE = re.compile(r"/[^/]+/_stcore/(health|host-config)$")
# Problems on screen: tracebacks, and st.error panels that are not inside a traceback.
ERRORS_JS = """() => {
  const out = [];
  for (const e of document.querySelectorAll('[data-testid="stException"]'))
    out.push('exception on the page: ' + e.innerText.slice(0, 2000));
  for (const e of document.querySelectorAll('[data-testid="stAlertContentError"]'))
    if (!e.closest('[data-testid="stException"]'))
      out.push('st.error on the page: ' + e.innerText.slice(0, 2000));
  return out;
}"""
NOTES_JS = """() => [...document.querySelectorAll(
    '[data-testid="stAlertContentWarning"], [data-testid="stAlertContentInfo"]')]
  .map(e => e.getAttribute('data-testid').replace('stAlertContent', '').toLowerCase()
            + ': ' + e.innerText.slice(0, 300))"""
# The page is ready when Streamlit's running state is gone (stApp's data-test-script-state
# is notRunning, or compilationError), no element is still loading its code (Streamlit's
# Suspense fallback, stSkeleton) or left over from the previous run (data-stale), and
# every Plotly chart has drawn its SVG.
READY_JS = """() => {
  const state = document.querySelector('[data-testid="stApp"]')
    ?.getAttribute('data-test-script-state');
  return (state === 'notRunning' || state === 'compilationError')
    && !document.querySelector('[data-testid="stSkeleton"], [data-stale="true"]')
    && [...document.querySelectorAll('[data-testid="stPlotlyChart"]')]
         .every(e => e.querySelector('.main-svg'));
}"""
# Two animation frames: the layout after a viewport change has been drawn.
NEXT_PAINT_JS = "() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))"
POLL_MS = 100  # how often a wait looks again (it never gives up: pytest-timeout does)


def _unavailable(reason: str) -> None:
    if os.environ.get("HEADSCOPE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason} (HEADSCOPE_REQUIRE_BROWSER=1)")
    pytest.skip(reason)


def find_chromium() -> str | None:
    """$HEADSCOPE_CHROMIUM, else Debian's real binary (its /usr/bin/chromium is a shell
    wrapper that also works), else chromium/chromium-browser/google-chrome on PATH."""
    if named := os.environ.get("HEADSCOPE_CHROMIUM"):
        return named if os.access(named, os.X_OK) else None
    if os.access("/usr/lib/chromium/chromium", os.X_OK):
        return "/usr/lib/chromium/chromium"
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def headscope_command() -> list[str]:
    script = Path(sys.executable).with_name("headscope")
    return [str(script)] if script.exists() else [sys.executable, "-m", "headscope.cli"]


def start_server(command: list[str], log: Path) -> subprocess.Popen:
    """``command`` in its own process group (the CLI starts streamlit as a child)."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false",
        "STREAMLIT_SERVER_FILE_WATCHER_TYPE": "none",
    }
    with log.open("wb") as out:
        return subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


@dataclass
class Dashboard:
    """The server process the tests talk to, so that every wait can notice its death."""

    process: subprocess.Popen
    log: Path

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            pytest.fail(
                f"the dashboard exited with {self.process.returncode}:\n{self.log.read_text()}"
            )


_DASHBOARD: Dashboard | None = None  # set while the module's server runs


def wait_until_healthy(base_url: str, dashboard: Dashboard) -> None:
    """Until the server answers its health check (or exits: then fail with its log)."""
    while True:
        dashboard.check_alive()
        try:
            with urllib.request.urlopen(f"{base_url}/_stcore/health", timeout=30) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(POLL_MS / 1000)


def stop_server(server: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (the CLI and its streamlit child), SIGKILL
    to whatever is left of it after 2 s (a throwaway server on temporary runs)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            try:
                os.killpg(server.pid, 0)
            except ProcessLookupError:
                break
            server.poll()  # reaps the CLI once it exits
            time.sleep(0.1)
        else:
            continue
        break
    server.wait(5)


@dataclass
class PageReport:
    name: str
    url: str
    titles: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    screenshot: str = ""
    script_runs: dict = field(default_factory=dict)  # ScriptRuns: requested, finished, ...


@dataclass
class ScriptRuns:
    """Streamlit's script runs as the page's websocket shows them, read with Streamlit's
    own protobuf classes: the page asks for a run with a BackMsg ``rerun_script`` (on
    load, on a widget change, on a page link); the server starts each run with a ForwardMsg
    ``new_session`` and ends it with ``script_finished``, whose status says whether the
    run was cut short by the next one."""

    requested: int = 0  # rerun_script messages the page sent
    finished: int = 0  # runs that finished, not cut short
    answered: int = 0  # requests sent before the start of the last run that finished
    running: bool = False
    started_after: int = 0  # requests sent before the start of the current run

    def sent(self, payload: str | bytes) -> None:
        from streamlit.proto.BackMsg_pb2 import BackMsg

        if isinstance(payload, bytes) and _kind(BackMsg, payload)[0] == "rerun_script":
            self.requested += 1

    def received(self, payload: str | bytes) -> None:
        from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

        kind, message = _kind(ForwardMsg, payload) if isinstance(payload, bytes) else (None, None)
        if kind == "new_session":
            self.running = True
            self.started_after = self.requested
        elif kind == "script_finished":
            self.running = False
            if message.script_finished != ForwardMsg.FINISHED_EARLY_FOR_RERUN:
                self.finished += 1
                self.answered = self.started_after

    def done_since(self, finished_before: int) -> bool:
        """A run finished after ``finished_before`` runs, and it started after the page's
        last request: nothing the page asked for is still to come."""
        return (
            not self.running and self.finished > finished_before and self.answered == self.requested
        )


def _kind(message_class, payload: bytes):
    message = message_class()
    try:
        message.ParseFromString(payload)
    except Exception:  # noqa: BLE001 - not one of Streamlit's messages: not counted
        return None, None
    return message.WhichOneof("type"), message


class Tab:
    """A page in its own browser context that collects console errors and can tell
    when Streamlit has finished what the page asked of it."""

    def __init__(self, browser) -> None:
        self.context = browser.new_context(viewport=VIEWPORT)
        # No Playwright action or wait gives up on its own (its default is 30 s): a slow
        # machine is no failure, and pytest-timeout bounds every test.
        self.context.set_default_timeout(0)
        self.context.set_default_navigation_timeout(0)
        self.page = self.context.new_page()
        self.console: list[str] = []
        self.script_runs = ScriptRuns()
        self.crashed = False
        self.requests = 0  # in flight (Playwright's networkidle fires once per page load)
        self.page.on("request", lambda _: self._count(1))
        self.page.on("requestfinished", lambda _: self._count(-1))
        self.page.on("requestfailed", lambda _: self._count(-1))
        self.page.on("websocket", self._on_websocket)
        self.page.on("console", self._on_console)
        self.page.on("pageerror", lambda err: self.console.append(f"uncaught JavaScript: {err}"))
        self.page.on("crash", lambda _: setattr(self, "crashed", True))

    def _count(self, step: int) -> None:
        self.requests += step

    def _on_websocket(self, websocket) -> None:
        websocket.on("framesent", self.script_runs.sent)
        websocket.on("framereceived", self.script_runs.received)

    def _on_console(self, message) -> None:
        where = message.location.get("url", "")
        if message.type == "error" and not BENIGN_CONSOLE.search(where):
            self.console.append(f"console error: {message.text} ({where})")

    def open(self, url: str) -> None:
        """Load ``url`` and wait for its first run."""
        self.page.goto(url, wait_until="load")
        self.settle(0)

    def after(self, action) -> None:
        """Do ``action`` (a click that reruns the script) and wait for that run to end."""
        finished = self.script_runs.finished
        action()
        self.settle(finished)

    def settle(self, finished_before: int) -> None:
        """Wait until a run ended after ``finished_before`` runs and no rerun the page
        asked for is outstanding (a widget can ask for one as it mounts), the page shows
        it (READY_JS) and no request is in flight. Never gives up (pytest-timeout does);
        fails at once if the dashboard or the page dies."""
        try:
            while not self._settled(finished_before):
                if _DASHBOARD is not None:
                    _DASHBOARD.check_alive()
                if self.crashed:
                    pytest.fail("the browser's page crashed")
                self.page.wait_for_timeout(POLL_MS)  # Playwright delivers events meanwhile
        except BaseException:
            # pytest-timeout's failure lands here too: say what the wait was waiting for
            print(f"waiting for the page to settle: {self.script_runs}, "
                  f"{self.requests} requests in flight", file=sys.stderr)  # fmt: skip
            raise

    def _settled(self, finished_before: int) -> bool:
        if not (self.script_runs.done_since(finished_before) and self.requests == 0):
            return False
        ready = self.page.evaluate(READY_JS)
        # what Playwright delivered during that call (a rerun asked for, a request) counts
        return ready and self.script_runs.done_since(finished_before) and self.requests == 0

    def titles(self) -> list[str]:
        return [t.strip() for t in self.page.locator('[data-testid="stMain"] h1').all_inner_texts()]

    def problems(self, path: str | None = None) -> list[str]:
        """Errors on screen and in the console since the last call; a page must show exactly
        one title (two mean one page's script ran another's), and stay on ``path``."""
        found = list(self.page.evaluate(ERRORS_JS))
        state = self.page.get_attribute('[data-testid="stApp"]', "data-test-script-state")
        if state == "compilationError":
            found.append("the page's script does not compile")
        titles = self.titles()
        if len(titles) != 1:
            found.append(f"expected one title (h1) in the main area, found {titles}")
        if path is not None and urlparse(self.page.url).path.rstrip("/") != path.rstrip("/"):
            found.append(f"landed on {self.page.url} instead of {path}")
        found += self.console
        self.console = []
        return found

    def screenshot(self, path: Path) -> None:
        # The main area scrolls inside a 100vh box, so full_page alone shows one screen:
        # grow the viewport to the content first.
        height = self.page.evaluate(
            "() => document.querySelector('[data-testid=\"stMain\"]')?.scrollHeight ?? 0"
        )
        size = {"width": VIEWPORT["width"], "height": min(max(int(height), VIEWPORT["height"]),
                                                          12_000)}  # fmt: skip
        self.page.set_viewport_size(size)
        self.page.evaluate(NEXT_PAINT_JS)
        self.page.screenshot(path=str(path), full_page=True)
        self.page.set_viewport_size(VIEWPORT)

    def close(self) -> None:
        self.context.close()


def visit(browser, name: str, url: str, screenshot: Path) -> PageReport:
    """Open ``url`` in a fresh context, let the script finish, record what is wrong."""
    report = PageReport(name, url)
    start = time.monotonic()
    tab = Tab(browser)
    try:
        tab.open(url)
        report.problems = tab.problems(urlparse(url).path)
        report.titles = tab.titles()
        report.notes = tab.page.evaluate(NOTES_JS)
        report.script_runs = asdict(tab.script_runs)
        tab.screenshot(screenshot)
        report.screenshot = str(screenshot)
    finally:
        tab.close()
    report.seconds = round(time.monotonic() - start, 2)
    return report


_REPORTS: dict[str, dict] = {}


def _record(name: str, url: str, tab: Tab, problems: list[str], folder: Path) -> None:
    path = folder / f"{name}.png"
    tab.screenshot(path)
    _REPORTS[name] = asdict(PageReport(name, url, tab.titles(), tab.page.evaluate(NOTES_JS),
                                       problems, screenshot=str(path),
                                       script_runs=asdict(tab.script_runs)))  # fmt: skip


@pytest.fixture(scope="module")
def chromium_browser():
    if sync_playwright is None:
        _unavailable("Playwright is not installed (pip install playwright; it is in the dev extra)")
    executable = find_chromium()
    if executable is None:
        _unavailable(
            f"no Chromium: HEADSCOPE_CHROMIUM={os.environ['HEADSCOPE_CHROMIUM']} is not executable"
            if os.environ.get("HEADSCOPE_CHROMIUM")
            else "no Chromium binary (apt-get install chromium, or set HEADSCOPE_CHROMIUM)"
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def runs_folder(tmp_path_factory) -> Path:
    from headscope.scanning import scan

    root = tmp_path_factory.mktemp("dashboard") / "runs"
    for name, spec in RUNS.items():
        scan(spec, prompts="prose,random-repeat", detectors=DETECTORS, n_prompts=4,
             out=root / name, on_progress=False)  # fmt: skip
    return root


@pytest.fixture(scope="module")
def dashboard_url(chromium_browser, runs_folder):
    port = free_port()
    log = runs_folder.parent / "dashboard.log"
    command = [*headscope_command(), "dashboard", str(runs_folder),
               "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    global _DASHBOARD
    dashboard = Dashboard(start_server(command, log), log)
    try:
        base_url = f"http://127.0.0.1:{port}"
        wait_until_healthy(base_url, dashboard)
        _DASHBOARD = dashboard
        yield base_url
    finally:
        _DASHBOARD = None
        stop_server(dashboard.process)


@pytest.fixture(scope="module")
def screenshots(request) -> Path:
    folder = Path(
        os.environ.get("HEADSCOPE_SCREENSHOTS")
        or request.config.rootpath / ".pytest_cache" / "screenshots"
    )
    folder.mkdir(parents=True, exist_ok=True)
    _REPORTS.clear()
    yield folder
    (folder / "pages.json").write_text(json.dumps(_REPORTS, indent=2) + "\n")


@pytest.mark.parametrize("name", list(PAGES))
def test_page_renders_without_errors(name, chromium_browser, dashboard_url, screenshots):
    report = visit(chromium_browser, name, dashboard_url + PAGES[name], screenshots / f"{name}.png")
    _REPORTS[name] = asdict(report)
    assert not report.problems, f"{name} ({report.url}):\n" + "\n".join(report.problems)


def test_clicking_a_heatmap_cell_opens_that_head(chromium_browser, dashboard_url, screenshots):
    """Overview says "Click a head to open it on the Head page": click one."""
    tab = Tab(chromium_browser)
    try:
        tab.open(dashboard_url + "/overview")
        problems = tab.problems("/overview")
        heatmap = tab.page.locator('[data-testid="stPlotlyChart"]:has(g.hm)').first
        heatmap.scroll_into_view_if_needed()
        box = heatmap.locator(".nsewdrag").first.bounding_box()
        # The tiny runs have 3 layers x 4 heads: the middle row is L1, the third column H2.
        x, y = box["x"] + box["width"] * 2.5 / 4, box["y"] + box["height"] / 2
        # The click reruns Overview, which switches to the Head page: wait for all of it.
        tab.after(lambda: tab.page.mouse.click(x, y))
        problems += tab.problems("/head")
        if tab.titles() != ["Head L1H2"]:
            problems.append(f"the Head page shows {tab.titles()}, not Head L1H2")
        _record("overview-click", dashboard_url + "/overview", tab, problems, screenshots)
    finally:
        tab.close()
    assert not problems, "\n".join(problems)


def test_attention_on_your_own_prompt(chromium_browser, dashboard_url, screenshots):
    """Head: the form runs the run's model on the prompt and draws one more chart."""
    tab = Tab(chromium_browser)
    try:
        tab.open(dashboard_url + "/head")
        problems = tab.problems("/head")
        charts = tab.page.locator('[data-testid="stPlotlyChart"]')
        before = charts.count()
        button = tab.page.get_by_role("button", name="show attention")
        tab.after(button.click)
        problems += tab.problems("/head")
        if charts.count() != before + 1:
            problems.append(f"{charts.count()} charts after the submit, {before} before")
        _record("head-own-prompt", dashboard_url + "/head", tab, problems, screenshots)
    finally:
        tab.close()
    assert not problems, "\n".join(problems)


def test_every_page_on_the_run_picked_in_the_sidebar(chromium_browser, dashboard_url, screenshots):
    """The sidebar switches to the other run; the sidebar's links then walk every page (Runs
    last) in that session."""
    tab = Tab(chromium_browser)
    problems: list[str] = []
    try:
        tab.open(dashboard_url + "/")
        problems += tab.problems("/")
        page = tab.page
        picker = page.locator('[data-testid="stSidebar"] [data-testid="stSelectbox"]')
        spec = next(spec for spec in RUNS.values() if f"({spec})" not in picker.inner_text())
        run_name = next(name for name, s in RUNS.items() if s == spec)
        picker.click()
        option = page.get_by_role("option", name=f"{run_name} ({spec})", exact=True)
        tab.after(option.click)
        problems += tab.problems("/")
        for name, path in [*list(PAGES.items())[1:], *list(PAGES.items())[:1]]:
            link = page.locator(f'[data-testid="stSidebarNavLink"][href="{dashboard_url}{path}"]')
            tab.after(link.click)
            found = tab.problems(path)
            if name == "overview" and f"Overview: {spec}" not in tab.titles():
                found.append(f"the overview shows {tab.titles()}, not the run picked")
            if found:
                _record(f"sidebar-{name}", dashboard_url + path, tab, found, screenshots)
                problems += [f"{name}: {problem}" for problem in found]
    finally:
        tab.close()
    assert not problems, "\n".join(problems)


def test_the_html_report_opens_with_every_figure_drawn(chromium_browser, runs_folder, screenshots):
    """`headscope report RUN --html`: a file:// page, offline, every plotly figure drawn."""
    from headscope.html_report import write_html_report

    report = write_html_report(runs_folder / "tiny", runs_folder.parent / "report.html")
    expected = report.read_text().count("Plotly.newPlot")
    tab = Tab(chromium_browser)
    try:
        tab.page.goto(report.as_uri(), wait_until="load")
        tab.page.wait_for_function(
            f"() => document.querySelectorAll('.js-plotly-plot .main-svg').length >= {expected}",
            polling=POLL_MS,
        )
        drawn = tab.page.evaluate("() => document.querySelectorAll('.js-plotly-plot').length")
        tab.page.screenshot(path=str(screenshots / "html-report.png"), full_page=True)
        assert expected > 5 and drawn == expected
        assert not tab.console, tab.console
    finally:
        tab.context.close()
