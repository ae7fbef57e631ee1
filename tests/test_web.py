"""The web page at / in a real browser: Debian's headless Chromium driven by
playwright (no downloaded browser). It picks a picture, types a question, and
watches a streamed answer appear; then asks a follow-up in the same chat."""

import shutil
from pathlib import Path

import pytest
from test_serve import model_dir, pictures, running, serve_config  # noqa: F401  (fixtures)

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.is_file(),
    reason="Debian's chromium is not installed at /usr/bin/chromium "
    "(apt-get install -y --no-install-recommends chromium; .ci/run installs it)",
)


@pytest.fixture
def browser_page(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # a fresh --user-data-dir
            executable_path=str(CHROMIUM),
            headless=True,
            args=FLAGS,
        )
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.set_default_timeout(30_000)
            yield page
        finally:
            context.close()


def test_page_asks_and_streams(browser_page, model_dir, pictures, tmp_path, cache_dir):  # noqa: F811
    """Without evaluating any script in the page: its Content-Security-Policy forbids eval, and stays on."""
    from playwright.sync_api import expect

    page = browser_page
    picture = tmp_path / "shape.png"
    shutil.copy(pictures / "shape.png", picture)
    with running(serve_config(model_dir, tmp_path, cache_dir, "serve.default_max_tokens=8")) as (url, engine):
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: m.type == "error" and errors.append(m.text))
        page.goto(f"{url}/")
        expect(page.locator("#model")).to_have_text("svlm")  # from GET /v1/models

        page.set_input_files("#image", str(picture))
        page.wait_for_selector("#preview:not([hidden])")
        page.fill("#question", "What colour is the shape?")
        with page.expect_response("**/v1/chat/completions") as response_info:
            page.click("#send")
        response = response_info.value
        request = response.request.post_data_json
        assert response.status == 200 and response.headers["content-type"].startswith("text/event-stream")
        assert request["stream"] is True and request["max_tokens"] == 128 and request["temperature"] == 0
        (question,) = request["messages"]
        assert question["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
        assert question["content"][1] == {"type": "text", "text": "What colour is the shape?"}

        answer = page.wait_for_selector(".msg.assistant[data-finish]")
        assert answer.get_attribute("data-finish") in ("stop", "length")
        text = answer.query_selector(".text").text_content()
        assert engine.last is not None and text == engine.last.text  # what the model said, streamed in
        assert page.query_selector(".msg.user img") is not None  # the picture is shown with the question
        assert page.text_content("#status").startswith("done in")

        # a follow-up in the same chat carries the conversation, the picture included
        page.fill("#question", "And its size?")
        page.focus("#question")
        with page.expect_request("**/v1/chat/completions") as request_info:
            page.keyboard.press("Enter")
        messages = request_info.value.post_data_json["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant", "user"]
        assert messages[1]["content"] == text and messages[2]["content"] == [{"type": "text", "text": "And its size?"}]
        expect(page.locator(".msg.assistant[data-finish]")).to_have_count(2)
        assert errors == []

        # a refusal shows on the page, it does not break it
        page.fill("#max-tokens", "100000")
        page.fill("#question", "Again?")
        page.click("#send")
        expect(page.locator(".msg.assistant[data-finish]")).to_have_count(3)
        last = page.query_selector_all(".msg.assistant")[-1]
        assert last.get_attribute("data-finish") == "error" and "max_tokens" in last.text_content()
