"""The web UI in a real headless Chromium (Debian's package, driven by Playwright with ``executable_path``)."""

from __future__ import annotations

import shutil

import openai
import pytest
from playwright.sync_api import sync_playwright

MODEL = "smollm2-135m"
PROMPT = "What is the capital of France?"
pytestmark = pytest.mark.swarm
COUNT_TEXT_CHANGES = """() => {
  window.textChanges = 0;
  new MutationObserver(() => { window.textChanges += 1; })
    .observe(document.getElementById("messages"), {childList: true, subtree: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is not installed (make test installs it with apt)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True)
        yield browser
        browser.close()


def test_chat_page_streams_the_apis_answer(api, browser, tmp_path):
    client = openai.OpenAI(base_url=api.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    expected = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=24,
                                              temperature=0).choices[0].message.content
    page = browser.new_page(viewport={"width": 1100, "height": 700})
    page.goto(api.url + "/")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "24")
    page.evaluate(COUNT_TEXT_CHANGES)
    page.fill("#prompt", PROMPT)
    page.click("#send")
    page.wait_for_selector(".message.assistant[data-done='true']", timeout=120_000)
    answer = page.locator(".message.assistant").last
    assert answer.text_content() == expected
    assert page.evaluate("window.textChanges") > 3  # the text arrived piece by piece, not at once
    assert "tokens in" in page.locator("#chat-status").text_content()
    page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
    assert (tmp_path / "chat.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"chat screenshot: {tmp_path / 'chat.png'}")


def test_monitor_shows_every_server_and_the_coverage(api, browser, swarm, tmp_path):
    servers = swarm.server_records()[0]
    page = browser.new_page(viewport={"width": 1300, "height": 700})
    page.goto(api.url + "/#monitor")
    page.wait_for_function("() => document.querySelectorAll('#servers tbody tr').length === 3", timeout=30_000)
    page.wait_for_function("() => [...document.querySelectorAll('#servers tbody tr')]"
                           ".every(row => !row.children[4].textContent.includes('–'))", timeout=30_000)  # steps measured
    rows = page.locator("#servers tbody tr")
    assert {rows.nth(index).get_attribute("data-peer") for index in range(3)} == set(servers)
    assert page.locator("#coverage .block").count() == 30 and page.locator("#coverage .block.gap").count() == 0
    spans = [rows.nth(index).locator("td").nth(1).text_content() for index in range(3)]
    assert spans == ["0:10", "10:20", "20:30"]
    assert all(rows.nth(index).locator("td").nth(2).text_content() == "online" for index in range(3))
    page.screenshot(path=str(tmp_path / "monitor.png"), full_page=True)
    assert (tmp_path / "monitor.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"monitor screenshot: {tmp_path / 'monitor.png'}")
