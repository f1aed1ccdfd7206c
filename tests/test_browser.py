"""The page `glmvoice serve` serves, in a real headless Chromium (Debian's package, driven by Playwright) with a
WAV file of espeak-ng speech as its microphone, against a real server process on the tiny models.

GLMVOICE_SCREENSHOTS_DIR=docs/screenshots makes the run save the README's screenshots there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from glmvoice_cli.audio.io import load_audio
from glmvoice_cli.tiny.modelset import TinyModelSet

from .realtime_helpers import KEY, Server, saved_session, start_server

pytest.importorskip("starlette")
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (Debian: apt install chromium)")

SCREENSHOTS = os.environ.get("GLMVOICE_SCREENSHOTS_DIR")  # read at import: the tests' env drops GLMVOICE_*
CAPTURE_RATE = 48_000
OUT_RATE = 22_050  # the decoder's rate: what the server counts heard samples in
WAIT_MS = 120_000
DESKTOP = {"width": 1100, "height": 760}
PHONE = {"width": 390, "height": 780}
QUIET = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--autoplay-policy=no-user-gesture-required"]


def _espeak(text: str, folder: Path) -> np.ndarray:
    exe = shutil.which("espeak-ng")
    if exe is None:
        pytest.skip("espeak-ng is not installed")
    path = folder / f"{abs(hash(text))}.wav"
    subprocess.run([exe, "-w", str(path), text], check=True, timeout=60)
    return load_audio(path, CAPTURE_RATE).samples


def _wav(folder: Path, name: str, *parts: np.ndarray | float) -> Path:
    """A microphone file: arrays of speech and floats of silence (seconds), in order."""
    audio = [p if isinstance(p, np.ndarray) else np.zeros(int(p * CAPTURE_RATE), np.float32) for p in parts]
    path = folder / name
    sf.write(path, np.concatenate(audio), CAPTURE_RATE, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def server(tiny_models: TinyModelSet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("browser")
    # longer answers (about 8 s of speech) than the other tests': the barge-in below lands mid-answer even on
    # a loaded machine
    running = start_server(tiny_models.root, folder, "--session-dir", str(folder / "sessions"),
                           "--max-new-tokens", "120")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def playwright() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        yield p


def _browser(playwright: Any, microphone: Path | None, deny: bool = False) -> Any:
    args = [*QUIET, "--use-fake-device-for-media-stream"]
    if deny:
        args.append("--deny-permission-prompts")
    else:
        args.append("--use-fake-ui-for-media-stream")
    if microphone is not None:
        args.append(f"--use-file-for-fake-audio-capture={microphone}%noloop")
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)


def _page_url(server: Server, key: str | None = None) -> str:
    base = server.url.replace("ws://", "http://").removesuffix("/v1/realtime") + "/"
    return base + (f"#key={key}" if key else "")


def _shots(page: Any, name: str) -> None:
    folder = SCREENSHOTS
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    for label, size in (("desktop", DESKTOP), ("phone", PHONE)):
        page.set_viewport_size(size)
        page.screenshot(path=str(Path(folder) / f"{name}-{label}.png"), full_page=True)
    page.set_viewport_size(DESKTOP)


def _stats(page: Any) -> dict[str, Any]:
    return page.evaluate("() => JSON.parse(JSON.stringify(window.glmvoice.stats))")


def _connected(page: Any) -> None:
    page.wait_for_function("document.getElementById('connection').dataset.state === 'connected'", timeout=WAIT_MS)


def test_a_spoken_turn_is_answered_and_played_in_the_page(server: Server, playwright: Any, tmp_path: Path) -> None:
    question = _espeak("What is the weather like today?", tmp_path)
    browser = _browser(playwright, _wav(tmp_path, "mic.wav", 0.5, question, 8.0))
    try:
        page = browser.new_page(viewport=DESKTOP)
        page.goto(_page_url(server))
        _connected(page)
        _shots(page, "idle")
        page.get_by_role("button", name="Start talking").click()
        page.wait_for_function("Number(document.body.dataset.played || 0) > 2400", timeout=WAIT_MS)
        _shots(page, "mid-answer")
        page.wait_for_selector("#transcript li.assistant[data-status]", timeout=WAIT_MS)
        stats = _stats(page)
        answer = page.locator("#transcript li.assistant .text").first.inner_text()
        user = page.locator("#transcript li.user .text").first.inner_text()
        latency = page.locator("#latency").inner_text()
    finally:
        browser.close()
    assert stats["playedSamples"] > 24_000 // 2  # more than half a second of the answer came out of the speaker
    assert stats["latencies"] and 0 < stats["latencies"][0] < 60
    assert latency.startswith("end of voice → first sound:")
    assert user.startswith("Spoken turn (") and user.endswith(" s)")
    saved = saved_session(server, 2)
    assert answer.strip() and answer.strip() == (saved[1]["text"] or "").strip()


def test_speaking_over_the_answer_stops_it_and_the_history_keeps_what_was_played(
        server: Server, playwright: Any, tmp_path: Path, assistant: Any) -> None:
    from glmvoice_cli.pipeline.history import audio_tokens_heard

    first = _espeak("Tell me a long story about the sea.", tmp_path)
    second = _espeak("Wait, stop, tell me about mountains instead.", tmp_path)
    mic = _wav(tmp_path, "mic.wav", 0.5, first, 4.0, second, 10.0)
    # Chromium plays the file in a loop, in real time: on a machine too busy for the second question to land on
    # an answer being played, a later pass barges in, and a second page tries again; the test follows whichever
    # answer the page cut
    for attempt in range(BARGE_IN_ATTEMPTS):
        got = _barge_in(server, playwright, mic, last=attempt == BARGE_IN_ATTEMPTS - 1)
        if got is not None:
            break
    assert got is not None
    marked, status, stats = got
    assert marked and status == "cancelled"
    truncated = stats["truncations"][0]
    played_ms = stats["played"][truncated["item"]] * 1000 // 24_000
    assert truncated["audio_end_ms"] == played_ms > 0
    # the history keeps the audio tokens the page played (the server's own estimate, counted from sending, is
    # never shorter; the client's truncate brings it down to what was played)
    heard = audio_tokens_heard(played_ms * OUT_RATE // 1000, OUT_RATE)
    assert heard > 0
    tokenizer = assistant.lm.text_tokenizer
    kept: list[int] = []
    for lines in range(2, 14, 2):  # the cut answer's line is saved behind the answer: wait for it, bounded
        kept = [sum(1 for i in line["token_ids"] if tokenizer.is_audio(i)) for line in saved_session(server, lines)
                if line["role"] == "assistant" and line["interrupted"]]
        if heard in kept:
            break
    assert heard in kept, (heard, kept)


BARGE_IN_ATTEMPTS = 2


def _barge_in(server: Server, playwright: Any, mic: Path, last: bool) -> tuple[bool, str | None, dict] | None:
    """One page talking over its answer: (marked interrupted, its status, the page's stats), or None when no
    answer was cut in time (and this is not the last attempt)."""
    browser = _browser(playwright, mic)
    try:
        page = browser.new_page(viewport=DESKTOP)
        page.goto(_page_url(server))
        _connected(page)
        page.get_by_role("button", name="Start talking").click()
        try:
            page.wait_for_function("window.glmvoice.stats.truncations.length > 0", timeout=WAIT_MS)
        except sync_api.TimeoutError:
            if last:
                raise
            return None
        item = _stats(page)["truncations"][0]["item"]
        cut = page.locator(f'#transcript li.assistant[data-item="{item}"]')
        cut.and_(page.locator("[data-status]")).wait_for(timeout=WAIT_MS)
        _shots(page, "barge-in")
        return "interrupted" in (cut.get_attribute("class") or ""), cut.get_attribute("data-status"), _stats(page)
    finally:
        browser.close()


def test_a_typed_turn_is_answered(server: Server, playwright: Any) -> None:
    browser = _browser(playwright, None)
    try:
        page = browser.new_page(viewport=PHONE)
        page.goto(_page_url(server))
        _connected(page)
        page.get_by_label("Type a turn").fill("Hello from the keyboard")
        page.keyboard.press("Enter")
        page.wait_for_selector("#transcript li.assistant[data-status]", timeout=WAIT_MS)
        page.wait_for_function("Number(document.body.dataset.played || 0) > 0", timeout=WAIT_MS)
        user = page.locator("#transcript li.user .text").first.inner_text()
    finally:
        browser.close()
    assert user == "Hello from the keyboard"
    assert saved_session(server, 2)[0]["text"] == "Hello from the keyboard"


def test_a_denied_microphone_says_so_and_typing_still_works(server: Server, playwright: Any) -> None:
    browser = _browser(playwright, None, deny=True)
    try:
        page = browser.new_page(viewport=DESKTOP)
        page.goto(_page_url(server))
        _connected(page)
        page.get_by_role("button", name="Start talking").click()
        page.wait_for_function("document.body.dataset.mic === 'denied'", timeout=WAIT_MS)
        message = page.get_by_role("alert").inner_text()
    finally:
        browser.close()
    assert "Microphone access was denied" in message and "type" in message


def test_wrong_key_full_server_and_a_stopped_server(tiny_models: TinyModelSet, playwright: Any,
                                                    tmp_path: Path) -> None:
    guarded = start_server(tiny_models.root, tmp_path, "--api-key", KEY, "--max-sessions", "1", "--no-save")
    browser = _browser(playwright, None)
    try:
        first = browser.new_page(viewport=DESKTOP)
        first.goto(_page_url(guarded, KEY))
        _connected(first)
        wrong = browser.new_page(viewport=DESKTOP)
        wrong.goto(_page_url(guarded, "not-the-key"))
        wrong.wait_for_function("document.getElementById('connection').dataset.state === 'error'", timeout=WAIT_MS)
        refused = wrong.get_by_role("alert").inner_text()
        assert wrong.locator("#key-form").is_visible()
        asked = browser.new_page(viewport=DESKTOP)
        asked.goto(_page_url(guarded))  # no key in the URL: the page asks for one
        asked.wait_for_selector("#key-form:not([hidden])", timeout=WAIT_MS)
        full = browser.new_page(viewport=DESKTOP)
        full.goto(_page_url(guarded, KEY))
        full.wait_for_function("document.getElementById('message').textContent.includes('full')", timeout=WAIT_MS)
        assert guarded.stop() == 0
        first.wait_for_function("document.getElementById('message').textContent.includes('Connection lost')",
                                timeout=WAIT_MS)
        lost = first.get_by_role("alert").inner_text()
    finally:
        browser.close()
        guarded.stop()
    assert "refused this API key" in refused
    assert "Reconnecting" in lost
