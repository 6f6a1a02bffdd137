"""The page at `lmlab serve`'s root, in a real headless Chromium (Debian's, driven by Playwright; no browser is
downloaded), against a real server: completion and chat streamed, the token probabilities on hover, temperatures
side by side, the API key, and a message on the page for a prompt the tokenizer cannot encode, a server still
loading, and a stream the server cut. One browser for every check."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import LMLAB, serve_process

sync_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("fastapi")
pytestmark = pytest.mark.slow
sync_api.expect.set_options(timeout=30_000)  # a page on a busy 2-core machine: seconds, not the default 5

KEY = "page-test-key"
# Where the screenshots go: the test's own folder, or LMLAB_SCREENSHOTS (how docs/guides/images/serve-page-*.png are
# made: LMLAB_SCREENSHOTS=docs/guides/images pytest tests/test_page.py).
SHOTS = os.environ.get("LMLAB_SCREENSHOTS")


class Serving:
    """`lmlab serve RUN --api-key KEY` on the port the system gives it, its stderr collected; it may still be
    loading."""

    def __init__(self, run: Path, *options: str, env: dict[str, str] | None = None):
        self.proc, self.port, self.log = serve_process([LMLAB, "serve", run, "--device", "cpu", "--no-compile",
                                                        "--api-key", KEY, *options], env)
        self.url = f"http://127.0.0.1:{self.port}"
        self.wait(lambda status: status is not None)

    def health(self) -> int | None:
        try:
            return urllib.request.urlopen(f"{self.url}/health", timeout=5).status
        except urllib.error.HTTPError as err:
            return err.code
        except (urllib.error.URLError, OSError):  # not listening yet, or busy importing torch for its start
            return None

    def wait(self, ready) -> None:
        """Until /health's status satisfies `ready` (polled: it is the server's own observable state)."""
        deadline = time.monotonic() + 120
        while not ready(self.health()):
            assert self.proc.poll() is None, "".join(self.log)
            assert time.monotonic() < deadline, "".join(self.log)
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def run(writing_char_run) -> Path:
    return writing_char_run


@pytest.fixture(scope="module")
def server(run):
    started = Serving(run, "--max-tokens-cap", "2000")
    started.wait(lambda status: status == 200)
    yield started
    started.stop()


def api(server: Serving, path: str, body: dict) -> dict:
    request = urllib.request.Request(f"{server.url}{path}", json.dumps(body).encode(),
                                     {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def open_page(browser, url: str, key: str | None = KEY):
    page = browser.new_page(viewport={"width": 1280, "height": 760})
    page.goto(url)
    if key:
        page.fill("#api-key", key)
        page.dispatch_event("#api-key", "change")
    return page


def shot(page, folder: Path, name: str) -> None:
    page.screenshot(path=str(Path(SHOTS or folder) / f"serve-page-{name}.png"))


def generate(page, text: str, temperature: str = "0", compare: str = "", tokens: int = 24) -> None:
    page.fill("#compare", compare)
    page.dispatch_event("#compare", "change")
    page.eval_on_selector("#temperature", "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }",
                          temperature)
    page.fill("#max-tokens", str(tokens))
    page.fill("#input", text)
    page.click("#send")
    sync_api.expect(page.locator("#send")).not_to_have_text("Stop", timeout=60_000)


@pytest.mark.slow
def test_the_page_is_small_self_contained_and_served_without_the_key(server):
    with urllib.request.urlopen(f"{server.url}/", timeout=10) as response:
        html, policy = response.read().decode(), response.headers["Content-Security-Policy"]
    assert 10_000 < len(html.encode()) < 60_000  # tens of KB, script and style inline
    assert re.findall(r"(?:src|href)=\"[^\"#]", html) == [] and "http://" not in html and "https://" not in html
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    with pytest.raises(urllib.error.HTTPError) as err:  # the API itself still wants the key
        urllib.request.urlopen(f"{server.url}/v1/models", timeout=10)
    assert err.value.code == 401


@pytest.mark.slow
def test_completion_chat_probabilities_and_temperatures_side_by_side(browser, server, run, tmp_path):
    page = open_page(browser, server.url, key=None)
    sync_api.expect(page.locator("#status")).to_contain_text("API key")
    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    sync_api.expect(page.locator("#status")).to_have_text("ready")
    assert run.name in page.text_content("#model")
    requests = []
    page.on("request", lambda r: requests.append(r.url))

    page.click("#mode-complete")
    generate(page, "ROMEO:\n")
    greedy = api(server, "/v1/completions", {"prompt": "ROMEO:\n", "max_tokens": 24, "temperature": 0})
    column = page.locator(".col .log").first
    assert column.inner_text() == "ROMEO:\n" + greedy["choices"][0]["text"] + "\n(stopped at max tokens)"
    spans = page.locator(".col .tok")
    # A span per streamed piece: a token, or the few a busy server sent together, down to one piece for all 24.
    assert 1 <= spans.count() <= 24
    spans.filter(has_text=re.compile(r"\w")).first.hover()
    tip = page.locator("#tip")
    shot(page, tmp_path, "complete")
    assert tip.is_visible() and re.search(r"\d%", tip.inner_text()) and tip.locator("tr").count() >= 2
    assert tip.locator("tr.chosen").count() >= 1  # the token shown is among the alternatives, marked
    shot(page, tmp_path, "complete")

    generate(page, "JULIET:\n", compare="0, 0.8, 1.6", tokens=60)
    logs = page.locator(".col .log")
    assert logs.count() == 3 and [h.inner_text() for h in page.locator(".col h2").all()] == [
        "temperature 0", "temperature 0.8", "temperature 1.6"]
    texts = [logs.nth(i).inner_text() for i in range(3)]
    assert all(t.startswith("JULIET:\n") and len(t) > 40 for t in texts) and len(set(texts)) > 1
    shot(page, tmp_path, "temperatures")

    page.click("#mode-chat")
    generate(page, "sweet love", temperature="0.8", compare="")  # as `user: sweet love`, `assistant:`: its transcript
    assert page.locator(".col .error").count() == 0
    reply = page.locator(".col .msg").nth(1).inner_text()
    assert reply.startswith("MODEL\n") and len(reply) > len("MODEL\n")
    shot(page, tmp_path, "chat")
    assert all(url.startswith(server.url) for url in requests)  # nothing from anywhere else
    page.close()


def test_a_key_given_while_the_page_connects_is_the_one_it_connects_with(browser, server):
    """A connect asked for while one is under way is kept, not dropped: a key given while the page connects (its
    first /v1/models asked without it) is the one it ends up connected with, no "no API key given" left shown."""
    held = []

    def hold_the_first(route) -> None:  # the page's first ask, held until the key is in
        route.continue_() if held else held.append(route)

    page = browser.new_page(viewport={"width": 1280, "height": 760})
    page.route("**/v1/models", hold_the_first)
    page.goto(server.url)
    while not held:
        page.wait_for_timeout(20)
    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    held[0].continue_()  # answered 401: it was asked without the key
    sync_api.expect(page.locator("#status")).to_have_text("ready")
    page.close()


@pytest.mark.slow
def test_the_page_says_what_went_wrong_never_blank(browser, server, run, tmp_path):
    page = open_page(browser, server.url)
    sync_api.expect(page.locator("#status")).to_have_text("ready")
    page.click("#mode-complete")
    generate(page, "A snowman \u2603 in Z\u00fcrich")  # characters the char tokenizer never saw
    assert "never saw" in page.locator(".col .error").first.inner_text()
    page.close()

    # A server still loading: with a cache of its own, its load keeps the memory it estimated there, under the
    # cache's lock, which this test holds as another lmlab process writing the cache would.
    (tmp_path / "cache" / "lmlab").mkdir(parents=True)
    held = open(tmp_path / "cache" / "lmlab" / ".machine.json.lock", "w")  # closed to let it load
    fcntl.flock(held, fcntl.LOCK_EX)
    slow = Serving(run, "--max-tokens-cap", "2000", env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    try:
        slow.wait(lambda status: status == 503)  # its port answers; its run waits for the lock
        page = open_page(browser, slow.url)
        sync_api.expect(page.locator("#status")).to_contain_text("loading")
        assert "loading the run" in page.text_content("#status")
        shot(page, tmp_path, "loading")
        held.close()
        sync_api.expect(page.locator("#status")).to_have_text("ready", timeout=60_000)

        # A stream the server cuts: it is killed once the page shows the first words of a long completion.
        page.click("#mode-complete")
        page.fill("#max-tokens", "2000")
        page.fill("#input", "ROMEO:\n")
        page.click("#send")
        page.locator(".col .tok").nth(2).wait_for(state="attached")  # a line break's token is drawn hidden
        slow.proc.send_signal(signal.SIGKILL)
        page.locator(".col .error").first.wait_for()
        assert "cut" in page.locator(".col .error").first.inner_text()
        sync_api.expect(page.locator("#status")).to_contain_text("cannot reach the server")
        assert page.locator(".col .tok").count() > 2  # what came before the cut is still shown
        shot(page, tmp_path, "cut")
    finally:
        held.close()
        slow.stop()
    page.close()


def event_stream(tokens: int) -> str:
    """A streamed completion of `tokens` one-token chunks with their probabilities, as the server sends it."""
    chunks = []
    for i in range(tokens):
        piece = f"word{i} "
        choice = {"index": 0, "text": piece, "finish_reason": "length" if i == tokens - 1 else None,
                  "logprobs": {"tokens": [piece], "token_logprobs": [-0.5], "top_logprobs": [{piece: -0.5, "x": -1.2}]}}
        chunks.append(f"data: {json.dumps({'choices': [choice]})}\n\n")
    return "".join(chunks) + "data: [DONE]\n\n"


@pytest.mark.slow
def test_a_long_stream_is_laid_out_once_a_frame_not_once_a_token(browser, server):
    """A streamed completion is laid out at most once a frame, never once per token (a span appended and the log's
    height read to scroll for each would lay the whole log out per token, which freezes a tab). Here the stream
    arrives at once (the browser's router answers the completion in the server's format), so what is counted is the
    page's own work: the browser's layouts (DevTools' Performance metrics), not a time."""
    tokens = 3000
    page = open_page(browser, server.url)
    sync_api.expect(page.locator("#status")).to_have_text("ready")
    page.route("**/v1/completions", lambda route: route.fulfill(status=200, content_type="text/event-stream",
                                                               body=event_stream(tokens)))
    devtools = page.context.new_cdp_session(page)
    devtools.send("Performance.enable")

    def layouts() -> float:
        metrics = devtools.send("Performance.getMetrics")["metrics"]
        return next(m["value"] for m in metrics if m["name"] == "LayoutCount")

    before = layouts()
    page.click("#mode-complete")
    generate(page, "x", tokens=tokens)
    assert layouts() - before < tokens / 20  # a few per frame, however many tokens each frame drew
    assert page.locator(".col .tok").count() == tokens
    assert page.locator(".col .log").first.inner_text().endswith(f"word{tokens - 1} \n(stopped at max tokens)")
    page.close()
