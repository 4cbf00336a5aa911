from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

API_KEY = "test-key"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def chat_model(stories, tmp_path_factory) -> Path:
    """stories260K with a chat template (the tiny model ships none)."""
    folder = tmp_path_factory.mktemp("models") / "stories-chat"
    shutil.copytree(stories, folder)
    for f in folder.iterdir():
        f.chmod(0o644)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


class Server:
    """``kvloom serve`` in a subprocess; ``model=None`` serves the default model."""

    def __init__(self, model: Path | None, *extra: str, log_dir: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            "-m",
            "kvloom.cli",
            "serve",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
        ]
        # NOTE: the model as the first argument, as `vllm serve MODEL` takes it (--model works too).
        cmd += ([str(model), "--dtype", "float32"] if model is not None else []) + list(extra)
        log_dir = log_dir or model.parent
        self.log = open(log_dir / f"server-{self.port}.log", "w+")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ})
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"server did not come up:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        finally:
            self._final_output = self.output()
            self.log.close()

    def output_after_stop(self) -> str:
        return self._final_output


@pytest.fixture(scope="module")
def server(chat_model):
    s = Server(
        chat_model, "--api-key", API_KEY, "--max-body-mb", "1", "--allowed-origins", "http://app.example"
    )
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def aclient(server):
    from openai import AsyncOpenAI

    return AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def chat_llm(chat_model):
    """The offline API on the same weights, for comparisons."""
    from kvloom import LLM

    return LLM(str(chat_model), dtype="float32", show_progress=False)
