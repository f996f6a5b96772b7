"""The voice page in a real browser: headless Chromium (Debian's, driven by Playwright) with a
fake microphone playing a wav file. The server's voice activity detection ends the spoken turn,
the answer's transcript appears, its audio chunks are scheduled for playback, and the stop button
cancels it. A screenshot is saved to test-artifacts/voice_page.png."""
import os
import shutil

import numpy as np
import pytest

from tests.conftest import ROOT
from tests.serve.conftest import API_KEY

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = os.path.join(ROOT, "test-artifacts")
# what Chromium needs here: no sandbox as root, no GPU, and no calls to Google's services, which
# this machine's closed network refuses
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--autoplay-policy=no-user-gesture-required",
         "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]


def test_page_hears_a_microphone_and_plays_the_answer(server, tmp_path):
    if not os.path.exists(CHROMIUM):
        message = "Debian's chromium is not installed (apt-get install chromium); .ci/run installs it"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    from demo_media import speech_like, write_wav
    from playwright.sync_api import sync_playwright

    # the question, then silence so the detector hears the turn end (%noloop: played once)
    question = tmp_path / "question.wav"
    write_wav(str(question), np.concatenate([np.zeros(8000, np.float32), speech_like(1.2, 16000, seed=7),
                                             np.zeros(48000, np.float32)]), rate=16000)
    os.makedirs(ARTIFACTS, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=FLAGS + [f"--use-file-for-fake-audio-capture={question}%noloop"])
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.fill("#key", API_KEY)
            page.click("#start")
            page.wait_for_function("window.voiceStats.connected", timeout=30000)
            page.wait_for_function("window.voiceStats.transcript.length > 0 && window.voiceStats.chunksScheduled > 0",
                                   timeout=300000)
            page.screenshot(path=os.path.join(ARTIFACTS, "voice_page.png"))
            page.click("#stop")
            page.wait_for_selector(".assistant.cancelled", timeout=60000)
            stats = page.evaluate("window.voiceStats")
            user_turns = page.locator(".user").all_text_contents()
            answer = page.locator(".assistant").first.text_content()
            problem_shown = page.locator("#problem").is_visible()
            page.fill("#text", "x" * 400)  # one unbroken 400-character word wraps inside the page
            page.click("#send")
            wraps = page.evaluate("(() => { const t = [...document.querySelectorAll('.user')].pop(); "
                                  "return t.scrollWidth <= t.clientWidth; })()")
        finally:
            browser.close()
    assert stats["errors"] == [] and not problem_shown and wraps
    assert len(user_turns) == 1 and user_turns[0].endswith("s of speech")  # the spoken turn, with its length
    assert answer and stats["transcript"].startswith(answer[:1])
    assert stats["secondsScheduled"] > 0 and stats["maxLevel"] > 0  # the meter moved with the question
    states = stats["states"]  # what the state pill showed, in order
    assert states[0] == "listening" and {"hearing", "thinking", "speaking"} <= set(states)
    assert states.index("hearing") < states.index("thinking") < states.index("speaking")
