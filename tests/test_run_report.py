"""The browsable run report, opened in a real headless Chromium (from a folder served over HTTP, as
S3 static hosting serves it, and straight from file://): every image loads, every link resolves,
failed subjects and QC failures first. Skipped only where no Chromium binary exists (.ci/run
installs Debian's `chromium` when apt is available)."""

from __future__ import annotations

import functools
import http.server
import io
import json
import re
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from PIL import Image
from prcore_testing import record_for
from prefect_harness import manifest_rows, subject_image, write_local_manifest

from prcore.data.load import load_manifest
from prcore.data.plan import plan
from prcore.outputs.reports import SubjectResult
from prcore.outputs.sidecar import write_image
from prcore.pipeline.report import write_report
from prcore.store.storage import LocalStore

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
ARTIFACTS = Path(__file__).resolve().parents[1] / "tests" / "artifacts"


def chromium(tmp_path: Path, *args: str, timeout: float = 120) -> str:
    profile = tmp_path / f"chrome-profile-{len(list(tmp_path.glob('chrome-profile-*')))}"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
           f"--user-data-dir={profile}", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    return done.stdout


@pytest.fixture
def output(tmp_path):
    """An output root with a run: s0 made 2 images of one prompt (one failing QC) and 1 of another, s1 failed."""
    manifest = write_local_manifest(tmp_path / "in", manifest_rows(2, prompts=2, num_images=2, steps=2), subjects=2)
    store = LocalStore(tmp_path / "out")
    jobs = plan(load_manifest(manifest), store=store, check=False)
    s0 = jobs[0]
    for r_i, request in enumerate(s0.requests):
        for i in range(request.num_images if r_i == 0 else 1):
            rec = record_for(request, i, run_id="r1", clip_t=0.3, clip_i=0.8, dino=0.2 if i == 1 else 0.7,
                             qc_pass=i != 1, width=64, height=64)
            write_image(store, rec, Image.open(io.BytesIO(subject_image(10 * r_i + i))))
    results = [SubjectResult("s0", requests=2, images=4, generated=3, contact_sheet="runs/r1/contact_sheets/s0.png", qc_failed=1),
               SubjectResult("s1", requests=2, images=4, error="instance image 1.png cannot be read", step="train")]
    summary = {"subjects": 2, "generated": 3, "skipped": 0, "failed_subjects": 1, "qc_failed": 1, "leased": 0}
    key = write_report(store, "r1", summary, jobs, results)
    return tmp_path / "out", key


def test_report_is_self_contained_and_orders_failures_first(output):
    out, key = output
    assert key == "runs/r1/index.html"
    page = (out / key).read_text()
    assert page.index("id='s1'") < page.index("id='s0'")  # the failed subject first
    assert "failed at train" in page and "QC fail" in page
    assert "http://" not in page and "https://" not in page and "<script" not in page  # nothing external
    hrefs = re.findall(r"href='([^']+)'", page)
    assert len(hrefs) == 3 and all((out / "runs" / "r1" / h).resolve().is_file() for h in hrefs)
    s0 = page[page.index("id='s0'"):]
    assert s0.count("alt='reference") == 2 and s0.index("QC fail") < s0.index("QC pass")  # QC failure first in its prompt


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (install Debian's `chromium`; .ci/run does)")
def test_report_in_a_headless_browser(output, tmp_path):
    out, key = output
    harness = out / "check-report.html"  # same origin as the report when served: it can look inside the iframe
    harness.write_text("""<!doctype html><html><body><iframe id="f" src="runs/r1/index.html" width="1200" height="900"></iframe>
<script>
document.getElementById('f').onload = async () => {
  const d = document.getElementById('f').contentDocument;
  const imgs = [...d.images];
  await Promise.all(imgs.map(i => i.complete ? 0 : new Promise(r => { i.onload = i.onerror = r; })));
  const links = [...d.querySelectorAll('a[href]')].map(a => a.href);
  const ok = await Promise.all(links.map(u => fetch(u).then(r => r.ok && r.headers.get('content-type') === 'image/png').catch(() => false)));
  const out = {images: imgs.length, broken: imgs.filter(i => !(i.naturalWidth > 0)).map(i => i.alt),
               links: links.length, dead: links.filter((u, k) => !ok[k]), title: d.title,
               first: [...d.querySelectorAll('h2')].map(h => h.textContent)};
  const p = document.createElement('pre'); p.id = 'result'; p.textContent = JSON.stringify(out); document.body.appendChild(p);
};
</script></body></html>""")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(out))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        dom = chromium(tmp_path, "--virtual-time-budget=15000", "--dump-dom", f"{base}/check-report.html")
        found = re.search(r"<pre id=\"result\">(.*?)</pre>", dom, re.S)
        assert found, dom[-2000:]
        result = json.loads(found[1].replace("&quot;", '"').replace("&amp;", "&"))
        assert result["images"] == 2 + 2 + 3 and result["broken"] == []  # s1's and s0's references, s0's 3 images
        assert result["links"] == 3 and result["dead"] == []
        assert result["title"] == "prcore run r1" and result["first"] == ["s1", "s0"]

        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "run_report.png"
        chromium(tmp_path, "--window-size=1000,1300", "--hide-scrollbars", f"--screenshot={shot}", f"{base}/{key}")
        with Image.open(shot) as im:
            assert im.size == (1000, 1300) and len(set(im.convert("L").getdata())) > 50  # a rendered page, not blank
        # straight from the folder (file://): the embedded thumbnails need nothing else
        dom = chromium(tmp_path, "--dump-dom", (out / key).as_uri())
        assert dom.count("<img") == 7 and "failed at train" in dom
    finally:
        server.shutdown()


def test_report_bounds_the_subjects_it_reads_images_of(tmp_path):
    """A night of many subjects: only the first ``max_subjects`` (failures first) get their images read and
    shown; the others are listed by result alone, and their stored images are never read."""
    from prcore.outputs.run_report import render_report
    from prcore.pipeline.report import report_subjects

    manifest = write_local_manifest(tmp_path / "in", manifest_rows(3, prompts=1, num_images=1, steps=2), subjects=3)

    class CountingStore(LocalStore):
        read: list[str] = []

        def get(self, key: str) -> bytes:
            self.read.append(key)
            return super().get(key)

    store = CountingStore(tmp_path / "out")
    jobs = plan(load_manifest(manifest), store=store, check=False)
    for job in jobs:
        write_image(store, record_for(job.requests[0], 0, run_id="r1", width=64, height=64), Image.open(io.BytesIO(subject_image(1))))
    results = [SubjectResult(j.subject_id, requests=1, images=1, generated=1) for j in jobs[:2]]
    results.append(SubjectResult(jobs[2].subject_id, requests=1, images=1, error="boom", step="sample"))
    store.read.clear()
    entries = report_subjects(store, jobs, results, max_subjects=1)
    assert [e["subject_id"] for e in entries] == [jobs[2].subject_id, jobs[0].subject_id, jobs[1].subject_id]  # the failure first
    assert entries[0].get("omitted") is None and [e.get("omitted") for e in entries[1:]] == [True, True]
    assert all(f"images/{jobs[i].subject_id}/" not in k for k in store.read for i in (0, 1))  # never read
    page = render_report("r1", {"subjects": 3}, entries)
    assert page.count("images not shown here") == 2
