"""A minimal W3C WebDriver client over httpx, for driving headless Chromium through chromedriver.

Only what the web-UI test needs (W3C WebDriver, https://www.w3.org/TR/webdriver2/): a session,
navigation, elements found by CSS selector, click, typing, a script in the page, pointer moves and a
screenshot. chromedriver itself (Debian's chromium-driver) does the work; this only speaks its HTTP
protocol, so the test needs no Python package beyond httpx.
"""
from __future__ import annotations

import base64
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C key of an element reference
# As the machine's probe started Chromium headless: without the background-networking flags it keeps
# trying to reach Google's hosts, which a closed network refuses.
CHROMIUM_ARGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,860")


class WebDriverError(RuntimeError):
    pass


class Element:
    def __init__(self, session: "Session", element_id: str):
        self.session, self.id = session, element_id

    def _call(self, method: str, path: str, body: dict | None = None) -> Any:
        return self.session.call(method, f"element/{self.id}/{path}", body)

    def click(self) -> None:
        self._call("POST", "click", {})

    def clear(self) -> None:
        self._call("POST", "clear", {})

    def type(self, text: str) -> None:
        self._call("POST", "value", {"text": text})

    @property
    def text(self) -> str:
        return self._call("GET", "text")

    def to_json(self) -> dict:
        return {ELEMENT: self.id}


class Session:
    """One browser session; `with Session.start(chromium, chromedriver, profile_dir) as s:`."""

    def __init__(self, driver: subprocess.Popen, url: str, session_id: str, log):
        self.driver, self.url, self.id, self.log = driver, url, session_id, log
        self.http = httpx.Client(timeout=60)

    @classmethod
    def start(cls, chromium: str, chromedriver: str, profile: Path) -> "Session":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log = open(profile.parent / "chromedriver.log", "wb")
        driver = subprocess.Popen([chromedriver, f"--port={port}"], stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if httpx.get(f"{url}/status", timeout=2).json()["value"]["ready"]:
                        break
                except httpx.TransportError:
                    pass
                if driver.poll() is not None or time.monotonic() > deadline:
                    raise WebDriverError(f"chromedriver did not start (see {log.name})")
                time.sleep(0.1)
            options = {"binary": chromium, "args": [*CHROMIUM_ARGS, f"--user-data-dir={profile}"]}
            caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options,
                                                     "goog:loggingPrefs": {"browser": "ALL"}}}}
            r = httpx.post(f"{url}/session", json=caps, timeout=120)
            if r.status_code != 200:
                raise WebDriverError(f"new session: {r.text[:2000]}")
            return cls(driver, url, r.json()["value"]["sessionId"], log)
        except BaseException:
            driver.kill()
            driver.wait(10)
            log.close()
            raise

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.http.delete(f"{self.url}/session/{self.id}", timeout=30)
        except httpx.HTTPError:
            pass
        finally:
            self.http.close()
            self.driver.terminate()
            try:
                self.driver.wait(10)
            except subprocess.TimeoutExpired:
                self.driver.kill()
                self.driver.wait(10)
            self.log.close()

    def call(self, method: str, path: str, body: dict | None = None) -> Any:
        r = self.http.request(method, f"{self.url}/session/{self.id}/{path}", json=body)
        value = r.json().get("value")
        if r.status_code != 200:
            error = value.get("error") if isinstance(value, dict) else value
            message = value.get("message", "") if isinstance(value, dict) else ""
            raise WebDriverError(f"{method} {path}: {error}: {message[:1500]}")
        return value

    # ---- the page --------------------------------------------------------------------------------
    def get(self, url: str) -> None:
        self.call("POST", "url", {"url": url})

    def find(self, css: str) -> Element:
        value = self.call("POST", "element", {"using": "css selector", "value": css})
        return Element(self, value[ELEMENT])

    def run(self, script: str, *args: Any) -> Any:
        """The body of a JS function called with `args` (elements passed as Element); returns its value."""
        args_json = [a.to_json() if isinstance(a, Element) else a for a in args]
        return self.call("POST", "execute/sync", {"script": script, "args": args_json})

    def wait_for(self, script: str, *args: Any, timeout: float = 60.0, poll: float = 0.05) -> Any:
        """Runs `script` until it returns something truthy, and returns that (or raises after `timeout`)."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.run(script, *args)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"the page did not get there in {timeout} s: {script}")
            time.sleep(poll)

    def hover(self, element: Element) -> None:
        """Moves the mouse pointer onto the element's centre (a real pointer move: :hover and mouseover)."""
        move = {"type": "pointerMove", "duration": 0, "origin": element.to_json(), "x": 0, "y": 0}
        self.call("POST", "actions", {"actions": [{"type": "pointer", "id": "mouse",
                                                    "parameters": {"pointerType": "mouse"}, "actions": [move]}]})

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.call("GET", "screenshot")))

    def console_errors(self) -> list[str]:
        """SEVERE entries of the browser console since the last call (chromedriver's log endpoint)."""
        entries = self.call("POST", "se/log", {"type": "browser"})
        return [e["message"] for e in entries if e.get("level") == "SEVERE"]
