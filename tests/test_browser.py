"""The dashboard in a real browser: Debian's Chromium driven by Playwright, against a real uvicorn on a
loopback port over a seeded SQLite database. Each page loads without a console error; the plot holds exactly
the stored front; a click on a point opens its candidate; log-in and the submit form work and a bad field
shows its error; a result written while the page is open appears without a reload, the zoom kept; a script in
a name is text; logged-out users see no control and a forged POST is refused. Screenshots of every page go
to `HYBRIDNAS_SCREENSHOTS` (default: build/screenshots).

Without a Chromium these tests skip, except under CI=true, where a missing browser fails them.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from search.storage import Storage
from tests.dashboard_seed import seed_search
from tests.live import Live

TOKEN = "browser-token-not-secret"
XSS = "<script>alert(1)</script>"
SCREENSHOTS = Path(
    os.environ.get("HYBRIDNAS_SCREENSHOTS", Path(__file__).resolve().parents[1] / "build/screenshots")
)


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser():
    path = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        path = None
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(
                "no Chromium (apt-get install chromium) or no playwright: the browser tests need both"
            )
        pytest.skip("no Chromium on this machine")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=path, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser")
    store = Storage(f"sqlite:///{tmp / 'dash.db'}")
    store.create_schema()
    seeded = {
        "done": seed_search(store, 60, name="finished search", fail_every=7),
        "live": seed_search(store, 30, name="live search", status="running", seed=4),
        "xss": seed_search(store, 4, name=XSS, seed=5),
    }
    live = Live(tmp, TOKEN, store=store)
    yield live, store, seeded
    live.close()
    store.close()


class Page:
    """A browser page that records console errors and uncaught exceptions."""

    def __init__(self, browser, base: str, width: int = 1280, height: int = 800):
        self.context = browser.new_context(base_url=base, viewport={"width": width, "height": height})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("response", lambda r: r.status >= 400 and self.errors.append(f"{r.status} {r.url}"))

        def dialog(d):
            self.dialogs.append(d.message)
            d.dismiss()

        self.page.on("dialog", dialog)

    def open(self, path: str, ready: bool = False):
        self.page.goto(path)
        if ready:
            self.page.wait_for_function(
                "() => document.documentElement.dataset.ready === '1'", timeout=30_000
            )
        return self.page

    def shot(self, name: str) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)

    def log_in(self) -> None:
        self.open("/login")
        self.page.fill("#token", TOKEN)
        self.page.click("form.stack button[type=submit]")
        self.page.wait_for_url("**/")

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def page(browser, site):
    p = Page(browser, site[0].base)
    yield p
    p.close()


def front_in_plot(page) -> list[int]:
    return page.evaluate(
        "() => document.getElementById('scatter').data.find(t => t.name === 'Pareto front').customdata"
    )


def test_every_page_loads_without_a_console_error(browser, site):
    live, store, seeded = site
    done = seeded["done"]
    candidate = next(
        i for i in done.ids if store.get_candidate(i).parent_id is not None and i not in done.failed
    )
    pages = {
        "searches": ("/", False),
        "search": (f"/searches/{done.job_id}", True),
        "candidate": (f"/candidates/{candidate}", True),
        "failed-candidate": (f"/candidates/{done.failed[0]}", True),
        "compare": (f"/compare?ids={done.front[0]},{done.front[-1]}", True),
        "schedules": ("/schedules", False),
        "jobs": ("/jobs", False),
        "login": ("/login", False),
        "docs": ("/docs", False),
        "redoc": ("/redoc", False),
    }
    for width, height, suffix in ((1280, 800, ""), (390, 844, "-phone")):
        p = Page(browser, live.base, width, height)
        try:
            for name, (path, ready) in pages.items():
                p.open(path, ready)
                if name == "search":  # the panels drawn after the plot, for a complete screenshot
                    p.page.wait_for_selector("#features tbody tr", timeout=30_000)
                if name in ("docs", "redoc"):
                    selector = ".swagger-ui .info .title" if name == "docs" else "redoc h1"
                    p.page.wait_for_selector(selector, timeout=30_000)
                p.shot(name + suffix)
            assert p.errors == [], p.errors
            if width < 500:  # readable on a phone: nothing wider than the screen but the scrolling tables
                overflow = p.open(f"/searches/{done.job_id}", True).evaluate(
                    "() => document.documentElement.scrollWidth - window.innerWidth"
                )
                assert overflow <= 1
        finally:
            p.close()


def test_the_plot_holds_exactly_the_stored_front_with_titled_axes(page, site):
    _, _, seeded = site
    done = seeded["done"]
    p = page.open(f"/searches/{done.job_id}", ready=True)
    assert sorted(front_in_plot(p)) == done.front
    titles = p.evaluate(
        "() => { const l = document.getElementById('scatter').layout;"
        " return [l.xaxis.title.text, l.yaxis.title.text]; }"
    )
    assert titles == ["decode latency (ms per token)", "validation bits per byte (val_bpb)"]
    presets = p.evaluate(
        "() => document.getElementById('scatter').data.find(t => t.name === 'preset baselines').text"
    )
    assert sorted(presets) == ["llama", "mamba2"]
    rows = p.locator("#candidates tbody tr").count()
    assert rows == 25  # the first page of the table
    assert page.errors == []


def test_clicking_a_point_opens_its_candidate(page, site):
    _, _, seeded = site
    p = page.open(f"/searches/{seeded['done'].job_id}", ready=True)
    point = p.locator("#scatter .scatterlayer .trace").nth(1).locator("path.point").first
    box = point.bounding_box()
    target = p.evaluate(
        "() => document.getElementById('scatter').data.find(t => t.name === 'Pareto front').customdata"
    )
    p.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    p.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    p.wait_for_url("**/candidates/*")
    opened = int(p.url.rsplit("/", 1)[1])
    assert opened in target


def test_a_result_written_while_the_page_is_open_appears_and_the_zoom_is_kept(page, site):
    live, store, seeded = site
    job = seeded["live"].job_id
    p = page.open(f"/searches/{job}", ready=True)
    plot = p.locator("#scatter .nsewdrag").first.bounding_box()
    x0, y0 = plot["x"] + plot["width"] * 0.1, plot["y"] + plot["height"] * 0.1
    p.mouse.move(x0, y0)
    p.mouse.down()
    p.mouse.move(x0 + plot["width"] * 0.6, y0 + plot["height"] * 0.6, steps=8)
    p.mouse.up()  # a box zoom, as a user makes it
    zoomed = p.evaluate("() => document.getElementById('scatter').layout.xaxis.range.slice()")
    before = p.evaluate("() => document.getElementById('scatter').data.flatMap(t => t.customdata)")

    layout = store.get_candidate(seeded["live"].ids[0]).layout
    new_id = store.add_candidate(job, layout, "written-while-open", None, 0, None)
    store.mark_running(new_id)
    store.complete_candidate(
        new_id, None, None, 0.5, 0.05, 1234, None
    )  # better than everything: on the front
    store.set_front(job, [new_id])
    p.wait_for_function(
        f"() => document.getElementById('scatter').data.some(t => (t.customdata || []).includes({new_id}))",
        timeout=20_000,
    )
    assert p.evaluate("() => document.getElementById('scatter').layout.xaxis.range.slice()") == zoomed
    assert front_in_plot(p) == [new_id]
    assert len(set(before)) == 30 and new_id not in before  # it came without a reload
    assert p.locator("#count-completed").inner_text() != ""
    assert page.errors == []


def test_log_in_submit_a_search_and_see_a_bad_field_named(page, site):
    _, store, _ = site
    page.log_in()
    p = page.open("/searches/new")
    p.fill("#config", "name: from the browser\nbudget: 0\n")
    p.click("#new-search button[type=submit]")
    error = p.locator('ul.errors li[data-field="budget"]')
    assert error.count() == 1 and "budget" in error.inner_text()
    p.fill("#config", "name: from the browser\nbudget: 2\n")
    p.click("#new-search button[type=submit]")
    p.wait_for_url("**/searches/*")
    job_id = int(p.url.rsplit("/", 1)[1])
    assert store.get_job(job_id).name == "from the browser"
    assert p.locator("#search-name").inner_text() == "from the browser"
    page.shot("new-search-done")


def test_a_script_in_a_name_is_text(page, site):
    _, _, seeded = site
    p = page.open(f"/searches/{seeded['xss'].job_id}", ready=True)
    assert p.locator("#search-name").inner_text() == XSS
    page.open("/")
    assert XSS in p.locator("#searches").inner_text()
    time.sleep(0.3)
    assert page.dialogs == [] and page.errors == []


def test_logged_out_users_see_no_control_and_a_forged_post_is_refused(page, site):
    _, store, seeded = site
    job = seeded["live"].job_id
    p = page.open(f"/searches/{job}", ready=True)
    assert p.locator("form[method=post]").count() == 0
    forged = p.request.post(f"{page.page.url.split('/searches')[0]}/searches/{job}/cancel", form={"x": "1"})
    assert forged.status == 403
    page.log_in()
    p = page.open(f"/searches/{job}", ready=True)
    assert p.locator("form[action$='/cancel']").count() == 1
    forged = p.request.post(f"/searches/{job}/cancel", form={"csrf_token": "forged"})
    assert forged.status == 403
    assert store.get_job(job).status == "running"


@pytest.fixture(scope="module")
def studies(site):
    from tests.dashboard_seed import seed_studies

    live, store, seeded = site
    return seed_studies(store, seeded["done"])


# What each study page must draw: its plots (Plotly's SVG in each) and its report table's rows.
STUDY_PAGES = {
    "depth-width": (("loss-depth", "latency-depth"), "#points tbody tr"),
    "fidelity": (("fidelity-scatter",), "#rows tbody tr"),
    "ablation": (("ablation-pairs",), "#arms tbody tr"),
    "verdict": (("verdict-fronts",), "#verdict tbody tr"),
}


def test_every_study_kind_draws_its_report(page, site, studies):
    store = site[1]
    for kind, (plots, rows) in STUDY_PAGES.items():
        p = page.open(f"/studies/{studies[kind]}", ready=True)
        for plot in plots:
            traces = p.evaluate(f"() => document.getElementById('{plot}').data.length")
            assert traces >= 1 and p.locator(f"#{plot} .main-svg").count() >= 1, (kind, plot)
        assert p.locator(rows).count() >= 1, kind
        page.shot(f"study-{kind}")
    report = store.get_job(studies["verdict"]).result
    fronts = page.open(f"/studies/{studies['verdict']}", ready=True).evaluate(
        "() => document.getElementById('verdict-fronts').data.map(t => t.x.length)"
    )
    assert fronts == [len(report["hybrid_front"]), len(report["llama_front"])]
    assert page.open("/jobs").locator(f'a[href="/studies/{studies["fidelity"]}"]').count() == 1
    assert page.errors == [], page.errors
