"""Driving `chat.py --serve`'s web page in a real browser: Debian's chromium and chromedriver through Selenium,
headless. tests/test_web.py and bench/screenshots.py use the same helpers: start a server, open the page, ask in the
chat, compare base and tuned, open the run.

No browser is downloaded: `missing()` says what is absent (`apt-get install -y chromium chromium-driver
fonts-noto-cjk`, `pip install selenium`), and callers skip or stop with that line.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
BROWSER, DRIVER = "chromium", "chromedriver"  # Debian's packages: chromium, chromium-driver
INSTALL = "apt-get install -y chromium chromium-driver fonts-noto-cjk"
CJK_FONT = Path("/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc")  # Debian's fonts-noto-cjk (.ci/run looks too)
START_TIMEOUT = 120  # seconds for chat.py --serve to load the model and answer /health
WAIT = 60  # seconds for anything on the page (an answer streams within it on 2 cores)


def missing() -> Optional[str]:
    """Why the page cannot be driven here, or None."""
    absent = [name for name in (BROWSER, DRIVER) if shutil.which(name) is None]
    if not CJK_FONT.is_file():
        absent.append("fonts-noto-cjk")  # without them Chinese answers render as boxes, and the layout checks lie
    if absent:
        return f"{' and '.join(absent)} not installed ({INSTALL})"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium, as the Makefile's test setup does)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def served(model: Path, log: Path, key_file: Optional[Path] = None, *flags: str):
    """`chat.py MODEL --serve` on a free local port, until the block ends: yields its base URL. Its output goes to
    `log` (a pipe nobody reads could fill up and stall it), quoted when it fails to start."""
    port = free_port()
    argv = [sys.executable, "chat.py", str(model), "--serve", "--port", str(port), *flags]
    if key_file is not None:
        argv += ["--api-key-file", str(key_file)]
    # One torch thread: a server and a test process spinning thread pools against each other on 2 cores crawl.
    env = {**{k: v for k, v in os.environ.items() if k != "SFT_API_KEY"}, "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, log)
        yield url
    finally:
        stop_process(proc)


def stop_process(proc: subprocess.Popen, seconds: float = 10) -> None:
    """SIGTERM (a server's graceful shutdown), then SIGKILL if it has not exited within `seconds`."""
    proc.terminate()
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=seconds)


def wait_ready(url: str, proc: subprocess.Popen, log: Path, seconds: float = START_TIMEOUT) -> None:
    """Until the server at `url` answers /health (tests/test_serve.py's servers too); its log's tail if it exits or
    takes longer."""
    import httpx2

    deadline = time.monotonic() + seconds
    while proc.poll() is None:
        try:
            if httpx2.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx2.TransportError:
            pass  # not listening yet
        if time.monotonic() > deadline:
            raise AssertionError(f"no /health within {seconds:g}s:\n{log.read_text(errors='replace')[-4000:]}")
        time.sleep(0.1)
    raise AssertionError(f"the server exited with {proc.returncode}:\n{log.read_text(errors='replace')[-4000:]}")


def chromium(width: int = 1200, height: int = 900):
    """Headless Chromium at this window size, through the system chromedriver (Selenium Manager downloads nothing:
    both paths are given)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which(BROWSER)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     f"--window-size={width},{height}", "--lang=zh-CN", "--hide-scrollbars"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which(DRIVER)))
    driver.set_script_timeout(WAIT)
    return driver


def wait_for(driver, script: str, what: str, seconds: float = WAIT):
    """Poll a JavaScript expression until it is truthy; its value. A timeout says what was awaited and what the page
    showed as an error."""
    deadline = time.monotonic() + seconds
    while True:
        value = driver.execute_script(f"return ({script});")
        if value:
            return value
        if time.monotonic() > deadline:
            shown = driver.execute_script("const e = document.getElementById('error');"
                                          "return e && !e.hidden ? e.textContent : '';")
            raise AssertionError(f"the page never showed {what} within {seconds:g}s" + (f" (error: {shown})" if shown
                                                                                      else ""))
        time.sleep(0.05)


def text_of(driver, element_id: str) -> str:
    return driver.execute_script("return document.getElementById(arguments[0]).textContent;", element_id)


def open_page(driver, url: str, key: Optional[str] = None) -> None:
    """Open the page and, when it asks for the API key, give it `key`; wait until it has the model's settings."""
    driver.get(url + "/")
    if key is not None:
        wait_for(driver, "!document.getElementById('key-form').hidden || document.body.dataset.ready",
                 "the key form or the ready page")
        if not driver.find_element("id", "key-form").is_displayed():
            return wait_for(driver, "document.body.dataset.ready", "the page ready")
        enter_key(driver, key)
    wait_for(driver, "document.body.dataset.ready", "the page ready")


def enter_key(driver, key: str) -> None:
    field = driver.find_element("id", "key")
    field.clear()
    field.send_keys(key)
    driver.find_element("css selector", "#key-form button").click()


def set_sampling(driver, temperature: float, max_tokens: int) -> None:
    """The Settings panel's temperature and max tokens (for a greedy, bounded answer)."""
    driver.execute_script("document.getElementById('settings').open = true;")
    for element_id, value in (("temperature", temperature), ("max-tokens", max_tokens)):
        field = driver.find_element("id", element_id)
        field.clear()
        field.send_keys(str(value))


def show_tab(driver, name: str) -> None:
    driver.find_element("css selector", f".tab-button[data-tab={name}]").click()


def chat(driver, question: str) -> str:
    """Type a question in the chat, send it, and wait for the whole streamed answer: its text."""
    show_tab(driver, "chat")
    before = len(driver.find_elements("css selector", ".message.assistant"))
    box = driver.find_element("id", "question")
    box.send_keys(question)
    driver.find_element("id", "send").click()
    wait_for(driver, f"document.querySelectorAll('.message.assistant').length > {before} && "
                     "document.body.dataset.chat === 'idle'", "the chat's answer")
    return driver.execute_script("const m = document.querySelectorAll('.message.assistant');"
                                 "return m[m.length - 1].querySelector('.text').textContent;")


def compare(driver, question: str) -> tuple[str, str]:
    """Ask the Compare tab one question; (base answer, tuned answer) once both have streamed."""
    show_tab(driver, "compare")
    box = driver.find_element("id", "compare-question")
    box.clear()
    box.send_keys(question)
    driver.find_element("id", "compare-send").click()
    wait_for(driver, "document.body.dataset.compare === 'idle'", "both answers")
    return text_of(driver, "answer-base"), text_of(driver, "answer-tuned")


def show_run(driver) -> None:
    """Open the Run tab and wait for its recipe table."""
    show_tab(driver, "run")
    wait_for(driver, "document.querySelectorAll('#recipe tr').length > 0 || "
                     "document.getElementById('run-note').textContent.includes('not part of a training run')",
             "the run")
