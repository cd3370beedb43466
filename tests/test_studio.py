"""The studio page (``GET /``) in a real browser: Debian's chromium, driven by
Playwright (never a downloaded browser), against the stack ``make studio`` starts.

One stack and one browser for the module. The stack is ``atelier studio`` itself, as a
user runs it: a private redis-server, a tiny-sdxl worker (previews every 0.2 s) with
``file://`` storage, whose outputs reach the browser through the API's signed URLs,
and the API with a fresh key, which the test reads from the address it prints. The
last test stops it with Ctrl-C. Each state is saved as a screenshot in the test's tmp
dir.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.helpers import wait_until
from tests.servers import Process
from tests.studio_page import ended, shot, status, wait_js

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium")
ADDRESS = re.compile(r"open (http://127\.0\.0\.1:\d+)/#key=(\S+)")


class Studio:
    def __init__(self, proc: Process, tmpdir: Path) -> None:
        self.proc, self.tmpdir = proc, tmpdir
        match = ADDRESS.search(proc.log())
        assert match, proc.log()
        self.url, self.key = match.groups()
        self.api = httpx.Client(
            base_url=self.url, timeout=30, headers={"Authorization": f"Bearer {self.key}"}
        )


@pytest.fixture(scope="module")
def studio(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Studio]:
    root = tmp_path_factory.mktemp("studio")
    tmpdir = root / "tmp"  # the studio's folder goes in here: the last test checks it goes
    tmpdir.mkdir()
    env = {
        **os.environ,
        "ATELIER_MODELS_DIR": str(models_dir),
        "ATELIER_DEVICE": "cpu",
        "ATELIER_TORCH_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "TMPDIR": str(tmpdir),
    }
    proc = Process(
        [sys.executable, "-m", "producer.cli", "studio"],
        env,
        root / "studio.log",
        ready=b"Ctrl-C stops it all",
        grace=60,
    )
    try:
        proc.start(timeout=240)
        studio = Studio(proc, tmpdir)
        with studio.api:
            yield studio
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if CHROMIUM is None:
        pytest.fail("chromium is not installed (apt-get install -y chromium; .ci/run does it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, f"the page raised: {errors}"


def open_with_key(page: Any, studio: Studio) -> None:
    """The address ``make studio`` prints: the key in the fragment."""
    page.goto(f"{studio.url}/#key={studio.key}")
    page.wait_for_selector("#form-generate select[name=model] option", state="attached")


def test_the_key_prompt(page: Any, studio: Studio, tmp_path: Path) -> None:
    page.goto(studio.url + "/")
    key = page.locator("#key-input")
    key.wait_for()
    assert page.evaluate("document.activeElement.id") == "key-input"
    assert page.locator("#app").is_hidden()
    shot(page, tmp_path, "key-prompt")
    key.fill("not-a-key")
    page.keyboard.press("Enter")
    error = page.locator("#key-error")
    error.wait_for()
    assert "unknown API key" in error.inner_text()
    assert key.get_attribute("aria-invalid") is not None
    shot(page, tmp_path, "key-refused")
    key.fill(studio.key)
    page.get_by_role("button", name="Use this key").click()
    page.wait_for_selector("#form-generate select[name=model] option", state="attached")
    assert "tiny-sdxl" in page.locator("#form-generate select[name=model]").inner_text()
    # kept for the tab: a reload asks no more
    page.reload()
    page.wait_for_selector("#form-generate select[name=model] option", state="attached")
    assert page.locator("#key-panel").is_hidden()
    assert page.evaluate("sessionStorage.getItem('atelier.key')") == studio.key
    # the key never shows in the address
    page.goto(f"{studio.url}/#key={studio.key}")
    page.wait_for_selector("#form-generate select[name=model] option", state="attached")
    assert studio.key not in page.url


# Records what the watched job showed, as it showed it: each progress value and each
# preview picture (a MutationObserver sees every change, however quick).
RECORD_CHANGES = """() => {
  window.seen = {bar: [], previews: []};
  const bar = document.querySelector('[data-watch=bar]');
  const img = document.querySelector('[data-watch=preview]');
  new MutationObserver(() => {
    const v = bar.getAttribute('value');
    if (v !== null && window.seen.bar.at(-1) !== Number(v)) window.seen.bar.push(Number(v));
  }).observe(bar, {attributes: true});
  new MutationObserver(() => {
    const src = img.getAttribute('src');
    if (src && window.seen.previews.at(-1) !== src) window.seen.previews.push(src);
  }).observe(img, {attributes: true, attributeFilter: ['src']});
}"""


def watch_it_run(page: Any, tmp_path: Path) -> str:
    """Mid-job the bar has moved and a preview is shown, on the tile too; then it
    succeeds, the bar having risen to 60 and the preview changed: the job's id."""
    wait_js(
        page,
        "(window.seen.bar.filter(v => v > 0).length >= 2 && window.seen.bar.at(-1)"
        " >= 20 && window.seen.previews.length >= 2) || "
        "document.querySelector('#watch').dataset.status === 'succeeded'",
    )
    shot(page, tmp_path, "mid-job")
    assert status(page) == "running", "progress and a preview came while the job ran"
    job_id = page.get_attribute("#watch", "data-job-id")
    tile = page.locator(f"[data-gallery=list] li[data-job-id='{job_id}']")
    assert tile.locator(".badge").inner_text() == "running"  # on its tile too
    ended(page, "succeeded")
    shot(page, tmp_path, "finished")
    assert tile.locator(".badge").inner_text() == "succeeded"
    seen = page.evaluate("window.seen")
    bar = seen["bar"]
    assert bar == sorted(bar) and bar[-1] == 60 and len(set(bar)) >= 3, bar
    assert len(set(seen["previews"])) >= 2, "the preview changed as the job ran"
    assert all(p.startswith("data:image/webp;base64,") for p in seen["previews"])
    return str(job_id)


