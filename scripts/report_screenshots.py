"""Screenshots of a study report's parts for the docs: `python scripts/report_screenshots.py
out/demo/lm/report.html [docs/img]` writes docs/img/report_{summary,graph,features,ablation,
ioi}.png, taken offline in headless Chromium (scripts/install_browser.sh)."""

import sys
from pathlib import Path

from tl_degeneracy.viz.screenshot import report_screenshots

if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    out = Path(sys.argv[2]) if len(sys.argv) == 3 else Path(__file__).parents[1] / "docs" / "img"
    for part, path in report_screenshots(sys.argv[1], out).items():
        print(f"{part}: {path}")
