"""A networked job that tries every way out: ``egress_probe.py CHECKS_JSON``.

Each check prints its outcome; the last line is all of them as JSON.  Through the
run's proxy (HTTPS_PROXY, as any client finds it) and around it.  ``hold``: leave a
process behind that keeps a TCP route's connection open past the job's own end."""
import json
import os
import socket
import ssl
import subprocess
import sys
import urllib.request

checks = json.loads(sys.argv[1])
context = ssl.create_default_context(cafile="/in/ca.pem")
proxy = ("127.0.0.1", 3128)
results = {"env": {k: os.environ.get(k) for k in ("HTTPS_PROXY", "http_proxy", "NO_PROXY")}}


def fetch(url):
    try:
        with urllib.request.urlopen(url, timeout=60, context=context) as answer:
            return json.loads(answer.read())
    except Exception as err:
        return f"REFUSED {type(err).__name__}: {err}"


def raw(request):
    try:
        with socket.create_connection(proxy, timeout=60) as conn:
            conn.sendall(request.encode())
            return conn.recv(4096).decode(errors="replace").split("\r\n", 1)[0]
    except OSError as err:
        return f"ERROR {err}"


def tunnel_then_sni(target, sni):
    try:
        conn = socket.create_connection(proxy, timeout=60)
        conn.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        if not conn.recv(4096).startswith(b"HTTP/1.1 200"):
            return "REFUSED at CONNECT"
        with context.wrap_socket(conn, server_hostname=sni) as tls:
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {sni}\r\n\r\n".encode())
            return "ALLOWED " + tls.recv(4096).decode(errors="replace")
    except (OSError, ssl.SSLError) as err:
        return f"REFUSED {type(err).__name__}: {err}"


for url in checks.get("fetch", []):
    results[f"fetch {url}"] = fetch(url)
for request in checks.get("raw", []):
    results[f"raw {request.splitlines()[0]}"] = raw(request)
for target, sni in checks.get("sni", []):
    results[f"sni {target} {sni}"] = tunnel_then_sni(target, sni)
for name in checks.get("dns", []):
    try:
        socket.getaddrinfo(name, 443)
        results[f"dns {name}"] = "ALLOWED"
    except OSError as err:
        results[f"dns {name}"] = f"REFUSED {err}"
for address, port in checks.get("direct", []):
    try:
        socket.create_connection((address, port), timeout=5).close()
        results[f"tcp {address}:{port}"] = "ALLOWED"
    except OSError as err:
        results[f"tcp {address}:{port}"] = f"REFUSED {err}"
for port in checks.get("echo", []):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:
            conn.sendall(b"ping")
            results[f"echo {port}"] = conn.recv(16).decode()
    except OSError as err:
        results[f"echo {port}"] = f"ERROR {err}"
if checks.get("hold"):
    subprocess.Popen([sys.executable, "-c", "import socket, time\n"
                      f"c = socket.create_connection(('127.0.0.1', {checks['hold']}))\n"
                      "c.sendall(b'held')\nc.recv(4)\ntime.sleep(3600)\n"],
                     start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
    import time
    time.sleep(3)  # the holder has connected
print(json.dumps(results), flush=True)
