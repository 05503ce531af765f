"""A screenshot of the service's web page answering one question, from a trained run (docs/serve_page.png).

    .venv/bin/python scripts/serve_screenshot.py --run-dir RUN --question "Where was X born?" --out docs/serve_page.png

Starts `launch.py serve` on the run (a free loopback port), opens the page in headless Chromium (Playwright
from the `dev` extras driving the system browser, as the browser test does), asks the question through the
page and saves it once the answer shows. The run is only read.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.serve_client import serving  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", required=True)
    p.add_argument("--question", required=True)
    p.add_argument("--out", default="docs/serve_page.png")
    p.add_argument("--chromium", default=os.environ.get("REALM_CHROMIUM") or shutil.which("chromium"))
    p.add_argument("overrides", nargs="*", help="config overrides for the service (dotted keys)")
    a = p.parse_args(argv)
    if not a.chromium:
        p.error("no chromium: `apt-get install -y chromium` or --chromium PATH")
    from playwright.sync_api import sync_playwright

    with serving([f"run_dir={a.run_dir}", *a.overrides]) as svc, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=a.chromium, headless=True)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 760})
            page.goto(svc.url)
            page.wait_for_selector("#version:has-text('model')", timeout=60_000)  # the CSP refuses wait_for_function
            page.fill("#question", a.question)
            page.click("#submit")
            page.wait_for_selector("#result", state="visible", timeout=60_000)
            page.screenshot(path=a.out, full_page=True)
            print(f"{a.out}: answer {page.inner_text('#answer')!r}", flush=True)
        finally:
            browser.close()


if __name__ == "__main__":
    main()
