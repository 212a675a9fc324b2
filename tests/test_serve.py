"""The caption server: the real process on a loopback port, real HTTP, a real headless browser.

Answers are checked against ``captioner.caption.caption_images`` on the same files; each kind of
bad request gets its 4xx and the server then still answers; concurrent clients are batched.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from benchmarks.serving import running_server
from captioner.caption import caption_images
from captioner.serve import Batcher
from test_caption import picture, save_checkpoint, tiny_model, write_bad_images, write_good_images

BEAM, MAX_LEN = 3, 6
MAX_PIXELS = 100_000
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def varied_model(**encoder):
    """The caption tests' tiny model with sharper outputs: its captions differ between the test
    pictures, some end with <end> and some are cut at max_len."""
    model = tiny_model()
    if encoder:
        model = type(model)(**{**model.hparams, "encoder": {**model.hparams.encoder, **encoder}},
                            word_map=model.word_map, run_config=model.run_config)
    decoder = model.captioner.decoder
    with torch.no_grad():
        decoder.fc.bias[model.word_map.end_id] = 0.0
        decoder.fc.weight.mul_(50)
        decoder.init_h.weight.mul_(10)
    return model.eval()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``python -m captioner.serve`` on a free loopback port with a tiny checkpoint; yields
    (base URL, checkpoint, good image files, bad image files)."""
    root = tmp_path_factory.mktemp("serve")
    ckpt = save_checkpoint(varied_model(), root / "model.ckpt")
    good = [p for p in write_good_images(root / "images") if p.name != "g_large.png"]
    bad = write_bad_images(root / "images")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    overrides = [f"ckpt_path={ckpt}", f"beam={BEAM}", f"max_len={MAX_LEN}", "max_batch_size=4", "batch_timeout=0.5",
                 f"max_pixels={MAX_PIXELS}", "max_bytes=200000", "threads=1",
                 f"paths.output_root={root / 'outputs'}"]
    with running_server(overrides, root, env, startup_s=180) as url:
        yield url, ckpt, good, bad


@pytest.fixture(scope="module")
def expected(served):
    """The caption CLI's results for the good files (same checkpoint and search settings)."""
    _, ckpt, good, _ = served
    from captioner.lit_module import CaptioningModule

    model = CaptioningModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    return {r.path: r for r in caption_images(model, good, 32, BEAM, MAX_LEN)}


def post_file(url: str, path: Path, **params) -> requests.Response:
    with open(path, "rb") as f:
        return requests.post(f"{url}/predict", files={"image": (path.name, f)}, params=params, timeout=120)


def test_server_answers_as_the_caption_cli_for_every_upload_form(served, expected):
    url, _, good, _ = served
    assert requests.get(f"{url}/health", timeout=10).json()["status"] == "ok"
    captions = set()
    for path in good:
        want = expected[path]
        assert want.ok, want.error
        answer = post_file(url, path).json()
        assert answer["caption"] == want.caption and answer["tokens"] == want.tokens, path
        assert answer["words"] == want.words and answer["finished"] == want.finished
        assert answer["score"] == pytest.approx(want.score, abs=1e-4)
        assert "attention" not in answer
        captions.add(answer["caption"])
    assert len(captions) > 1 and any(captions)  # the files are told apart, not one constant caption
    path, want = good[0], expected[good[0]]
    encoded = base64.b64encode(path.read_bytes()).decode()
    as_json = requests.post(f"{url}/predict", json={"image": encoded}, timeout=120).json()
    as_data_url = requests.post(f"{url}/predict", json={"image": f"data:image/jpeg;base64,{encoded}"},
                                timeout=120).json()
    raw = requests.post(f"{url}/predict", data=path.read_bytes(), headers={"Content-Type": "image/jpeg"},
                        timeout=120).json()
    for answer in (as_json, as_data_url, raw):
        assert answer["caption"] == want.caption and answer["tokens"] == want.tokens


def test_attention_grid_has_a_row_per_word_summing_to_one(served, expected):
    url, _, good, _ = served
    for path in good[:3]:
        for answer in (post_file(url, path, attention="true").json(),
                       requests.post(f"{url}/predict", json={"image": base64.b64encode(path.read_bytes())
                                                             .decode(), "attention": True}, timeout=120).json()):
            want = expected[path]
            rows = np.array(answer["attention"])
            assert answer["attention_words"] == want.words + (["<end>"] if want.finished else [])
            assert rows.shape == (len(answer["attention_words"]), answer["grid"][0] * answer["grid"][1])
            assert answer["grid"] == [2, 2]
            np.testing.assert_allclose(rows.sum(axis=1), 1.0, atol=1e-5)
            np.testing.assert_allclose(rows, want.alphas.numpy(), atol=1e-5)