def check_the_final_image(page: Any, studio: Studio, job_id: str) -> None:
    """The final image, loaded at its natural size."""
    image = page.locator("#watch .results img")
    image.wait_for()
    wait_js(
        page,
        "document.querySelector('#watch .results img').complete && "
        "document.querySelector('#watch .results img').naturalWidth > 0",
        30,
    )
    assert image.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [64, 64]
    record = studio.api.get(f"/v1/jobs/{job_id}").json()
    assert record["status"] == "succeeded" and record["request"]["seed"] == 7


def check_the_gallery_after_a_reload(page: Any, tmp_path: Path, job_id: str) -> None:
    """After a reload the gallery lists it first, with its image; its detail downloads
    it, and "Again with this seed" fills the form."""
    page.reload()
    tile = page.locator("[data-gallery=list] li").first
    tile.wait_for()
    assert tile.get_attribute("data-job-id") == job_id
    wait_js(page, "document.querySelector('[data-gallery=list] li img')?.naturalWidth === 64", 30)
    shot(page, tmp_path, "gallery")
    tile.get_by_role("button").click()
    dialog = page.locator("#detail")
    dialog.wait_for()
    assert "a lighthouse at dusk" in dialog.inner_text()
    assert "succeeded" in dialog.inner_text() and "inference_ms" in dialog.inner_text()
    download = dialog.get_by_role("link", name="Download image 1")
    assert download.get_attribute("download") == f"{job_id}-0.png"
    shot(page, tmp_path, "detail")
    with page.expect_download() as got:
        download.click()
    saved = tmp_path / got.value.suggested_filename
    got.value.save_as(saved)
    assert saved.name == f"{job_id}-0.png"
    assert Image.open(saved).size == (64, 64)
    dialog.get_by_role("button", name="Again with this seed").click()
    assert dialog.is_hidden()
    assert page.get_by_label("Seed").input_value() == "7"
    assert page.get_by_label("Steps").input_value() == "60"
    assert page.evaluate("document.activeElement.name") == "prompt"


def test_a_job_from_submit_to_the_gallery(page: Any, studio: Studio, tmp_path: Path) -> None:
    open_with_key(page, studio)
    page.evaluate("() => { document.querySelector('[data-watch=bar]').value = 0; }")
    page.evaluate(RECORD_CHANGES)
    page.get_by_label("Prompt", exact=True).fill("a lighthouse at dusk")
    page.get_by_label("Steps").fill("60")
    page.get_by_label("Seed").fill("7")
    assert page.get_by_label("Live preview").is_checked()
    page.get_by_role("button", name="Generate").click()

    job_id = watch_it_run(page, tmp_path)
    check_the_final_image(page, studio, job_id)
    check_the_gallery_after_a_reload(page, tmp_path, job_id)


def test_a_refusal_shows_next_to_its_field(page: Any, studio: Studio, tmp_path: Path) -> None:
    open_with_key(page, studio)
    before = studio.api.get("/v1/jobs").json()["data"]
    page.get_by_label("Prompt", exact=True).fill("too wide")
    page.get_by_label("Width").fill("1024")  # tiny-sdxl's max_side is 512
    page.get_by_role("button", name="Generate").click()
    error = page.locator(".field[data-field=width] .field-error")
    error.wait_for()
    assert "512" in error.inner_text()
    width = page.get_by_label("Width")
    assert width.get_attribute("aria-invalid") == "true"
    assert error.get_attribute("id") in (width.get_attribute("aria-describedby") or "")
    assert page.evaluate("document.activeElement.name") == "width"
    assert page.locator(".field[data-field=height] .field-error").is_hidden()
    assert page.locator("#watch").is_hidden()
    shot(page, tmp_path, "field-error")
    assert studio.api.get("/v1/jobs").json()["data"] == before  # nothing was queued


