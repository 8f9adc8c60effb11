"""The documentation site: `mkdocs build --strict` passes (a broken link or anchor fails it), and every page
of the nav renders in headless Chromium, served from loopback with every host name unresolvable, with no
console message, no script error, no failed load and no request that leaves the site.

Chromium is Debian's (`bash tests/setup-machine.sh` installs it); without it the browser test skips with the
reason, except under ``CI=true``, where it fails (tests/integration/test_report_browser.py's rule).
"""

from __future__ import annotations

import functools
import html
import http.server
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from tests.docs_blocks import REPO
from tests.integration.test_report_browser import chromium, page_requests

pytestmark = pytest.mark.slow

# Put first in every page's <head>: it records console errors and warnings, uncaught errors, rejected
# promises and resources that failed to load, then what rendered, into the DOM that --dump-dom prints.
PROBE = """<script>(function () {
  var seen = [];
  ["error", "warn"].forEach(function (level) {
    var original = console[level];
    console[level] = function () {
      seen.push("console." + level + ": " + Array.prototype.join.call(arguments, " "));
      return original.apply(console, arguments);
    };
  });
  window.addEventListener("error", function (e) {
    var t = e.target;
    seen.push(t && t !== window ? "failed to load " + (t.src || t.href || t.tagName) : "uncaught: " + e.message);
  }, true);
  window.addEventListener("unhandledrejection", function (e) { seen.push("unhandled rejection: " + e.reason); });
  window.addEventListener("load", function () {
    setTimeout(function () {
      var article = document.querySelector("article");
      var h1 = article && article.querySelector("h1");
      document.documentElement.setAttribute("data-probe", JSON.stringify({
        errors: seen,
        h1: h1 ? h1.textContent.replace(/\\u00b6/g, "").trim() : null,
        text: article ? article.innerText.length : 0,
        nav: Array.from(document.querySelectorAll("nav.md-nav--primary a.md-nav__link[href]"))
          .map(function (a) { return a.getAttribute("href"); }),
        ids: Array.from(document.querySelectorAll("article [id]")).map(function (e) { return e.id; }),
        styled: getComputedStyle(document.body).fontFamily !== ""
      }));
    }, 500);
  });
})();</script>"""


def build(site: Path, config: Path = REPO / "mkdocs.yml") -> subprocess.CompletedProcess:
    """`mkdocs build --strict` of ``config`` into ``site``."""
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
                          capture_output=True, text=True, timeout=900, cwd=config.parent,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})


def nav_pages() -> list[tuple[str, str]]:
    """(title, page) for every page of mkdocs.yml's nav, in order."""
    def walk(items):
        for item in items:
            ((title, target),) = item.items()
            yield from walk(target) if isinstance(target, list) else [(title, target)]
    return list(walk(yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"]))


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docs") / "site"
    proc = build(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WARNING" not in proc.stderr, proc.stderr[-3000:]
    return out


def test_the_site_builds_strictly_with_every_page_of_the_nav(site):
    pages = [page for _, page in nav_pages()]
    assert len(pages) == len(set(pages))
    assert sorted(pages) == sorted(str(p.relative_to(REPO / "docs")) for p in (REPO / "docs").rglob("*.md"))
    for page in pages:
        assert (site / page.replace(".md", ".html")).is_file(), page
    assert not list(site.rglob("*.py")), "docs/gen_ref.py is the build's hook, not a page"


@pytest.mark.parametrize("link", ["benchmarks.md#no-such-section", "no-such-page.md"])
def test_a_broken_link_fails_the_strict_build(link, tmp_path):
    """mkdocs.yml's own settings (the nav and the hook aside) on two pages, one with a broken link."""
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    config.pop("hooks")
    config["nav"] = [{"Data": "data.md"}, {"Benchmarks": "benchmarks.md"}]
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "benchmarks.md").write_text("# Benchmarks\n\n## The demo\n")
    (tmp_path / "docs" / "data.md").write_text("# Data\n\nSee [the benchmarks](benchmarks.md#the-demo).\n")
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config))
    assert build(tmp_path / "site", tmp_path / "mkdocs.yml").returncode == 0
    (tmp_path / "docs" / "data.md").write_text(f"# Data\n\nSee [the benchmarks]({link}).\n")
    proc = build(tmp_path / "site", tmp_path / "mkdocs.yml")
    assert proc.returncode != 0 and link in proc.stderr, proc.stderr[-2000:]


