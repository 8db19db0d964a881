"""The web playground (GET /ui) in a real browser: Playwright driving Debian's Chromium against a real server on the
default model with an API key. The page shows the server's 401 until a key is entered; an adapter uploaded
through the page is listed and selectable; two models compared side by side both stream and show their timings;
a chat turn answers; a bad training file shows the server's error with its line; a small fine-tuning job plots
its loss and its model appears; a long job is cancelled. No console error (CSP violations included), no request
leaves 127.0.0.1, no critical accessibility violation (axe-core), and every view is saved as a screenshot
(`LORAPLEX_SCREENSHOTS=DIR` keeps them; the tests' temp folder otherwise)."""
from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tests.e2e.conftest import Server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
KEY = "playground-key"
DATA = Path(__file__).parents[2] / "examples" / "made_up_colors.jsonl"


def _browser_or_skip():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or not os.path.exists(CHROMIUM):
        if os.environ.get("LORAPLEX_REQUIRE_SERVICES") == "1":
            pytest.fail("the browser tests need playwright (pip) and Debian's chromium (scripts/test.sh installs both)")
        pytest.skip("playwright or /usr/bin/chromium missing")
    return sync_playwright


@pytest.fixture(scope="module")
def server(default_model_dir):
    srv = Server(["--model", str(default_model_dir), "--dtype", "float32", "--max-model-len", "512",
                  "--served-model-name", "smol", "--api-key", KEY])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("LORAPLEX_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def page(server):
    sync_playwright = _browser_or_skip()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run"])
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        page.problems = []  # console errors, page errors, requests to elsewhere
        page.on("console", lambda m: m.type == "error" and not _expected_error(m.text) and page.problems.append(
            f"console: {m.text}"))
        page.on("pageerror", lambda e: page.problems.append(f"page error: {e}"))
        page.on("request", lambda r: urlparse(r.url).hostname not in ("127.0.0.1",) and not r.url.startswith("data:")
                and page.problems.append(f"request to {r.url}"))
        page.goto(server.base_url + "/")
        yield page
        browser.close()


def _expected_error(text: str) -> bool:
    """The browser logs failed fetches by status; the tests cause some on purpose (no key yet, a bad file)."""
    return "status of 401" in text or "status of 400" in text


def _adapter_archive(tmp_path: Path, default_model_dir: Path) -> Path:
    from loraplex.engine.llm_engine import _read_model_config
    from tests.adapters.peft_factory import write_random_peft
    folder = write_random_peft(tmp_path / "peft", _read_model_config(str(default_model_dir)), r=8, seed=5, std=0.05)
    archive = tmp_path / "tulip.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for f in folder.iterdir():
            tar.add(f, arcname=f.name)
    return archive


def test_the_page_is_served_with_a_strict_csp(server):
    import httpx
    r = httpx.get(server.base_url + "/", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/ui"
    r = httpx.get(server.base_url + "/ui")
    csp = r.headers["content-security-policy"]
    assert r.status_code == 200 and "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "<script type=\"module\" src=\"/ui/static/app.js\">" in r.text and "style=" not in r.text
    total = 0
    for path in ("/ui/static/app.js", "/ui/static/vendor/htm-preact-3.1.1.module.js",
                 "/ui/static/vendor/uPlot-1.6.32.iife.min.js"):
        r = httpx.get(server.base_url + path)
        assert r.status_code == 200 and "javascript" in r.headers["content-type"]
        assert r.headers["content-security-policy"] == csp
        if "vendor" in path:
            total += len(r.content)
    assert total < 100_000  # vendored JS the page loads
    escape = httpx.get(server.base_url + "/ui/static/%2e%2e/ui_routes.py")  # the module beside the UI folder
    assert escape.status_code == 404 and "CSP" not in escape.text
    status = httpx.get(server.base_url + "/status").json()
    assert status["ready"] is True and status["model"] == "smol"


def test_the_key_gates_the_api_and_an_uploaded_adapter_is_listed(page, server, shots, tmp_path, default_model_dir):
    page.wait_for_selector("[role=alert]")  # /v1/models answered 401: no key yet
    assert "API key" in page.inner_text("[role=alert]") or "key" in page.inner_text("[role=alert]").lower()
    page.fill("#api-key", KEY)
    page.click("text=Save")
    page.wait_for_selector("#column-model-0 option[value=smol]", state="attached")
    assert KEY not in page.url
    page.click("#tab-adapters")
    page.set_input_files("#adapter-file", str(_adapter_archive(tmp_path, default_model_dir)))
    page.fill("#adapter-name", "tulip")
    page.fill("#adapter-description", "Speaks in flowers")
    page.fill("#adapter-examples", "Describe a tulip")
    page.click("#view-adapters form >> text=Upload")
    page.wait_for_selector("tr[data-adapter=tulip]")
    row = page.inner_text("tr[data-adapter=tulip]")
    assert "v1" in row and "8" in row and "Speaks in flowers" in row and "1 example prompt" in row
    page.click("[aria-label='Edit tulip']")  # metadata stays editable
    page.fill("#edit-examples", "Describe a tulip\nName a red flower")
    page.click("form[aria-label='Edit tulip'] >> text=Save")
    page.wait_for_selector("tr[data-adapter=tulip] >> text=2 example prompt(s)")
    page.screenshot(path=str(shots / "adapters.png"), full_page=True)
    page.click("#tab-compare")
    page.wait_for_selector("#column-model-1 option[value=tulip]", state="attached")


def test_compare_streams_two_models_side_by_side(page, shots):
    page.click("#tab-compare")
    page.select_option("#column-model-0", "smol")
    page.select_option("#column-model-1", "tulip")
    page.select_option("#examples", "Name a red flower")  # the adapter's example prompts fill the prompt
    assert page.input_value("#prompt") == "Name a red flower"
    page.fill("#prompt", "Name three colours of the rainbow.")
    page.fill("#max-tokens", "24")
    page.click("#view-compare button.primary")
    for i in (0, 1):
        page.wait_for_function(f"""() => {{
            const c = document.querySelector('[data-column="{i}"]');
            return c && !c.querySelector('[data-metric=finish]').textContent.includes('–');
        }}""", timeout=120_000)
    for i in (0, 1):
        column = page.locator(f"[data-column='{i}']")
        assert column.locator(".output").inner_text().strip()
        assert "ms" in column.locator("[data-metric=ttft]").inner_text()
        assert "tok/s" in column.locator("[data-metric=rate]").inner_text()
        assert column.locator("[data-metric=finish]").inner_text() in ("finish: length", "finish: stop")
    page.check("text=Highlight differences from model 1")
    page.click("[data-column='1'] >> text=Copy as curl / Python")
    assert "Authorization: Bearer $LORAPLEX_API_KEY" in page.inner_text("[data-column='1'] pre[aria-label=curl]")
    page.screenshot(path=str(shots / "compare.png"), full_page=True)


def test_a_chat_turn(page, shots):
    page.click("#tab-chat")
    page.select_option("#chat-model", "smol")
    page.fill("#chat-input", "What is the capital of France?")
    page.click("#view-chat button[type=submit]")
    page.wait_for_function("""() => {
        const m = document.querySelectorAll('#view-chat [data-role=assistant]');
        return m.length && m[m.length - 1].textContent.trim().length > 0 &&
               !document.querySelector('#view-chat button[type=submit]').disabled;
    }""", timeout=120_000)
    assert "Paris" in page.inner_text("#view-chat [data-role=assistant]")
    page.screenshot(path=str(shots / "chat.png"), full_page=True)


def test_fine_tuning_from_the_page(page, shots, tmp_path):
    page.click("#tab-fine-tuning")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{oops\n')
    page.set_input_files("#training-upload", str(bad))
    page.wait_for_selector("[data-error=file]")
    assert "line 2" in page.inner_text("[data-error=file]")
    page.set_input_files("#training-upload", str(DATA))
    page.wait_for_selector("text=made_up_colors.jsonl uploaded")
    page.fill("#ft-suffix", "colors")
    page.fill("#ft-epochs", "1")
    page.fill("#ft-lr", "10")
    page.fill("#ft-valid", "0")
    page.click("#view-fine-tuning form >> text=Create job")
    page.wait_for_selector("#view-fine-tuning .notice:has-text(' created')")
    job_id = page.inner_text("#view-fine-tuning .notice").split()[1]
    page.wait_for_function("() => Number(document.querySelector('.chart').dataset.points) > 0", timeout=300_000)
    page.wait_for_selector(f"tr[data-job={job_id}] [data-status=succeeded]", timeout=300_000)
    page.screenshot(path=str(shots / "fine-tuning.png"), full_page=True)
    model = page.inner_text(f"tr[data-job={job_id}] td:nth-child(4)").strip()
    assert model.startswith("ft:smol:colors:")
    page.click(f"tr[data-job={job_id}] >> text=Compare with base")  # Compare with the base and the new model
    page.wait_for_selector(f"#column-model-1 option[value='{model}']", state="attached")
    assert page.eval_on_selector("#column-model-1", "e => e.value") == model
    # a long job, cancelled from its row
    page.click("#tab-fine-tuning")
    page.fill("#ft-epochs", "50")
    page.click("#view-fine-tuning form >> text=Create job")
    page.wait_for_function(f"() => {{ const n = document.querySelector('#view-fine-tuning .notice');"
                           f" return n && n.textContent.includes(' created') && !n.textContent.includes('{job_id}'); }}")
    long_id = page.inner_text("#view-fine-tuning .notice").split()[1]
    page.click(f"tr[data-job={long_id}] >> text=Cancel")
    page.wait_for_selector(f"tr[data-job={long_id}] [data-status=cancelled]", timeout=60_000)


def test_no_console_errors_no_outside_requests_and_accessible(page, shots):
    from axe_playwright_python.sync_playwright import Axe
    for tab in ("compare", "chat", "adapters", "fine-tuning"):
        page.click(f"#tab-{tab}")
        page.keyboard.press("ArrowRight")  # the tabs follow the arrow keys
        page.click(f"#tab-{tab}")
        results = Axe().run(page)
        critical = [v["id"] for v in results.response["violations"] if v["impact"] == "critical"]
        assert not critical, (tab, critical)
    page.screenshot(path=str(shots / "status.png"))
    assert not page.problems, page.problems
    for name in ("adapters", "compare", "chat", "fine-tuning"):
        assert (shots / f"{name}.png").stat().st_size > 10_000
    if os.environ.get("LORAPLEX_SCREENSHOTS"):
        print(json.dumps(sorted(p.name for p in shots.iterdir())))
