"""The admin console in a real headless browser (Debian's chromium driven by
Selenium through chromium-driver), against a real fleet: one redis-server, two
ipc-server replicas sharing it (each with --tokens and --admin-listen), and workers
that are real grpcio subscribers answering requests.

The page is served by replica B while the workers sit on both replicas, so every
check also proves that the views are fleet-wide.

Screenshots of each view land in docs/console/*.png when UPDATE_SCREENSHOTS=1
(docs/console.md shows them); otherwise none is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from fleet_ipc.ipc.v1 import ipc_pb2, ipc_pb2_grpc
from fleet_ipc.testing import WAIT_LIMIT, IpcServer, RedisServer, wait_until
from google.protobuf import json_format, struct_pb2

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "docs" / "console"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

try:
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # pragma: no cover - reported by the fixture below
    webdriver = None

OPS_SECRET = "ipct_console_ops_secret"
VIEWER_SECRET = "ipct_console_viewer_secret"
TOKENS = f"""
[[token]]
name = "ops"
app = "shop"
sha256 = "{hashlib.sha256(OPS_SECRET.encode()).hexdigest()}"
broadcast = ["shop:>"]
send = ["shop:>"]
subscribe = ["shop:>"]
members = true
lock = ["shop:>"]
limit = ["shop:>"]

