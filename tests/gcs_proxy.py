"""A local HTTPS proxy that lets TensorFlow's own Cloud Storage client talk to a local emulator (test infrastructure).

TensorFlow's GCS filesystem (``tf.io.gfile``, ``tf.summary`` and so clu's TensorBoard writer, TFDS TFRecord I/O) has
fixed ``https://*.googleapis.com`` endpoints that no setting redirects, but it honours ``https_proxy`` and
``CURL_CA_BUNDLE``. This proxy answers ``CONNECT`` for the googleapis hosts, terminates TLS with a certificate from
a test CA, and forwards each decrypted request as plain HTTP to the emulator (the ``Host`` header kept, so the
emulator still tells ``storage.googleapis.com/<bucket>/<object>`` downloads from JSON API calls). Plain-HTTP
requests for those hosts are forwarded as well: the emulator's resumable-upload ``Location`` is
``http://www.googleapis.com/upload/...``, which TensorFlow then sends through ``http_proxy``.
Listens on 127.0.0.1 only; every other host is refused.

It runs as its own process (``python gcs_proxy.py --upstream-port ...``, started by :mod:`gcs_emulator`): TensorFlow
calls that hold the GIL while they wait for the network (TFRecord writes) would deadlock a proxy thread in the test.
"""
from __future__ import annotations

import argparse
import http.client
import signal
import ssl
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

INTERCEPTED_HOSTS = ("www.googleapis.com", "storage.googleapis.com")
# Hop-by-hop or body-framing headers: the proxy re-frames every body with its own Content-Length.
_DROPPED = {"connection", "keep-alive", "proxy-connection", "proxy-authorization", "transfer-encoding", "te",
            "trailer", "upgrade", "expect", "content-length"}
_IDLE_TIMEOUT_S = 30.0  # a silent client connection is closed, so no handler thread outlives the test for long
_MAX_REQUESTS_PER_CONNECTION = 10_000  # bounds the keep-alive loop of one connection
_MAX_CHUNK_LINE = 1024


def _read_chunked(rfile) -> bytes:
    """The body of a ``Transfer-Encoding: chunked`` request, decoded (the emulator gets it with a Content-Length)."""
    body = bytearray()
    while True:
        size_line = rfile.readline(_MAX_CHUNK_LINE)
        size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while rfile.readline(_MAX_CHUNK_LINE) not in (b"\r\n", b"\n", b""):  # trailers, then the blank line
                pass
            return bytes(body)
        body += rfile.read(size)
        rfile.readline(_MAX_CHUNK_LINE)  # the CRLF after each chunk


class _Handler(BaseHTTPRequestHandler):
    """One client connection: ``CONNECT`` opens a TLS tunnel served by a nested handler; every request (in a
    tunnel, or sent to the proxy in absolute form, as resumable-upload ``PUT``s to ``http://www.googleapis.com``
    are) is forwarded to the emulator and the answer relayed with its own Content-Length."""
    protocol_version = "HTTP/1.1"  # keep-alive, and BaseHTTPRequestHandler answers "Expect: 100-continue" itself
    in_tunnel = False

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(_IDLE_TIMEOUT_S)
        self._served = 0

    def handle_one_request(self) -> None:
        super().handle_one_request()
        self._served += 1
        if self._served >= _MAX_REQUESTS_PER_CONNECTION:
            self.close_connection = True

    def do_CONNECT(self) -> None:
        host, _, port = self.path.partition(":")
        if self.in_tunnel or host not in INTERCEPTED_HOSTS or port not in ("", "443"):
            self.send_error(403, f"this test proxy only intercepts {', '.join(INTERCEPTED_HOSTS)}")
            return
        self.send_response(200, "Connection established")
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True  # when the tunnel ends, this connection is done
        try:
            tls = self.server.tls_context.wrap_socket(self.connection, server_side=True)
            type("Tunnel", (_Handler,), {"in_tunnel": True})(tls, self.client_address, self.server)
        except OSError:  # TLS handshake refused or the client went away: nothing left to answer
            pass

    def _target(self) -> str | None:
        """The origin-form path to ask the emulator for, or None for a request this proxy does not serve."""
        url = urllib.parse.urlsplit(self.path)
        if url.scheme:  # absolute form: a plain-HTTP request sent to the proxy
            return None if url.hostname not in INTERCEPTED_HOSTS else url.path + (f"?{url.query}" if url.query else "")
        return self.path if self.in_tunnel else None

    def _forward(self) -> None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():  # TF sends it with a Content-Length too
            body = _read_chunked(self.rfile)
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = self._target()
        if path is None:
            self.send_error(403, f"this test proxy only serves {', '.join(INTERCEPTED_HOSTS)}")
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _DROPPED}
        headers["Content-Length"] = str(len(body))
        upstream = http.client.HTTPConnection(*self.server.upstream, timeout=_IDLE_TIMEOUT_S)
        try:
            upstream.request(self.command, path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
        finally:
            upstream.close()
        self.send_response_only(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in _DROPPED:
                self.send_header(key, value)
        # A HEAD answer keeps the emulator's length of the object; any other carries exactly the bytes read.
        self.send_header("Content-Length", response.getheader("Content-Length", "0") if self.command == "HEAD"
                         else str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - quiet: the test output stays readable
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a handler thread still blocked on a socket does not keep the process alive
    tls_context: ssl.SSLContext
    upstream: tuple[str, int]


def main(argv: list[str] | None = None) -> None:
    """Serves until stdin closes (the test that started it ends, or dies) or SIGTERM; prints its port first."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream-port", type=int, required=True, help="the emulator's port on 127.0.0.1")
    parser.add_argument("--cert", required=True, help="PEM certificate for the intercepted hosts")
    parser.add_argument("--key", required=True, help="its private key")
    args = parser.parse_args(argv)
    server = _Server(("127.0.0.1", 0), _Handler)
    server.tls_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.tls_context.load_cert_chain(args.cert, args.key)
    server.upstream = ("127.0.0.1", args.upstream_port)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    # The parent holds our stdin open: EOF means it is gone, so a proxy never outlives its test.
    threading.Thread(target=lambda: (sys.stdin.buffer.read(), server.shutdown()), daemon=True).start()
    print(server.server_address[1], flush=True)
    server.serve_forever()
    server.server_close()


if __name__ == "__main__":
    main()
