"""Open saved pages in headless Chromium, offline: DOM dumps, PNG screenshots, request logs.

Uses Debian's `/usr/bin/chromium` (`scripts/install_browser.sh`) through its command line only.
Every run is cut off from the network: all requests go to a closed proxy on 127.0.0.1:9 and host
names resolve to nothing. Chromium's net log is kept, so a caller can check that the page asked
for nothing outside the document (`BrowserRun.page_requests`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "REPORT_PARTS",
    "BrowserRun",
    "NetRequest",
    "dump_dom",
    "find_chromium",
    "read_net_log",
    "report_screenshots",
    "screenshot",
]

OFFLINE_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--disable-breakpad",
    "--disable-dev-shm-usage",
    "--disable-features=NetworkTimeServiceQuerying,OptimizationHints,Translate,MediaRouter",
    "--no-pings",
    "--hide-scrollbars",
    "--proxy-server=127.0.0.1:9",
    "--host-resolver-rules=MAP * ~NOTFOUND",
)


def find_chromium() -> str | None:
    """Path of the Chromium binary (`$TLD_CHROMIUM`, /usr/bin/chromium, or on PATH), or None."""
    for cand in (os.environ.get("TLD_CHROMIUM"), "/usr/bin/chromium"):
        if cand and os.access(cand, os.X_OK):
            return cand
    return shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass(frozen=True)
class NetRequest:
    """One URL request from Chromium's net log; `from_page` is False for the browser's own."""

    url: str
    initiator: str
    from_page: bool


@dataclass
class BrowserRun:
    """What one headless run produced."""

    dom: str
    requests: list[NetRequest] = field(default_factory=list)
    seconds: float = 0.0
    stderr: str = ""

    @property
    def page_requests(self) -> list[NetRequest]:
        """Requests the page made (subresources, fetch, ...), excluding Chromium's own."""
        return [r for r in self.requests if r.from_page]

    @property
    def remote_page_requests(self) -> list[NetRequest]:
        """Page requests for anything but `file:`/`data:`/`blob:`/`about:` URLs."""
        local = ("file:", "data:", "blob:", "about:")
        return [r for r in self.page_requests if not r.url.startswith(local)]


def read_net_log(path: str | Path) -> list[NetRequest]:
    """URL requests in a Chromium `--log-net-log` file. Browser-internal requests (updater,
    account checks) carry the initiator "not an origin"; the page's carry its origin."""
    text = Path(path).read_text(encoding="utf-8", errors="replace").rstrip()
    try:
        log = json.loads(text)
    except json.JSONDecodeError:  # an unfinished log lacks its closing brackets
        log = json.loads(text.rstrip(",") + "]}")
    types = {v: k for k, v in log["constants"]["logEventTypes"].items()}
    out = []
    for ev in log.get("events", []):
        params = ev.get("params") or {}
        if types.get(ev["type"]) == "URL_REQUEST_START_JOB" and "url" in params:
            initiator = str(params.get("initiator", ""))
            out.append(NetRequest(params["url"], initiator, initiator != "not an origin"))
    return out


def _run(
    html_path: str | Path, extra: list[str], budget_ms: int, timeout: float
) -> tuple[subprocess.CompletedProcess, list[NetRequest], float]:
    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError("chromium not found; run scripts/install_browser.sh")
    url = Path(html_path).resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="tld-chromium-") as tmp:
        net_log = Path(tmp) / "net-log.json"
        cmd = [
            exe,
            *OFFLINE_FLAGS,
            f"--user-data-dir={tmp}/profile",
            f"--log-net-log={net_log}",
            f"--virtual-time-budget={budget_ms}",
            *extra,
            url,
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp)
        seconds = time.perf_counter() - t0
        requests = read_net_log(net_log) if net_log.exists() else []
    if proc.returncode != 0:
        raise RuntimeError(f"chromium exited {proc.returncode}: {proc.stderr[-2000:]}")
    return proc, requests, seconds


def dump_dom(
    html_path: str | Path,
    budget_ms: int = 5000,
    width: int = 1280,
    height: int = 900,
    timeout: float = 120.0,
) -> BrowserRun:
    """Load the page offline, let scripts run for `budget_ms` of virtual time, return the
    serialised DOM and the requests made."""
    proc, requests, seconds = _run(
        html_path, ["--dump-dom", f"--window-size={width},{height}"], budget_ms, timeout
    )
    return BrowserRun(proc.stdout, requests, seconds, proc.stderr)


def screenshot(
    html_path: str | Path,
    png_path: str | Path,
    width: int = 1280,
    height: int = 900,
    budget_ms: int = 5000,
    timeout: float = 120.0,
) -> Path:
    """A PNG of the rendered page (viewport `width` x `height`), taken offline."""
    png_path = Path(png_path).resolve()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    _run(
        html_path,
        [f"--screenshot={png_path}", f"--window-size={width},{height}"],
        budget_ms,
        timeout,
    )
    if not png_path.exists():
        raise RuntimeError(f"chromium wrote no screenshot to {png_path}")
    return png_path


REPORT_PARTS: dict[str, tuple[str, int]] = {
    "summary": ("report_summary.png", 760),
    "graph": ("report_graph.png", 820),
    "features": ("report_features.png", 900),
    "ablation": ("report_ablation.png", 820),
    "attribution": ("report_ioi.png", 640),
}
"""Parts of a study report page (`viz.report`): PNG name and viewport height."""

_ONE_PART = """<style>.tld-page > .tld-section:not(.tld-shot) {{ display: none; }}
.tld-page > h1, .tld-page > .tld-desc {{ display: none; }}</style>
<script>window.addEventListener("load", function () {{
  var part = document.querySelector('.tld-part[data-part="{part}"]');
  if (!part) {{ document.body.setAttribute("data-missing-part", "1"); return; }}
  part.closest(".tld-section").classList.add("tld-shot");
  // open the panel of the top feature of the second-to-last site (late: logit effects too)
  var nodes = Array.prototype.slice.call(part.querySelectorAll(".tld-node"));
  var sites = nodes.map(function (n) {{ return n.getAttribute("data-site"); }})
    .filter(function (s, i, all) {{ return all.indexOf(s) === i; }});
  var site = sites[Math.max(0, sites.length - 2)];
  var node = nodes.filter(function (n) {{ return n.getAttribute("data-site") === site; }})[0];
  if (node) node.dispatchEvent(new MouseEvent("click", {{ bubbles: true }}));
  window.scrollTo(0, 0);
}});</script>
"""


def report_screenshots(
    page: str | Path,
    out_dir: str | Path,
    parts: Mapping[str, tuple[str, int]] | None = None,
    width: int = 1400,
    budget_ms: int = 6000,
) -> dict[str, Path]:
    """PNGs of a study report's parts (`REPORT_PARTS` by default), each taken offline from a
    copy of `page` that shows only that part (in the graph, the top feature of the
    second-to-last site clicked open).
    Writes `out_dir/<name>.png`; a part the page lacks is skipped."""
    html_text = Path(page).read_text(encoding="utf-8")
    out = Path(out_dir)
    shots: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="tld-shots-") as tmp:
        for part, (name, height) in (parts or REPORT_PARTS).items():
            if f'data-part="{part}"' not in html_text:
                continue
            copy = Path(tmp) / f"{part}.html"
            copy.write_text(
                html_text.replace("</body>", _ONE_PART.format(part=part) + "</body>", 1),
                encoding="utf-8",
            )
            shots[part] = screenshot(copy, out / name, width, height, budget_ms)
    return shots