class _Site(http.server.SimpleHTTPRequestHandler):
    """Serves the built site, with :data:`PROBE` first in every HTML page."""

    def send_head(self):
        path = Path(self.translate_path(self.path))
        if path.suffix != ".html" or not path.is_file():
            return super().send_head()
        body = path.read_text().replace("<head>", "<head>" + PROBE, 1).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        import io

        return io.BytesIO(body)

    def log_message(self, *args):  # keep the test's output quiet
        pass


@pytest.fixture(scope="module")
def served(site):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Site, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def open_page(url: str, work: Path) -> dict:
    """Load ``url`` in headless Chromium; the probe's findings, the page's requests and Chromium's console
    lines."""
    work.mkdir(parents=True, exist_ok=True)
    netlog = work / "netlog.json"
    proc = subprocess.run(
        [chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--disable-extensions",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", f"--user-data-dir={work / 'profile'}",
         "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--enable-logging=stderr", "--v=0",
         "--window-size=1200,2400", "--virtual-time-budget=5000", f"--log-net-log={netlog}", "--dump-dom", url],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "<body" in proc.stdout, proc.stderr[-2000:]
    m = re.search(r'<html[^>]*data-probe="([^"]*)"', proc.stdout)
    assert m, "the probe did not run:\n" + proc.stderr[-2000:]
    console = [ln for ln in proc.stderr.splitlines() if ":CONSOLE" in ln]
    return {**json.loads(html.unescape(m[1])), "console": console, "requests": page_requests(netlog)}


def test_every_page_renders_in_chromium_offline_with_no_console_errors(served, tmp_path):
    pages = nav_pages()
    for i, (title, page) in enumerate(pages):
        url = f"{served}/{page.replace('.md', '.html')}"
        seen = open_page(url, tmp_path / f"page{i}")
        assert seen["errors"] == [] and seen["console"] == [], (page, seen["errors"], seen["console"])
        assert seen["h1"] and seen["text"] > 0, (page, seen)
        if page != "index.md":  # the home page's heading is the product's name
            assert seen["h1"] == title, (page, seen["h1"], title)
        outside = [r for r in seen["requests"] if not r.startswith(served + "/")]
        assert outside == [], f"{page} requested {outside}"
        # every page of the nav is linked from every page's navigation
        linked = {re.sub(r"#.*$", "", href).lstrip("./") or "index.html" for href in seen["nav"]}
        assert {p.replace(".md", ".html") for _, p in pages} <= linked, (page, sorted(linked))
        if page == "cli.md":
            assert {"edgeslim-demo", "edgeslim-fleet-webhook", "edgeslim-engine-build", "edgeslim-agent",
                    "mlflow-deployments-edge"} <= set(seen["ids"])
        if page == "recipe-reference.md":
            assert {"data-preprocess", "stages-quantize-auto", "task-detection-gate", "engines-verify"} <= \
                set(seen["ids"])


def test_the_page_check_sees_a_script_error_and_a_request_that_leaves(tmp_path):
    """The check is not vacuous: a page that throws and loads an image from elsewhere is caught."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "bad.html").write_text('<!doctype html><html><head></head><body><article><h1>Bad</h1>'
                                   '<img src="http://example.invalid/logo.png"></article>'
                                   '<script>undefinedFunction();</script></body></html>')
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Site, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        seen = open_page(f"http://127.0.0.1:{server.server_address[1]}/bad.html", tmp_path / "browser")
    finally:
        server.shutdown()
        server.server_close()
    assert any("undefinedFunction" in e for e in seen["errors"])
    assert any("example.invalid" in e for e in seen["errors"])
    assert "http://example.invalid/logo.png" in seen["requests"]