def test_cancel_a_running_job(page: Any, studio: Studio, tmp_path: Path) -> None:
    open_with_key(page, studio)
    page.get_by_label("Prompt", exact=True).fill("a long one")
    page.get_by_label("Steps").fill("150")
    page.get_by_role("button", name="Generate").click()
    wait_js(page, "Number(document.querySelector('[data-watch=bar]').getAttribute('value')) > 0")
    assert status(page) == "running"
    shot(page, tmp_path, "running")
    page.get_by_role("button", name="Cancel job").click()
    ended(page, "cancelled", 60)
    shot(page, tmp_path, "cancelled")
    job_id = page.get_attribute("#watch", "data-job-id")
    record = studio.api.get(f"/v1/jobs/{job_id}").json()
    assert record["status"] == "cancelled"
    assert record["progress"]["step"] < 150
    assert page.locator("[data-watch=cancel]").is_hidden()
    assert page.locator(f"[data-gallery=list] li[data-job-id='{job_id}']").count() == 1


def test_submit_with_the_keyboard_only(page: Any, studio: Studio, tmp_path: Path) -> None:
    open_with_key(page, studio)
    # the prompt has the focus once the page is ready
    assert page.evaluate("document.activeElement.name") == "prompt"
    page.keyboard.type("typed, never clicked")
    visited = []
    for _ in range(30):
        page.keyboard.press("Tab")
        focused = page.evaluate("document.activeElement.name || document.activeElement.textContent")
        visited.append(focused)
        if focused == "Generate":
            break
    assert visited[-1] == "Generate", visited
    assert {"model", "width", "steps", "seed", "num_images"} <= set(visited)
    page.keyboard.press("Enter")
    ended(page, "succeeded")
    shot(page, tmp_path, "keyboard")
    job_id = page.get_attribute("#watch", "data-job-id")
    assert (
        studio.api.get(f"/v1/jobs/{job_id}").json()["request"]["prompt"] == "typed, never clicked"
    )
    # on a phone: one column, nothing wider than the screen
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("document.documentElement.scrollWidth <= innerWidth")
    form, watch = (page.locator(s).bounding_box() for s in ("#form-generate", "#watch"))
    assert form is not None and watch is not None and watch["y"] > form["y"] + form["height"]
    shot(page, tmp_path, "phone")


def offered(page: Any, name: str) -> list[str]:
    """The values a select of the generate form offers."""
    options = page.locator(f"#form-generate select[name={name}] option")
    return list(options.evaluate_all("os => os.map(o => o.value)"))


def test_a_lora_and_a_controlnet_from_the_models_lists(
    page: Any, studio: Studio, tmp_path: Path
) -> None:
    """The LoRA and ControlNet selects offer what ``GET /v1/models`` lists for the chosen
    model and follow it when it changes; what is picked reaches the job's request, the
    control image as the file's own bytes (sent inline)."""
    models = {m["name"]: m for m in studio.api.get("/v1/models").json()["models"]}
    open_with_key(page, studio)
    model = page.get_by_label("Model", exact=True)
    assert model.input_value() == "tiny-sdxl"
    sdxl, sd15 = models["tiny-sdxl"], models["tiny-sd15"]
    assert offered(page, "loras") == ["", *(lora["name"] for lora in sdxl["loras"])]
    assert offered(page, "control") == ["", *(c["name"] for c in sdxl["controlnets"])]
    # another family: its own ControlNets, and no LoRA field (it has none)
    model.select_option("tiny-sd15")
    assert offered(page, "control") == ["", *(c["name"] for c in sd15["controlnets"])]
    assert not sd15["loras"] and page.locator(".field[data-field=loras]").is_hidden()
    model.select_option("tiny-sdxl")
    assert page.locator(".field[data-field=loras]").is_visible()

    page.get_by_label("Prompt", exact=True).fill("a lighthouse, with a lora")
    page.get_by_label("LoRA", exact=True).select_option("tiny-sdxl-lora")
    page.get_by_label("LoRA weight").fill("0.5")
    shot(page, tmp_path, "lora")
    page.get_by_role("button", name="Generate").click()
    ended(page, "succeeded")
    job_id = page.get_attribute("#watch", "data-job-id")
    request = studio.api.get(f"/v1/jobs/{job_id}").json()["request"]
    assert request["loras"] == [{"name": "tiny-sdxl-lora", "scale": 0.5}]
    assert "control" not in request

    edges = tmp_path / "edges.png"
    picture = Image.new("RGB", (64, 64), (0, 0, 0))
    picture.paste((255, 255, 255), (16, 16, 48, 48))
    picture.save(edges)
    page.get_by_label("LoRA", exact=True).select_option("")
    page.get_by_label("ControlNet").select_option("tiny-sdxl-canny")
    page.get_by_label("Preprocess").select_option("canny")
    page.get_by_role("button", name="Generate").click()  # no control image: refused, by it
    page.locator(".field[data-field=control_image] .field-error").wait_for()
    page.get_by_label("Control image").set_input_files(str(edges))
    page.get_by_role("button", name="Generate").click()
    wait_js(page, f"document.querySelector('#watch').dataset.jobId !== '{job_id}'", 30)
    ended(page, "succeeded")
    job_id = page.get_attribute("#watch", "data-job-id")
    request = studio.api.get(f"/v1/jobs/{job_id}").json()["request"]
    (control,) = request["control"]
    assert control["name"] == "tiny-sdxl-canny" and control["preprocess"] == "canny"
    assert control["image"] == "sha256:" + hashlib.sha256(edges.read_bytes()).hexdigest()
    assert "loras" not in request


