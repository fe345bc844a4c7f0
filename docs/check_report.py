"""Open a ``paser run`` report in headless Chromium at a given width and say whether it reads there: the page's
width, every table that has to scroll, every image that did not load, the narrowest chart; and a screenshot.

    python docs/check_report.py runs/demo/report.html --width 1200 --screenshot /tmp/report.png

Prints one JSON object; exits 1 when a table overflows its column, the page is wider than the window, or an image
is broken. Needs a Chromium binary (``chromium``, ``chromium-browser`` or ``google-chrome`` on PATH, or
``--browser``); the report itself needs none.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

MEASURE = """<script>window.addEventListener('load', () => {
  const wide = [...document.querySelectorAll('.wide')];
  const heading = d => {
    let e = d; while (e && !/^H[1-3]$/.test(e.tagName)) e = e.previousElementSibling; return e ? e.textContent : '';
  };
  const result = {
    page_width: document.documentElement.scrollWidth, window_width: window.innerWidth,
    tables: wide.length,
    overflowing_tables: wide.filter(d => d.scrollWidth > d.clientWidth + 1).map(d => [heading(d), d.scrollWidth, d.clientWidth]),
    images: document.images.length,
    broken_images: [...document.images].filter(i => !i.complete || i.naturalWidth === 0).length,
    narrowest_image: Math.round(Math.min(...[...document.images].map(i => i.getBoundingClientRect().width))),
    first_heading: (document.querySelector('h2') || {}).textContent || null,
  };
  const out = document.createElement('pre'); out.id = 'paser-check'; out.textContent = JSON.stringify(result);
  document.body.appendChild(out);
});</script>"""


def browser(given: str | None) -> str:
    for name in [given] if given else ["chromium", "chromium-browser", "google-chrome"]:
        found = shutil.which(name)
        if found:
            return found
    raise SystemExit("no Chromium found: install one (apt install chromium) or pass --browser PATH")


def measure(chromium: str, report: Path, width: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "report.html"
        page.write_text(report.read_text().replace("</body>", MEASURE + "</body>"))
        dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--window-size={width},900",
                              "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
                             capture_output=True, text=True, timeout=120).stdout
    found = re.search(r'<pre id="paser-check">([^<]*)</pre>', dom)
    if not found:
        raise SystemExit(f"{report}: the page did not finish loading in Chromium")
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--screenshot", type=Path, help="also write a full-width PNG of the top 2,400 px")
    parser.add_argument("--browser")
    args = parser.parse_args()
    chromium = browser(args.browser)
    result = {"report": str(args.report), **measure(chromium, args.report, args.width)}
    if args.screenshot:
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--window-size={args.width},2400", f"--screenshot={args.screenshot.resolve()}",
                        args.report.resolve().as_uri()], capture_output=True, timeout=120, check=True)
        result["screenshot"] = str(args.screenshot)
    print(json.dumps(result))
    reads = (not result["overflowing_tables"] and not result["broken_images"]
             and result["page_width"] <= result["window_width"])
    sys.exit(0 if reads else 1)


if __name__ == "__main__":
    main()
