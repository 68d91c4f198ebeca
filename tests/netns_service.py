"""Services for the networked-run tests, run inside the test's own network namespace:
``netns_service.py LOG CERT KEY ADDRESS...`` serves, on each ADDRESS, HTTPS on 443 (the
certificate names every test host), plain HTTP on 80 and a TCP echo on 7000.  Each
connection's start and end, and each request with its Host and SNI, is appended to LOG as
one JSON line; an HTTP answer is that request's JSON (``/bytes/N``: N bytes, not logged)."""
import http.server
import json
import socketserver
import ssl
import sys
import threading

log_path, cert, key, addresses = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
lock = threading.Lock()


def note(**event):
    with lock, open(log_path, "a") as log:
        log.write(json.dumps(event) + "\n")


class Answer(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self):
        if self.path.startswith("/bytes/"):  # /bytes/N: N bytes, for throughput
            size = int(self.path.rsplit("/", 1)[1])
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            chunk = b"\0" * (1 << 20)
            while size > 0:
                self.wfile.write(chunk[:size])
                size -= len(chunk)
            return
        seen = {"event": "request", "address": self.server.server_address[0], "port": self.server.server_address[1],
                "method": self.command, "path": self.path, "host": self.headers.get("Host"),
                "sni": getattr(self.connection, "vmiso_sni", None),
                "proxy_headers": [k for k in self.headers if k.lower().startswith("proxy-") or k.lower() == "via"]}
        note(**seen)
        body = json.dumps(seen).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST = _answer

    def setup(self):
        # The TLS handshake in the connection's own thread: a client that never sends its
        # ClientHello holds up no other (the server's accept loop never waits on one).
        self.tls_failed = False
        if isinstance(self.request, ssl.SSLSocket):
            try:
                self.request.do_handshake()
            except (ssl.SSLError, OSError) as err:
                note(event="tls-failed", address=self.server.server_address[0], error=str(err))
                self.tls_failed = True
                return
            self.request.vmiso_sni = self.server.vmiso_names.pop(id(self.request), None)
        super().setup()

    def handle(self):
        if not self.tls_failed:
            super().handle()

    def finish(self):
        if not self.tls_failed:
            super().finish()

    def log_message(self, *args):
        pass


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def tls(server):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server.vmiso_names = {}  # a connection's id -> the name its ClientHello gave (SNI)

    def remember(conn, name, _):
        server.vmiso_names[id(conn)] = name
    context.sni_callback = remember
    server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    return server


class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        where = self.server.server_address[0]
        note(event="open", address=where, port=7000)
        try:
            while data := self.request.recv(65536):
                self.request.sendall(data)
        except OSError:
            pass
        note(event="close", address=where, port=7000)


class EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


servers = []
for address in addresses:
    servers += [tls(Server((address, 443), Answer)), Server((address, 80), Answer), EchoServer((address, 7000), Echo)]
for s in servers:
    threading.Thread(target=s.serve_forever, daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
