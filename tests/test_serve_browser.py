"""The server's page in a real headless browser (Debian's chromium + chromedriver, driven
by selenium; `make chromium` installs them): choose an image, type labels, see one bar per
label with the server's scores, and the caption. The server is `mmjax serve` in its own
process on a free 127.0.0.1 port, stopped with SIGTERM at the end."""
import concurrent.futures
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from conftest import ROOT, xla_flags

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def server(serve_workdir, tmp_path_factory):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  log = tmp_path_factory.mktemp("serve") / "server.log"
  env = dict(os.environ, XLA_FLAGS=xla_flags(), PYTHONPATH=str(ROOT))
  with open(log, "w") as out:
    proc = subprocess.Popen([sys.executable, "-m", "mmjax.cli", "serve", "--workdir",
                             str(serve_workdir), "--port", str(port), "--max-batch", "2",
                             "--max-wait-ms", "1000"],
                            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
  url = f"http://127.0.0.1:{port}"
  end = time.time() + 300
  while True:
    assert proc.poll() is None, log.read_text()
    try:
      if httpx.get(url + "/readyz").status_code == 200:
        break
    except httpx.TransportError:
      pass
    assert time.time() < end, log.read_text()
    time.sleep(0.2)
  yield url, proc, log
  if proc.poll() is None:
    proc.kill()


@pytest.fixture()
def browser():
  assert pathlib.Path(CHROMIUM).is_file() and pathlib.Path(CHROMEDRIVER).is_file(), \
      "no chromium: run `make chromium`"
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
    options.add_argument(flag)
  driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
  yield driver
  driver.quit()


def test_drop_an_image_type_labels_see_the_bars(server, browser, tmp_path):
  url, _, _ = server
  image = tmp_path / "red.png"
  Image.new("RGB", (48, 48), (220, 20, 20)).save(image)
  labels = ["a red circle", "a blue square", "a green triangle"]
  expected = httpx.post(url + "/v1/zeroshot", files={"image": ("red.png", image.read_bytes(),
                                                               "image/png")},
                        data={"labels": labels}).json()

  browser.get(url + "/")
  browser.find_element(By.ID, "file").send_keys(str(image))
  browser.find_element(By.ID, "labels").send_keys("\n".join(labels))
  browser.find_element(By.ID, "go").click()
  rows = WebDriverWait(browser, 60).until(
      lambda d: d.find_elements(By.CSS_SELECTOR, "#bars .row") or
      (d.find_element(By.ID, "error").text and pytest.fail(d.find_element(By.ID, "error").text)))
  WebDriverWait(browser, 10).until(expected_conditions.visibility_of(rows[0]))
  shown = {r.get_attribute("data-label"): float(r.get_attribute("data-score")) for r in rows}
  assert shown == pytest.approx(dict(zip(labels, expected["scores"])), abs=1e-6)
  widths = [r.find_element(By.CSS_SELECTOR, ".bar").size["width"] for r in rows]
  track = rows[0].find_element(By.CSS_SELECTOR, ".track").size["width"]
  best = max(expected["scores"])
  assert widths == sorted(widths, reverse=True)             # best first
  assert widths[0] == pytest.approx(best * track, abs=2)   # a bar's length is its score
  assert rows[0].text.startswith(expected["best"])
  caption = httpx.post(url + "/v1/caption", files={"image": ("red.png", image.read_bytes(),
                                                             "image/png")}).json()["caption"]
  WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "caption").text)
  assert browser.find_element(By.ID, "caption").text == caption.strip()
  assert browser.find_element(By.ID, "error").text == ""


def test_sigterm_finishes_in_flight_requests_and_exits(server):
  url, proc, log = server
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    # A lone request waits --max-wait-ms (1 s) for company before its batch runs.
    answer = pool.submit(httpx.post, url + "/v1/embed/text", json={"texts": ["a cat"]},
                         timeout=60)
    end = time.time() + 30
    while "mmjax_queue_depth{function=\"text\"} 1.0" not in httpx.get(url + "/metrics").text:
      assert time.time() < end and not answer.done(), "the request never queued"
      time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert answer.result().status_code == 200
  proc.wait(60)
  text = log.read_text()
  assert "Finished server process" in text and "Traceback" not in text, text
  with pytest.raises(httpx.TransportError):
    httpx.get(url + "/healthz")