[[token]]
name = "viewer"
app = "shop"
sha256 = "{hashlib.sha256(VIEWER_SECRET.encode()).hexdigest()}"
subscribe = ["shop:>"]
members = true
"""
OPS = [("authorization", f"Bearer {OPS_SECRET}")]


def value(data: object) -> struct_pb2.Value:
    result = struct_pb2.Value()
    json_format.ParseDict(data, result)
    return result


class Worker:
    """A real worker: a grpcio Subscribe stream with a stable id and a role, which
    answers every request with `ok`. A test may make it fail an op once
    (`fail_once`) or hold its answer to an op until an event is set (`hold`)."""

    def __init__(self, server: IpcServer, member_id: str, role: str, labels: dict[str, str]):
        self.channel = grpc.insecure_channel(server.grpc_addr)
        self.stub = ipc_pb2_grpc.IpcStub(self.channel)
        self.fail_once: set[str] = set()
        self.hold: dict[str, threading.Event] = {}
        self.asked: dict[str, int] = {}  # requests received, by op
        self.messages: queue.Queue = queue.Queue()
        request = ipc_pb2.SubscribeRequest(id=member_id, app="shop", role=role, labels=labels)
        deadline = time.monotonic() + WAIT_LIMIT
        while True:
            self.call = self.stub.Subscribe(request, metadata=OPS)
            self.subscribed = threading.Event()
            self.error: grpc.RpcError | None = None
            threading.Thread(target=self._run, daemon=True).start()
            assert self.subscribed.wait(WAIT_LIMIT), f"{member_id} did not subscribe"
            # A replica refuses Subscribe until it has reached Redis once.
            if self.error is None or self.error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert self.error is None, f"{member_id} did not subscribe: {self.error}"

    def _run(self) -> None:
        try:
            for msg in self.call:
                if msg.op == "ipc:subscribed":
                    self.subscribed.set()
                elif msg.reply_to:
                    self.asked[msg.op] = self.asked.get(msg.op, 0) + 1
                    threading.Thread(target=self._answer, args=(msg,), daemon=True).start()
                else:
                    self.messages.put(msg)
        except grpc.RpcError as error:
            self.error = error
            self.subscribed.set()

    def _answer(self, msg: ipc_pb2.Msg) -> None:
        held = self.hold.get(msg.op)
        if held is not None:
            held.wait(WAIT_LIMIT)
        if msg.op in self.fail_once:
            self.fail_once.discard(msg.op)
            reply = ipc_pb2.ReplyRequest(reply_to=msg.reply_to, op="failed", error="health check failed after the deploy")
        else:
            reply = ipc_pb2.ReplyRequest(reply_to=msg.reply_to, op="ok", data=value({"done": msg.op}))
        self.stub.Reply(reply, metadata=OPS)

    def next(self, limit: float = WAIT_LIMIT) -> ipc_pb2.Msg:
        try:
            return self.messages.get(timeout=limit)
        except queue.Empty:
            raise AssertionError(f"nothing reached the worker within {limit:.0f}s") from None

    def close(self) -> None:
        self.call.cancel()
        self.channel.close()


class Fleet:
    def __init__(self, redis_url: str, tokens: Path):
        args = ["--redis", redis_url, "--tokens", str(tokens), "--admin-listen", "127.0.0.1:0", "--presence-ttl-ms", "3000"]
        self.a = IpcServer(app="shop", args=[*args, "--node", "replica-a"])
        self.b = IpcServer(app="shop", args=[*args, "--node", "replica-b"])
        assert self.a.admin_addr and self.b.admin_addr, f"no admin= in the readiness line: {self.b.describe()}"
        # The page is served by B; A's console is where a rollout is resumed.
        self.url = f"http://{self.b.admin_addr}"
        self.url_a = f"http://{self.a.admin_addr}"
        self.workers = [
            Worker(self.a, "shop:w1", "worker", {"zone": "a"}),
            Worker(self.b, "shop:w2", "worker", {"zone": "b"}),
            Worker(self.a, "shop:w3", "worker", {"zone": "a"}),
        ]
        self.stub_a = ipc_pb2_grpc.IpcStub(grpc.insecure_channel(self.a.grpc_addr))

    def members_seen_by_b(self) -> set[str]:
        stub = ipc_pb2_grpc.IpcStub(grpc.insecure_channel(self.b.grpc_addr))
        return {m.id for m in stub.Members(ipc_pb2.MembersRequest(), metadata=OPS).members}

    def close(self) -> None:
        for worker in self.workers:
            worker.close()
        for server in (self.a, self.b):
            status = server.stop()
            assert status == 0, f"ipc-server exited with {status}:\n{server.describe()}"


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    with tempfile.TemporaryDirectory() as tmp, RedisServer() as redis:
        tokens = Path(tmp) / "tokens.toml"
        tokens.write_text(TOKENS)
        running = Fleet(redis.url, tokens)
        try:
            # Presence is in Redis: both replicas see all three workers.
            wait_until(lambda: {"shop:w1", "shop:w2", "shop:w3"} <= running.members_seen_by_b(), "workers visible from replica B")
            yield running
        finally:
            running.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if webdriver is None:
        pytest.fail("selenium is not installed: run scripts/test (pinned in clients/python/requirements-dev.txt)")
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            pytest.fail(f"{path} not found: install the Debian package {package} (scripts/test does as root)")
    profile = tempfile.mkdtemp(prefix="console-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_script_timeout(WAIT_LIMIT)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def screenshot(driver, name: str, whole_page: bool = False, show: str | None = None) -> None:
    """Saves docs/console/NAME.png with UPDATE_SCREENSHOTS=1; `whole_page`: the
    window is made as tall as the page for it; `show`: scrolled to that element."""
    if os.environ.get("UPDATE_SCREENSHOTS") != "1":
        return
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    if show:
        driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", driver.find_element(By.CSS_SELECTOR, show))
    size = driver.get_window_size()
    if whole_page:
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(size["width"], height + size["height"] - driver.execute_script("return window.innerHeight"))
    try:
        driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))
    finally:
        driver.set_window_size(size["width"], size["height"])


def visible(driver, css: str):
    found = [e for e in driver.find_elements(By.CSS_SELECTOR, css) if e.is_displayed()]
    return found[0] if found else None


def log_in(driver, fleet: Fleet, secret: str, url: str | None = None) -> None:
    """Logs in to the console of replica B (or the one at `url`)."""
    driver.get((url or fleet.url) + "/")
    # The page asks whether its cookie is a live session, then shows one or the other.
    wait_until(lambda: visible(driver, "#login-token") or visible(driver, "#logout"), "the login form or the app")
    if visible(driver, "#logout"):
        driver.find_element(By.ID, "logout").click()
    token = wait_until(lambda: visible(driver, "#login-token"), "the login form")
    token.clear()
    token.send_keys(secret)
    driver.find_element(By.ID, "login-submit").click()
    wait_until(lambda: visible(driver, "#view-members"), "the members view after login")


def tab(driver, view: str) -> None:
    driver.find_element(By.CSS_SELECTOR, f'.tab[data-view="{view}"]').click()
    wait_until(lambda: visible(driver, f"#view-{view}"), f"the {view} view")


def fetch(driver, path: str, body: dict, csrf: bool = True) -> dict:
    """A request forged from inside the page, as a script (or a person with the
    developer tools) could send it: the server must decide, not the page."""
    return driver.execute_async_script(
        """
        const [path, body, withCsrf, done] = arguments;
        const session = await (await fetch('/api/session')).json();
        const headers = {'Content-Type': 'application/json'};
        if (withCsrf) headers['X-CSRF-Token'] = session.csrf;
        const response = await fetch(path, {method: 'POST', headers, body: JSON.stringify(body)});
        done({status: response.status, body: await response.json()});
        """,
        path,
        body,
        csrf,
    )


def test_login_screen_refuses_a_wrong_token(browser, fleet: Fleet):
    browser.delete_all_cookies()
    browser.get(fleet.url + "/")
    token = wait_until(lambda: visible(browser, "#login-token"), "the login form")
    screenshot(browser, "login")
    token.send_keys("ipct_wrong")
    browser.find_element(By.ID, "login-submit").click()
    error = wait_until(lambda: browser.find_element(By.ID, "login-error").text, "a login error")
    assert "UNAUTHENTICATED" in error
    assert not visible(browser, "#view-members")


def test_members_view_lists_the_workers_of_both_replicas(browser, fleet: Fleet):
    log_in(browser, fleet, OPS_SECRET)
    rows = wait_until(
        lambda: {e.get_attribute("data-member"): e.text for e in browser.find_elements(By.CSS_SELECTOR, ".member")}
        if {"shop:w1", "shop:w2", "shop:w3"} <= {e.get_attribute("data-member") for e in browser.find_elements(By.CSS_SELECTOR, ".member")}
        else None,
        "w1, w2 and w3 in the members view",
    )
    assert "zone=a" in rows["shop:w1"] and "zone=b" in rows["shop:w2"]
    nodes = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".group h4.node")]
    assert "node replica-a" in nodes and "node replica-b" in nodes, nodes
    screenshot(browser, "members")
    # The filter box narrows the list.
    browser.find_element(By.ID, "members-filter").send_keys("zone=b")
    wait_until(
        lambda: [e.get_attribute("data-member") for e in browser.find_elements(By.CSS_SELECTOR, ".member")] == ["shop:w2"],
        "only w2 after filtering on zone=b",
    )
    browser.find_element(By.ID, "members-filter").clear()
    browser.execute_script("document.getElementById('members-filter').dispatchEvent(new Event('input'))")


def test_broadcast_from_the_form_reaches_a_subscriber(browser, fleet: Fleet):
    log_in(browser, fleet, OPS_SECRET)
    tab(browser, "send")
    browser.find_element(By.ID, "broadcast-channel").send_keys(":worker")
    browser.find_element(By.ID, "broadcast-op").send_keys("config:reload")
    browser.find_element(By.ID, "broadcast-data").send_keys('{"version": 42}')
    browser.find_element(By.ID, "broadcast-submit").click()
    result = wait_until(lambda: browser.find_element(By.ID, "broadcast-result").text, "the broadcast result")
    assert "Stored: shop:worker" in result, result
    # w1 is on replica A: the message crossed Redis.
    msg = fleet.workers[0].next()
    assert (msg.op, msg.channel, msg.sender) == ("config:reload", "shop:worker", "ops")
    assert json_format.MessageToDict(msg.data) == {"version": 42}
    screenshot(browser, "send")


def test_live_tail_shows_a_message_sent_by_grpcurl(browser, fleet: Fleet, grpcurl: str):
    log_in(browser, fleet, OPS_SECRET)
    tab(browser, "tail")
    pattern = browser.find_element(By.ID, "tail-pattern")
    pattern.clear()
    pattern.send_keys("shop:audit:>")
    browser.find_element(By.ID, "tail-start").click()
    wait_until(lambda: "Live" in browser.find_element(By.ID, "tail-status").text, "the tail to be live")
    body = json.dumps({"channel": "shop:audit:login", "op": "audit:login", "data": {"user": "alice"}})
    sent = subprocess.run(
        [grpcurl, "-plaintext", "-H", f"authorization: Bearer {OPS_SECRET}", "-d", body, fleet.a.grpc_addr, "ipc.v1.Ipc/Broadcast"],
        capture_output=True,
        text=True,
        timeout=WAIT_LIMIT,
    )
    assert sent.returncode == 0, sent.stderr
    started = time.monotonic()
    row = wait_until(lambda: visible(browser, ".msg"), "the grpcurl message in the tail", limit=10)
    print(f"tail latency after grpcurl returned: {time.monotonic() - started:.3f}s")
    assert "audit:login" in row.text and "shop:audit:login" in row.text and "alice" in row.text
    row.click()
    detail = wait_until(lambda: browser.find_element(By.ID, "tail-detail-data").text, "the message detail")
    assert json.loads(detail) == {"user": "alice"}
    assert "\n" in detail  # formatted, not one line
    screenshot(browser, "tail")
    # Pause holds new messages back until resumed.
    browser.find_element(By.ID, "tail-pause").click()
    fleet.stub_a.Broadcast(ipc_pb2.BroadcastRequest(channel="shop:audit:logout", op="audit:logout"), metadata=OPS)
    wait_until(lambda: "held" in browser.find_element(By.ID, "tail-status").text, "the paused tail to hold a message")
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg")) == 1
    browser.find_element(By.ID, "tail-pause").click()
    wait_until(lambda: len(browser.find_elements(By.CSS_SELECTOR, ".msg")) == 2, "the held message after resuming")
    browser.find_element(By.ID, "tail-stop").click()


def test_html_in_message_data_is_shown_as_text_never_run(browser, fleet: Fleet):
    log_in(browser, fleet, OPS_SECRET)
    tab(browser, "tail")
    browser.find_element(By.ID, "tail-clear").click()
    pattern = browser.find_element(By.ID, "tail-pattern")
    pattern.clear()
    pattern.send_keys("shop:evil")
    browser.find_element(By.ID, "tail-start").click()
    wait_until(lambda: "Live" in browser.find_element(By.ID, "tail-status").text, "the tail to be live")
    payload = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script><b id="injected">bold</b>'
    fleet.stub_a.Broadcast(
        ipc_pb2.BroadcastRequest(channel="shop:evil", op="<i>op</i>", data=value({"html": payload})), metadata=OPS
    )
    row = wait_until(lambda: visible(browser, ".msg"), "the message with HTML in the tail")
    row.click()
    wait_until(lambda: browser.find_element(By.ID, "tail-detail-data").text, "the message detail")
    assert "<img src=x" in row.text and "<i>op</i>" in row.text
    assert payload in json.loads(browser.find_element(By.ID, "tail-detail-data").text)["html"]
    assert browser.find_elements(By.CSS_SELECTOR, "#tail-list img, #tail-list script, #injected, #tail-detail img") == []
    assert browser.execute_script("return window.pwned === undefined")
    browser.find_element(By.ID, "tail-stop").click()


def test_a_token_without_the_broadcast_grant_cannot_send(browser, fleet: Fleet):
    log_in(browser, fleet, VIEWER_SECRET)
    tab(browser, "send")
    button = browser.find_element(By.ID, "broadcast-submit")
    assert not button.is_enabled()
    assert "no grant" in browser.find_element(By.ID, "broadcast-grant").text
    # Nor may it ask members (SendMsg, and Gather and Rollout, which need the send grant).
    for button in ("send-submit", "gather-preview", "rollout-preview"):
        assert not browser.find_element(By.ID, button).is_enabled(), button
    # The server refuses a forged request anyway, with the gRPC API's own answer.
    forged = fetch(browser, "/api/broadcast", {"channel": ":worker", "op": "worker:restart"})
    assert forged["status"] == 403, forged
    assert forged["body"]["code"] == "PERMISSION_DENIED"
    assert "viewer may not broadcast" in forged["body"]["message"]
    # Without the CSRF token, even a permitted action is refused.
    log_in(browser, fleet, OPS_SECRET)
    no_csrf = fetch(browser, "/api/broadcast", {"channel": ":worker", "op": "worker:restart"}, csrf=False)
    assert no_csrf["status"] == 403 and "CSRF" in no_csrf["body"]["message"], no_csrf


def test_gather_and_rollout_forms_say_when_the_server_lacks_them(browser, fleet: Fleet):
    log_in(browser, fleet, OPS_SECRET)
    tab(browser, "ops")
    caps = browser.execute_async_script(
        "const done = arguments[0]; fetch('/api/capabilities').then(r => r.json()).then(done);"
    )
    notice = browser.find_element(By.ID, "ops-unavailable")
    if caps["rollout"] and caps["gather"]:
        # A server with both: the forms are live (their end-to-end tests come with them).
        assert not notice.is_displayed()
        assert browser.find_element(By.ID, "rollout-preview").is_enabled()
        assert browser.find_element(By.ID, "gather-preview").is_enabled()
        return
    wait_until(lambda: notice.is_displayed() and "Not available on this server" in notice.text, "the not-available notice")
    assert not browser.find_element(By.ID, "rollout-preview").is_enabled()
    screenshot(browser, "ops")


ROLLOUT_FORM = {
    "rollout-target": ":worker",
    "rollout-op": "deploy:v2",
    "rollout-data": '{"version": 2}',
    "rollout-wave": "1",
    "rollout-failures": "0",
    # Per member: long enough for the test to look at the grid while w1 is held.
    "rollout-timeout": "20000",
    "rollout-key": "deploy-v2-from-the-console",
}


def fill(driver, fields: dict[str, str]) -> None:
    for field, text in fields.items():
        box = driver.find_element(By.ID, field)
        box.clear()
        box.send_keys(text)


def rollout_cells(driver) -> dict[str, str]:
    """Each member's cell in the rollout grid: its status, `+asking` while asked."""
    return {
        cell.get_attribute("data-member"): cell.get_attribute("data-status") + ("+asking" if cell.get_attribute("data-asking") else "")
        for cell in driver.find_elements(By.CSS_SELECTOR, "#rollout-grid .cell")
    }


