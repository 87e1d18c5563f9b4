"""The screenshots of the web page (docs/serving.md#the-web-page), from a real run: the chat with a Chinese answer,
base vs tuned side by side, and the run page. The run's adapter is served by `chat.py RUN/final --serve` (so that its
base can answer too) and driven in headless Chromium with the helpers tests/test_web.py uses (bench/browser.py).

    make demo && python bench/screenshots.py          # work_dirs/demo_smollm2 -> bench/screenshots/{chat,compare,run}.png
    python bench/screenshots.py work_dirs/psych_dpo --out /tmp/shots

Needs chromium, chromium-driver and fonts-noto-cjk (Debian) and selenium. Answers are sampled with the run's own
settings, as a user of the page would get them, so two takes differ.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench import browser  # noqa: E402
from common import artifacts  # noqa: E402

QUESTION = "我最近总是失眠，晚上躺在床上脑子停不下来，怎么办？"
FOLLOW_UP = "白天也总觉得很累，注意力不集中。"
WIDTH, HEIGHT = 1100, 820
MAX_HEIGHT = 2400  # the run page is taken whole, up to this many pixels


def shrink(path: Path) -> None:
    """Fewer colours, the same look: a screenshot of text needs far fewer than 16 million (a third of the bytes)."""
    from PIL import Image

    with Image.open(path) as image:
        image.convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def shoot(driver, path: Path, whole: bool = False) -> None:
    if whole:
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(WIDTH, min(height + 20, MAX_HEIGHT))
    driver.save_screenshot(str(path))
    driver.set_window_size(WIDTH, HEIGHT)
    shrink(path)
    print(f"{path} ({path.stat().st_size // 1024} KB)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", default="work_dirs/demo_smollm2", help="a run directory with final/ (an adapter)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "screenshots")
    p.add_argument("--max-tokens", type=int, default=96, help="answer length on the page (default 96)")
    args = p.parse_args(argv)
    problem = browser.missing()
    final = Path(args.run) / artifacts.FINAL_DIR
    if problem is None and not artifacts.is_adapter(final):
        problem = f"{final}: no adapter there (run `make demo` first, or name a run directory)"
    if problem:
        print(f"bench/screenshots.py: {problem}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    # Named relative to the repository (the server's working directory) where it is inside it: the page shows paths
    # as the server was given them, and the pictures in the docs should not show this machine's.
    served = Path(os.path.relpath(final.resolve(), ROOT)) if final.resolve().is_relative_to(ROOT) else final.resolve()
    with tempfile.TemporaryDirectory() as logs, browser.served(served, Path(logs) / "server.log") as url:
        driver = browser.chromium(WIDTH, HEIGHT)
        try:
            browser.open_page(driver, url)
            driver.execute_script("document.getElementById('max-tokens').value = arguments[0];", args.max_tokens)
            browser.chat(driver, QUESTION)
            browser.chat(driver, FOLLOW_UP)
            driver.execute_script("document.getElementById('settings').open = true; window.scrollTo(0, 0);")
            shoot(driver, args.out / "chat.png")
            driver.execute_script("document.getElementById('settings').open = false;")
            browser.compare(driver, QUESTION)
            shoot(driver, args.out / "compare.png")
            browser.show_run(driver)
            browser.wait_for(driver, "document.querySelector('#chart svg')", "the loss curve")
            shoot(driver, args.out / "run.png", whole=True)
        finally:
            driver.quit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
