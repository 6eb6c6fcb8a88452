"""The web page at `/` in headless Chromium (Debian's chromium), driven over the DevTools protocol:
load the page, see the adapters listed, type a prompt, pick an adapter and scale, set seed and
steps, generate, and check the image appeared. The screenshot's path is printed."""

from __future__ import annotations

import base64
import io
import itertools
import json
import shutil
import socket
import subprocess
import time

import pytest
import requests
from PIL import Image

from rayimg.config import ServeJob, from_dict

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (apt-get install chromium)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def page_app(ray_cluster, publish_tiny_lora, tmp_path_factory):
    from ray import serve

    from serving.app import start

    tmp = tmp_path_factory.mktemp("serve-page")
    registry = str(tmp / "registry")
    publish_tiny_lora(registry, "page-style", seed=5)
    job = from_dict(ServeJob, {
        "registry": registry, "model": {"device": "cpu"}, "app_name": "page",
        "defaults": {"steps": 2, "width": 64, "height": 64, "guidance_scale": 3.0},
        "limits": {"max_width": 128, "max_height": 128, "max_steps": 20},
        "http": {"host": "127.0.0.1", "port": free_port(), "route_prefix": "/page"},
        "autoscaling": {"min_replicas": 1, "max_replicas": 1},
        "adapter_cache": {"disk_dir": str(tmp / "adapters")},
        "num_cpus_per_replica": 0.5, "num_cpus_ingress": 0.1,
    })
    url = start(job)
    yield url
    serve.delete("page")


class DevTools:
    """A minimal Chrome DevTools Protocol client over one page's WebSocket."""

    def __init__(self, ws_url: str):
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=64 * 2**20)
        self.ids = itertools.count(1)

    def call(self, method: str, **params):
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv(timeout=60))
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 90.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.2)
        status = self.js("document.getElementById('status').textContent")
        raise AssertionError(f"timed out waiting for {expression}; page status: {status!r}")


@pytest.fixture
def browser(tmp_path):
    profile = tmp_path / "chromium-profile"
    proc = subprocess.Popen([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                             "--no-first-run", "--remote-debugging-port=0", f"--user-data-dir={profile}",
                             "--window-size=900,900", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.time() + 60
        while not port_file.is_file() or not port_file.read_text().strip():
            assert proc.poll() is None, "chromium exited at start"
            assert time.time() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        pages = [t for t in requests.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json() if t["type"] == "page"]
        tools = DevTools(pages[0]["webSocketDebuggerUrl"])
        yield tools
        tools.ws.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_web_page_generates_an_image(page_app, browser, tmp_path):
    tools = browser
    tools.call("Page.enable")
    tools.call("Page.navigate", url=f"{page_app}/")
    # The adapters come from GET /v1/adapters.
    assert tools.wait_for("document.querySelectorAll('#adapters input[type=checkbox]').length") == 1
    assert "page-style" in tools.js("document.getElementById('adapters').textContent")
    # Type a prompt (real key input into the focused textarea), pick the adapter and a scale, seed and steps.
    tools.js("document.getElementById('prompt').focus()")
    tools.call("Input.insertText", text="a red circle on a white background")
    tools.js("document.getElementById('adapter-page-style').click()")
    tools.js("document.getElementById('scale-page-style').value = '0.8'")
    tools.js("document.getElementById('seed').value = '3'")
    tools.js("document.getElementById('steps').value = '2'")
    assert tools.js("document.getElementById('result').naturalWidth") == 0
    tools.js("document.getElementById('generate').click()")
    width = tools.wait_for("document.getElementById('result').complete && document.getElementById('result').naturalWidth")
    assert width == 64
    status = tools.js("document.getElementById('status').textContent")
    assert "seed 3" in status and "page-style@1:0.8" in status, status
    key = tools.js("document.getElementById('result').dataset.key")
    assert len(key) == 64
    # The picture shown is the one the API gives for the same request.
    src = tools.js("document.getElementById('result').src")
    shown = base64.b64decode(src.split(",", 1)[1])
    reply = requests.post(f"{page_app}/v1/generate", json={"prompt": "a red circle on a white background", "seed": 3, "steps": 2,
                                                           "adapters": [{"name": "page-style", "scale": 0.8}]}, timeout=120).json()
    assert reply["images"][0]["key"] == key and base64.b64decode(reply["images"][0]["b64_json"]) == shown
    shot = tmp_path / "web_page.png"
    shot.write_bytes(base64.b64decode(tools.call("Page.captureScreenshot", format="png")["data"]))
    assert Image.open(io.BytesIO(shot.read_bytes())).size[0] > 0
    print(f"\nscreenshot of the web page: {shot}")