def table_rows(driver, css: str, key: str) -> dict[str, list[str]]:
    return {row.get_attribute(key): [td.text for td in row.find_elements(By.TAG_NAME, "td")] for row in driver.find_elements(By.CSS_SELECTOR, css)}


def preview_rollout(driver) -> str:
    start = driver.find_element(By.ID, "rollout-submit")
    assert not start.is_enabled(), "a rollout can only start after its preview"
    driver.find_element(By.ID, "rollout-preview").click()
    preview = wait_until(
        lambda: (text := driver.find_element(By.ID, "rollout-result").text).startswith("Preview:") and text,
        "the rollout preview",
    )
    wait_until(start.is_enabled, "the start button after the preview")
    return preview


def finished_state(driver) -> str:
    return wait_until(
        lambda: (text := driver.find_element(By.ID, "rollout-run-state").text) not in ("", "RUNNING") and text,
        "the rollout to end",
    )


def test_a_rollout_from_the_page_is_previewed_shown_as_it_runs_and_resumed_on_the_other_replica(browser, fleet: Fleet):
    w1, w2, w3 = fleet.workers  # w1 and w3 on replica A, w2 on replica B
    op = ROLLOUT_FORM["rollout-op"]
    release_w1 = threading.Event()
    w1.hold[op] = release_w1
    w2.fail_once.add(op)
    try:
        log_in(browser, fleet, OPS_SECRET)
        tab(browser, "ops")
        fill(browser, ROLLOUT_FORM)

        # The dry run: who would be asked, in which wave; nothing is sent.
        preview = preview_rollout(browser)
        assert "3 member(s) of shop:worker in 3 wave(s)" in preview, preview
        plan = table_rows(browser, "#rollout-result tr[data-member]", "data-member")
        assert {m: (cells[2], cells[3]) for m, cells in plan.items()} == {
            "shop:w1": ("1", "PENDING"),
            "shop:w2": ("2", "PENDING"),
            "shop:w3": ("3", "PENDING"),
        }, plan
        assert sum(w.asked.get(op, 0) for w in fleet.workers) == 0, "the preview sent nothing"
        screenshot(browser, "ops", whole_page=True)

        # As it runs: wave 1 (w1, held by the test) is being asked, the others wait.
        browser.find_element(By.ID, "rollout-submit").click()
        wait_until(
            lambda: rollout_cells(browser) == {"shop:w1": "PENDING+asking", "shop:w2": "PENDING", "shop:w3": "PENDING"},
            "w1 being asked while w2 and w3 wait",
        )
        assert browser.find_element(By.ID, "rollout-run-state").text == "RUNNING"
        wait_until(lambda: w1.asked.get(op) == 1, "the request to w1")
        assert w2.asked.get(op, 0) == 0, "wave 2 waits for wave 1"
        release_w1.set()

        # w2 fails; with no failure allowed the rollout stops before w3's wave.
        assert finished_state(browser) == "STOPPED"
        assert rollout_cells(browser) == {"shop:w1": "OK", "shop:w2": "FAILED", "shop:w3": "PENDING"}
        colours = {
            member: browser.find_element(By.CSS_SELECTOR, f'#rollout-grid .cell[data-member="{member}"]').value_of_css_property("background-color")
            for member in ("shop:w1", "shop:w2", "shop:w3")
        }
        assert colours["shop:w1"] == "rgba(227, 244, 234, 1)", colours  # OK: green
        assert colours["shop:w2"] == "rgba(251, 231, 229, 1)", colours  # FAILED: red
        assert len(set(colours.values())) == 3, colours  # PENDING: grey
        ledger = table_rows(browser, "#rollout-ledger tr[data-member]", "data-member")
        assert {m: cells[3] for m, cells in ledger.items()} == {"shop:w1": "OK", "shop:w2": "FAILED", "shop:w3": "PENDING"}
        assert "health check failed" in ledger["shop:w2"][5]
        assert ledger["shop:w1"][1] == "replica-a" and ledger["shop:w2"][1] == "replica-b"
        counts = browser.find_element(By.ID, "rollout-counts").text
        assert "1 OK" in counts and "1 failed" in counts, counts
        ledger_id = browser.find_element(By.CSS_SELECTOR, "#rollout-ledger h3").text
        assert w3.asked.get(op, 0) == 0, "stopped before w3's wave"
        assert visible(browser, "#rollout-resume"), "a stopped rollout offers to resume"
        screenshot(browser, "rollout", show="#rollout-run")

        # Resumed by its key from replica A's console: the ledger comes from Redis,
        # w1 (OK before) is skipped, w2 and w3 are asked.
        log_in(browser, fleet, OPS_SECRET, url=fleet.url_a)
        tab(browser, "ops")
        fill(browser, ROLLOUT_FORM)
        preview = preview_rollout(browser)
        assert "1 already OK under this key (skipped)" in preview, preview
        plan = table_rows(browser, "#rollout-result tr[data-member]", "data-member")
        assert {m: cells[3] for m, cells in plan.items()} == {"shop:w1": "SKIPPED", "shop:w2": "PENDING", "shop:w3": "PENDING"}
        browser.find_element(By.ID, "rollout-submit").click()
        assert finished_state(browser) == "DONE"
        assert rollout_cells(browser) == {"shop:w1": "SKIPPED", "shop:w2": "OK", "shop:w3": "OK"}
        assert browser.find_element(By.CSS_SELECTOR, "#rollout-ledger h3").text == ledger_id, "the same ledger, resumed"
        assert (w1.asked[op], w2.asked[op], w3.asked[op]) == (1, 2, 1)
        assert not visible(browser, "#rollout-resume")
        screenshot(browser, "rollout-resumed", show="#rollout-run")
    finally:
        release_w1.set()
        w1.hold.clear()
        w2.fail_once.clear()


