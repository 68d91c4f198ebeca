"""A package index for the provisioning gateway's VM test, run inside the test's own network
namespace: ``netns_index.py ADDRESS PORT FILES REPORTS``.  /simple/NAME/ lists the files in
the directory FILES with their sha256; /files/NAME serves one; /report?results=JSON appends
the JSON to REPORTS (one line each)."""
import hashlib
import http.server
import json
import sys
import urllib.parse
from pathlib import Path

address, port, files, reports = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]


class Index(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        path = urllib.parse.urlsplit(self.path)
        names = sorted(p.name for p in files.iterdir())
        if path.path == "/report":
            with open(reports, "a") as out:
                out.write(json.dumps(json.loads(urllib.parse.parse_qs(path.query)["results"][0])) + "\n")
            body = b"ok"
        elif path.path.startswith("/simple/"):
            body = "".join(f'<a href="/files/{n}#sha256={hashlib.sha256((files / n).read_bytes()).hexdigest()}">'
                           f"{n}</a>" for n in names).encode()
        elif path.path.startswith("/files/") and path.path[7:] in names:
            body = (files / path.path[7:]).read_bytes()
        else:
            self.send_error(404)
            return
        self.send_response(200)
        kind = "text/html" if path.path.startswith("/simple/") else "application/octet-stream"
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


server = http.server.ThreadingHTTPServer((address, port), Index)
print("ready", flush=True)
server.serve_forever()
