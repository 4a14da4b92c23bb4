"""The search page in a real browser (Debian's headless chromium through Selenium) against the
service on the session's published sample index: upload an outfit photo, see its boxes and a row
of cards per object with thumbnails, click through to a product's neighbours, go back. Each step's
screenshot is saved under test-artifacts/page/ (readme.png is the README's picture)."""
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import browser
from conftest import free_port
from engine import demo, outfits

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "page"
WAIT_S = 60


@pytest.fixture(scope="module")
def service(published):
    from ray import serve

    from serve import app

    if not browser.install():
        if os.environ.get("CI"):
            pytest.fail("chromium and chromium-driver are needed (tests/browser.py could not install them)")
        pytest.skip("chromium not installed (apt-get install -y chromium chromium-driver)")
    cfg, rep = published
    cfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"port": free_port()})})
    base = app.start(cfg)
    yield base, cfg, rep
    serve.shutdown()


@pytest.fixture(scope="module")
def page(service):
    driver = browser.driver()
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


def wait(driver, what, message):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.2).until(lambda d: d.execute_script(what), message)


def shot(driver, name):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def ids_of(driver, view):
    return driver.execute_script(
        f"return [...document.querySelectorAll('{view} .cards')].map(l => [...l.querySelectorAll('a')].map(a => a.dataset.id))")


def thumbnails_loaded(driver) -> list[int]:
    """Every card's thumbnail scrolled into view (they load lazily), then its natural width."""
    driver.execute_script("document.querySelectorAll('.card img').forEach(i => { i.loading = 'eager'; })")
    wait(driver, "return [...document.querySelectorAll('.card img')].every(i => i.complete)", "thumbnails never loaded")
    return driver.execute_script("return [...document.querySelectorAll('.card img')].map(i => i.naturalWidth)")


def test_photo_search_click_through_and_back(service, page, tmp_path):
    from selenium.webdriver.common.by import By

    base, cfg, rep = service
    photo = tmp_path / "outfit.png"
    outfits.dataset(1, 7, held_out=True)[0][0].save(photo)  # the demo's outfit: items the detector never saw
    page.get(base + "/")
    wait(page, f"return document.getElementById('version').textContent.includes('{rep['index_version']}')",
         "the page never showed the index version")
    assert cfg.embed.model_version in page.find_element(By.ID, "version").text
    shot(page, "01-start")

    page.find_element(By.ID, "file").send_keys(str(photo))
    wait(page, "return document.querySelector('.search-view .photo rect') && document.body.dataset.state === 'ready'",
         "no boxes drawn after the upload")
    status, answer = demo.http_json("POST", f"{base}/search?k=10", *multipart(photo))
    assert status == 200
    boxes = page.find_elements(By.CSS_SELECTOR, ".search-view .photo rect")
    labels = [t.text for t in page.find_elements(By.CSS_SELECTOR, ".search-view .tag")]
    assert len(boxes) == len(answer["objects"]) >= 2, labels
    assert [label.split(" ")[1] for label in labels] == [o["category"] for o in answer["objects"]]
    rows = ids_of(page, ".search-view")
    assert rows == [[r["product_id"] for r in o["results"]] for o in answer["objects"]]  # same answers as the API
    assert all(len(r) == 10 for r in rows)
    widths = thumbnails_loaded(page)
    assert len(widths) == sum(map(len, rows)) and min(widths) > 0  # every thumbnail came from /thumb
    titles = [t.text for t in page.find_elements(By.CSS_SELECTOR, ".search-view .card .title")][:3]
    assert all(t and not t.startswith("fm-") for t in titles), titles  # titles, not bare ids
    page.execute_script("window.scrollTo(0, 0)")
    shot(page, "02-photo")
    readme_picture(page)

    first = page.find_element(By.CSS_SELECTOR, ".search-view .cards a")
    clicked = first.get_attribute("data-id")
    first.click()
    wait(page, f"return document.querySelector('.similar-view[data-product=\"{clicked}\"] .cards')",
         "clicking a card did not show its neighbours")
    assert f"similar={clicked}" in page.current_url
    neighbours = ids_of(page, ".similar-view")[0]
    status, similar = demo.http_json("GET", f"{base}/similar/{clicked}?k=10")
    assert neighbours == [r["product_id"] for r in similar["results"]] and neighbours != rows[0]
    assert clicked not in neighbours
    assert min(thumbnails_loaded(page)) > 0
    shot(page, "03-similar")

    page.back()
    wait(page, "return document.querySelector('.search-view .photo rect')", "back did not restore the photo's results")
    assert ids_of(page, ".search-view") == rows and "view=photo" in page.current_url
    shot(page, "04-back")
    page.forward()
    wait(page, f"return document.querySelector('.similar-view[data-product=\"{clicked}\"]')", "forward lost the product")
    assert ids_of(page, ".similar-view")[0] == neighbours

    box = page.find_element(By.ID, "product")  # a typed id, and a readable error for an unknown one
    box.clear()
    box.send_keys("no-such-product\n")
    wait(page, "return document.body.dataset.state === 'error'", "no error shown for an unknown product")
    assert "No such product" in page.find_element(By.ID, "message").text
    shot(page, "05-unknown-id")

    page.set_window_size(390, 844)  # a phone
    page.get(f"{base}/?similar={clicked}&k=6")
    wait(page, "return document.querySelectorAll('.similar-view .cards a').length === 6", "k from the URL not applied")
    assert page.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")  # no sideways page
    shot(page, "06-phone")
    page.set_window_size(1280, 1000)