def test_locks_and_limits_in_use_are_listed_fleet_wide(browser, fleet: Fleet):
    # Taken through replica A; the page is served by B.
    lease = fleet.stub_a.Lock(ipc_pb2.LockRequest(name=":db-migrate", ttl_ms=600_000), metadata=OPS)
    assert lease.acquired
    drawn = fleet.stub_a.Limit(ipc_pb2.LimitRequest(name=":mail", rate=10, interval_ms=60_000, burst=20, cost=5), metadata=OPS)
    assert drawn.allowed and drawn.remaining == 15
    try:
        log_in(browser, fleet, OPS_SECRET)
        tab(browser, "locks")
        locks = wait_until(lambda: table_rows(browser, "#locks-list tr.lock", "data-name"), "the lock in the list")
        name, holder, fence, expires = locks["shop:db-migrate"]
        assert (name, holder, fence) == ("shop:db-migrate", "ops", str(lease.fence))
        assert expires.startswith("in ") and expires.endswith(" min"), expires
        limits = table_rows(browser, "#limits-list tr.limit", "data-name")
        name, tokens, refill, full = limits["shop:mail"]
        assert (tokens, refill) == ("15 / 20", "10 per 60 s"), limits
        assert "Shown: the locks your token may take (shop:>)" in browser.find_element(By.ID, "locks-scope").text
        screenshot(browser, "locks")

        # A token whose grants cover neither sees neither: the server filters.
        log_in(browser, fleet, VIEWER_SECRET)
        tab(browser, "locks")
        wait_until(lambda: "No lock is held" in browser.find_element(By.ID, "locks-list").text, "an empty list for the viewer")
        listed = browser.execute_async_script("const done = arguments[0]; fetch('/api/locks').then(r => r.json()).then(done);")
        assert listed["locks"] == [] and listed["limits"] == [], listed

        # Released through A: gone from B's list at its next refresh.
        assert fleet.stub_a.Unlock(ipc_pb2.UnlockRequest(name=":db-migrate", fence=lease.fence), metadata=OPS).released
        log_in(browser, fleet, OPS_SECRET)
        tab(browser, "locks")
        wait_until(lambda: "No lock is held" in browser.find_element(By.ID, "locks-list").text, "the released lock gone")
        assert "shop:mail" in table_rows(browser, "#limits-list tr.limit", "data-name")
    finally:
        fleet.stub_a.Unlock(ipc_pb2.UnlockRequest(name=":db-migrate", fence=lease.fence), metadata=OPS)