def test_each_bad_request_gets_its_4xx_and_the_server_keeps_serving(served, expected, tmp_path):
    url, _, good, bad = served
    truncated, text = bad
    big = tmp_path / "big.png"
    Image.fromarray(picture(400, 300)).save(big)  # 120,000 pixels > max_pixels
    huge = tmp_path / "huge.bmp"
    Image.fromarray(picture(300, 300)).save(huge)  # 270 kB > max_bytes
    cases = [
        (lambda: post_file(url, text), 422, "not an image"),
        (lambda: post_file(url, truncated), 422, "truncated"),
        (lambda: post_file(url, big), 413, "max_pixels"),
        (lambda: post_file(url, huge), 413, "max_bytes"),
        (lambda: requests.post(f"{url}/predict", timeout=60), 400, "empty request body"),
        (lambda: requests.post(f"{url}/predict", files={"image": ("e.png", b"")}, timeout=60), 400, "empty"),
        (lambda: requests.post(f"{url}/predict", files={"photo": ("a.jpg", good[0].read_bytes())},
                               timeout=60), 400, "no file field 'image'"),
        (lambda: requests.post(f"{url}/predict", data="{not json", timeout=60,
                               headers={"Content-Type": "application/json"}), 400, "malformed JSON"),
        (lambda: requests.post(f"{url}/predict", json={"image": "%%%"}, timeout=60), 400, "base64"),
        (lambda: requests.post(f"{url}/predict", json={"picture": "AAAA"}, timeout=60), 400, "'image'"),
        (lambda: requests.post(f"{url}/predict", data=b"abc", headers={"Content-Type": "text/plain"},
                               timeout=60), 415, "Content-Type"),
        (lambda: post_file(url, good[0], attention="maybe"), 400, "attention must be true or false"),
    ]
    for send, status, message in cases:
        response = send()
        assert response.status_code == status, (message, response.text)
        assert message in response.json()["error"]
        after = post_file(url, good[1])  # still serving
        assert after.status_code == 200 and after.json()["caption"] == expected[good[1]].caption


def test_concurrent_clients_are_batched_and_bad_ones_fail_alone(served, expected):
    url, _, good, bad = served
    jobs = [good[i % len(good)] for i in range(12)] + bad * 2
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda p: post_file(url, p), jobs))
    for path, response in zip(jobs, responses):
        if path in bad:
            assert response.status_code == 422, response.text
        else:
            assert response.status_code == 200, response.text
            assert response.json()["caption"] == expected[path].caption
    batches = requests.get(f"{url}/health", timeout=10).json()["batches"]
    assert batches["largest"] > 1  # concurrent requests shared a search
    assert batches["largest"] <= 4  # max_batch_size


def test_demo_page_in_headless_chromium_shows_caption_and_overlay(served, expected):
    if not Path(CHROMIUM).is_file() and shutil.which("chromium") is None:
        pytest.skip(f"no chromium at {CHROMIUM} or on PATH (.ci/run installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    url, _, good, _ = served
    path = good[0]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).is_file()
                                    else shutil.which("chromium"), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{url}/", timeout=60_000)
            page.set_input_files("#file", str(path))
            page.wait_for_selector("#overlay[data-word]", state="attached", timeout=120_000)
            want = expected[path]
            assert page.text_content("#caption") == (want.caption or "(empty caption)")
            words = page.locator("#words button").all_text_contents()
            assert words == want.words + (["<end>"] if want.finished else [])
            assert page.get_attribute("#overlay", "data-word") == words[0]
            assert "s on the server" in page.text_content("#timing")
            # The overlay has pixels drawn from the returned grid: darker where attention is low.
            alpha = page.evaluate("""() => {
                const c = document.getElementById('overlay');
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                let s = 0; for (let i = 3; i < d.length; i += 4) s += d[i]; return s; }""")
            assert alpha > 0
            # Another word redraws the overlay without a request.
            if len(words) > 1:
                page.locator("#words button").nth(1).click()
                assert page.get_attribute("#overlay", "data-word") == words[1]
        finally:
            browser.close()


# ----------------------------------------------------------------------------- decoding
def test_uploaded_bytes_decode_to_the_pixels_of_the_file(tmp_path):
    """The server decodes an upload's bytes exactly as the caption CLI decodes the file."""
    from captioner.data.images import load_image
    from captioner.serve import RequestError, decode_image

    for path in write_good_images(tmp_path / "images"):  # JPEGs (draft mode, CMYK, gray) and PNGs
        for draft in (0.8, None):
            want = load_image(path, 32, draft)
            np.testing.assert_array_equal(decode_image(path.read_bytes(), 32, draft, 10**7), want)
    with pytest.raises(RequestError, match="640x400 = 256000 pixels") as error:
        decode_image((tmp_path / "images" / "g_large.png").read_bytes(), 32, 0.8, 100_000)
    assert error.value.status == 413


# ----------------------------------------------------------------------------- the batcher
def test_batcher_groups_concurrent_items_and_a_failing_batch_fails_only_its_own():
    sizes = []

    def run(items):
        sizes.append(len(items))
        if "boom" in items:
            raise RuntimeError("model failure")
        return [item * 2 for item in items]

    async def main():
        batcher = Batcher(run, max_batch_size=3, batch_timeout=0.2)
        await batcher.start()
        try:
            first = await asyncio.gather(*(batcher.submit(x) for x in [1, 2, 3, 4, 5]))
            failed = await asyncio.gather(batcher.submit("boom"), batcher.submit(7), return_exceptions=True)
            after = await batcher.submit(8)
        finally:
            await batcher.stop()
        return first, failed, after

    first, failed, after = asyncio.run(main())
    assert first == [2, 4, 6, 8, 10]
    assert sizes[:2] == [3, 2]  # batches fill up to max_batch_size, in arrival order
    assert all(isinstance(r, RuntimeError) for r in failed)  # the same batch shares the failure
    assert after == 16 and sizes[-1] == 1  # and the next batch runs