def test_thumb_endpoint_caches_and_the_api_documents_its_answers(service, sample_catalog):
    import pyarrow.parquet as pq

    base, _, _ = service
    product = next(p for p in pq.read_table(sample_catalog).column("product_id").to_pylist() if p and p.startswith("fm-"))
    status, answer = demo.http_json("GET", f"{base}/similar/{product}?k=3")
    pid = answer["results"][0]["product_id"]
    assert answer["results"][0]["title"] and answer["title"]  # display columns, the product's own too
    with urllib.request.urlopen(f"{base}/thumb/{pid}") as resp:
        etag, data = resp.headers["ETag"], resp.read()
        assert resp.headers["Content-Type"] == "image/jpeg" and data[:2] == b"\xff\xd8"
        assert "max-age" in resp.headers["Cache-Control"]
    req = urllib.request.Request(f"{base}/thumb/{pid}", headers={"If-None-Match": etag})
    with pytest.raises(urllib.error.HTTPError) as cached:
        urllib.request.urlopen(req)
    assert cached.value.code == 304
    assert demo.http_json("GET", f"{base}/thumb/no-such-product")[0] == 404
    spec = json.loads(urllib.request.urlopen(f"{base}/openapi.json").read())
    result = spec["components"]["schemas"]["Result"]
    assert {"product_id", "category", "score"} <= set(result["required"]) and result.get("additionalProperties") is True
    upload = spec["paths"]["/search"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert upload["properties"]["image"]["format"] == "binary"
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert "/thumb/{product_id}" in spec["paths"] and "/" not in spec["paths"]


def multipart(path: Path) -> tuple[bytes, dict]:
    boundary = "page-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"outfit.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def readme_picture(driver):
    """The README's screenshot (docs/page.png is a copy): the upper part of the page, shrunk and
    quantised to stay small."""
    import io

    from PIL import Image

    size = driver.get_window_size()
    driver.set_window_size(1280, 1320)  # the photo and two items' rows
    img = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    driver.set_window_size(size["width"], size["height"])
    img = img.resize((img.width * 3 // 4, img.height * 3 // 4), Image.Resampling.LANCZOS)
    img.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(ARTIFACTS / "readme.png", optimize=True)