def test_health_view_shows_every_replica_and_the_bus(browser, fleet: Fleet):
    log_in(browser, fleet, OPS_SECRET)
    tab(browser, "health")
    nodes = wait_until(
        lambda: {e.get_attribute("data-node") for e in browser.find_elements(By.CSS_SELECTOR, ".replica")} >= {"replica-a", "replica-b"}
        and browser.find_elements(By.CSS_SELECTOR, ".health"),
        "both replicas in the health view",
    )
    assert nodes
    # Both are replicas by their presence in Redis, not only nodes members name.
    kinds = {e.get_attribute("data-node"): e.get_attribute("data-kind") for e in browser.find_elements(By.CSS_SELECTOR, ".replica")}
    assert kinds["replica-a"] == kinds["replica-b"] == "replica", kinds
    cards = browser.find_element(By.ID, "health-cards").text
    assert "redis" in cards and "healthy" in cards
    screenshot(browser, "health")


def test_the_page_fits_a_phone_screen(browser, fleet: Fleet):
    log_in(browser, fleet, OPS_SECRET)
    browser.set_window_size(390, 844)
    try:
        browser.get(fleet.url + "/")
        wait_until(lambda: visible(browser, ".member"), "members on a phone-sized screen")
        overflow = browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"the page is {overflow}px wider than a phone screen"
        screenshot(browser, "phone")
    finally:
        browser.set_window_size(1280, 900)


def test_session_cookie_and_headers_keep_the_token_out_of_reach(fleet: Fleet):
    def post(path: str, body: dict, headers: dict[str, str]) -> tuple[int, dict, dict]:
        request = urllib.request.Request(fleet.url + path, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=WAIT_LIMIT) as response:
                return response.status, dict(response.headers), json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), json.loads(error.read())

    status, headers, body = post("/api/login", {"token": OPS_SECRET}, {"Content-Type": "application/json"})
    assert status == 200 and body["sender"] == "ops"
    cookie = headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert OPS_SECRET not in cookie and OPS_SECRET not in json.dumps(body)
    csp = headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
    # A login from another site's page is refused, and so is a form post.
    status, _, _ = post("/api/login", {"token": OPS_SECRET}, {"Content-Type": "application/json", "Origin": "http://evil.example"})
    assert status == 403
    status, _, _ = post("/api/login", {"token": OPS_SECRET}, {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 415
    # Neither replica logs the secret.
    for server in (fleet.a, fleet.b):
        assert OPS_SECRET not in server.stderr() and OPS_SECRET not in "\n".join(server.lines)