def test_a_cut_stream_resumes_after_its_last_event(page: Any, studio: Studio) -> None:
    """The events stream of a running job is cut after two events (the network, a
    proxy): the page asks again with Last-Event-ID and follows the rest from the real
    API to the job's end. (A reload resumes the watched job: the cut stream is its first.)"""
    job = studio.api.post("/v1/jobs", json={"prompt": "resumed", "steps": 20}).json()
    frames: list[str] = []
    with studio.api.stream("GET", f"/v1/jobs/{job['id']}/events") as stream:
        for line in stream.iter_lines():  # the first two frames, as the API sent them
            frames.append(line)
            if len([f for f in frames if f.startswith("id: ")]) == 2 and not line:
                break
    cut = "\n".join(frames) + "\n"
    asked: list[str | None] = []

    def events(route: Any) -> None:
        asked.append(route.request.headers.get("last-event-id"))
        if len(asked) == 1:
            route.fulfill(status=200, body=cut, headers={"Content-Type": "text/event-stream"})
        else:
            route.continue_()

    open_with_key(page, studio)
    page.route(f"**/v1/jobs/{job['id']}/events", events)
    page.evaluate(f"sessionStorage.setItem('atelier.watching', '{job['id']}')")
    page.reload()
    wait_js(
        page,
        "document.querySelector('[data-watch=step]').textContent === 'step 20 of 20'"
        " && document.querySelector('#watch').dataset.status === 'succeeded'",
    )
    ids = re.findall(r"^id: (\S+)$", cut, re.M)
    assert len(ids) == 2 and asked == [None, ids[-1]]


def test_the_gallery_loads_more_on_scroll(page: Any, studio: Studio, tmp_path: Path) -> None:
    """More jobs than a page (24): the rest come as the end of the list scrolls into
    view, newest first, each once. (sd-1.5 has no worker here: its jobs stay queued.)"""
    for i in range(30):
        res = studio.api.post("/v1/jobs", json={"prompt": f"queued {i}", "model": "sd-1.5"})
        assert res.status_code == 202, res.text
    mine = studio.api.get("/v1/jobs", params={"limit": 100}).json()["data"]
    assert len(mine) > 30
    open_with_key(page, studio)
    tiles = page.locator("[data-gallery=list] li")
    wait_js(page, "document.querySelectorAll('[data-gallery=list] li').length === 24", 30)
    assert tiles.count() == 24  # the first page; the end of the list is out of view
    page.locator("[data-gallery=more]").scroll_into_view_if_needed()
    wait_js(page, f"document.querySelectorAll('[data-gallery=list] li').length === {len(mine)}", 30)
    shown = page.eval_on_selector_all(
        "[data-gallery=list] li", "els => els.map(e => e.dataset.jobId)"
    )
    assert shown == [record["id"] for record in mine]
    shot(page, tmp_path, "gallery-scrolled")


def test_ctrl_c_stops_it_all(studio: Studio) -> None:
    """Last: Ctrl-C (SIGINT) ends ``atelier studio`` and every process it started."""
    studio.proc.signal(signal.SIGINT)
    assert studio.proc.proc is not None
    assert studio.proc.proc.wait(60) == 0, studio.proc.log()[-3000:]

    def lingering() -> list[str]:
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        return [line for line in ps.splitlines() if str(studio.tmpdir) in line]

    wait_until(
        lambda: not lingering(),
        10,
        interval=0.2,
        message=lambda: f"no process of the studio left: {lingering()}",
    )
    assert list(studio.tmpdir.iterdir()) == []
    with pytest.raises(httpx.TransportError):
        studio.api.get("/healthz")
