"""An origin server for the gateway's tests, run inside the test's own network namespace:
``netns_origin.py ADDRESS LOG PORT...`` answers every request on each port with what it
received (also appended to LOG, one JSON line each), then 1000 bytes of "x"."""
import http.server
import json
import socketserver
import sys
import threading

address, log_path, ports = sys.argv[1], sys.argv[2], [int(p) for p in sys.argv[3:]]

class Echo(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def _answer(self):
        seen = {"port": self.server.server_address[1], "method": self.command, "path": self.path,
                "headers": [[k, v] for k, v in self.headers.items()]}
        with open(log_path, "a") as log:
            log.write(json.dumps(seen) + "\n")
        body = json.dumps(seen).encode() + b"\n" + b"x" * 1000
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
    do_GET = do_HEAD = do_POST = do_PUT = _answer
    def log_message(self, *args):
        pass

class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

servers = [Server((address, port), Echo) for port in ports]
for s in servers[1:]:
    threading.Thread(target=s.serve_forever, daemon=True).start()
print("ready", flush=True)
servers[0].serve_forever()
