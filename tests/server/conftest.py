"""A live `thinkwise serve` subprocess on the tiny random Llama, shared by the server tests.

The server binds 127.0.0.1 on a free port (`--port 0`; the address is read from its
first line), logs to a file (a pipe nobody reads would block it), and is stopped with
SIGTERM at the end. Limits are small so any request the tests or the fuzzer send is
cheap on a 2-core CPU: a 256-token context and at most 8 samples per prompt.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

API_KEY = "test-key-123"
MODEL = "tiny"
MAX_MODEL_LEN = 256
MAX_N = 8
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Server:
    url: str
    api_key: str | None
    model: str
    model_dir: Path
    process: subprocess.Popen
    log_path: Path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def health(self) -> dict:
        response = httpx.get(f"{self.url}/health", timeout=30)
        assert response.status_code == 200, response.text
        return response.json()

    def wait_idle(self, timeout: float = 15.0) -> dict:
        """Poll /health until nothing runs, waits, or holds a KV block; return the last snapshot."""
        deadline = time.monotonic() + timeout
        while True:
            health = self.health()
            engine = health["engine"]
            idle = (engine["running_sequences"] == 0 and engine["waiting_sequences"] == 0
                    and engine["kv_blocks_used"] == 0 and health["requests_in_flight"] == 0)
            if idle or time.monotonic() > deadline:
                return health
            time.sleep(0.1)


def start_server(model_dir: Path, log_path: Path, *extra: str, api_key: str | None = API_KEY,
                 timeout: float = 120.0) -> Server:
    command = [sys.executable, "-m", "thinkwise", "serve", "--model", str(model_dir), "--served-model-name", MODEL,
               "--dtype", "float32", "--device", "cpu", "--port", "0", "--max-model-len", str(MAX_MODEL_LEN),
               "--max-n", str(MAX_N), "--no-access-log", "--log-level", "warning", *extra]
    if api_key:
        command += ["--api-key", api_key]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("THINKWISE_API_KEY", None)
    log = open(log_path, "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    log.close()
    deadline = time.monotonic() + timeout
    url = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"thinkwise serve exited with {process.returncode}:\n{log_path.read_text()}")
        match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", log_path.read_text(errors="replace"))
        if match:
            url = match.group(1)
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    return Server(url, api_key, MODEL, model_dir, process, log_path)
            except httpx.TransportError:
                pass
        time.sleep(0.2)
    stop_server(process)
    raise RuntimeError(f"thinkwise serve did not become healthy in {timeout} s:\n{log_path.read_text()}")


def stop_server(process: subprocess.Popen) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    return process.returncode


@pytest.fixture(scope="session")
def server(tiny_llama, tmp_path_factory):
    directory, _ = tiny_llama
    log_path = tmp_path_factory.mktemp("server") / "serve.log"
    srv = start_server(directory, log_path, "--kv-blocks", "2048", "--block-size", "16", "--max-num-seqs", "256")
    yield srv
    code = stop_server(srv.process)
    assert code == 0, f"server exited with {code}:\n{srv.log()[-5000:]}"


@pytest.fixture(scope="session")
def client(server):
    import openai

    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def offline_llm(tiny_llama):
    """The same model called offline, for checking what the server reports."""
    from thinkwise import LLM

    directory, _ = tiny_llama
    return LLM(str(directory), dtype="float32", device="cpu", max_model_len=MAX_MODEL_LEN, num_kv_blocks=512)
