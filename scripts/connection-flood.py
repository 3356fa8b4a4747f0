#!/usr/bin/env python3
"""The outside testers' front-door attack, replayed: idle TCP connections with no key and no
bytes sent, while a well-behaved client asks for /v1/health and another account's warm
invocation.

Usage (as root): scripts/connection-flood.py [CONNECTIONS] [REFINERY_BINARY] [SERVER_NOFILE]
Starts `refinery serve` on a scratch data dir with its default connection caps, deploys a
no-op Python block for one account and invokes it once (warm), opens CONNECTIONS idle
connections (default 19,500), each from its own loopback source address (127.0.x.y), then
times /v1/health and three warm invocations over fresh connections and counts how many of the
idle connections the server has closed (it evicts the longest-idle one at its cap). The client
raises its own open-file limit to the hard limit, which bounds CONNECTIONS. SERVER_NOFILE
(soft = hard) starts the server with fewer open files than CONNECTIONS: the testers' case
(a file table filled by idle connections) without needing 20,000 of them.
"""
import json, re, resource, shutil, socket, subprocess, sys, tempfile, time, urllib.request

count = int(sys.argv[1]) if len(sys.argv) > 1 else 19500
binary = sys.argv[2] if len(sys.argv) > 2 else "target/release/refinery"
server_nofile = int(sys.argv[3]) if len(sys.argv) > 3 else None
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
data = tempfile.mkdtemp(prefix="refinery-flood-")
server = subprocess.Popen([binary, "serve", "--listen", "127.0.0.1:0", "--data-dir", data],
                          stdout=subprocess.PIPE, text=True,
                          preexec_fn=None if server_nofile is None else lambda: resource.setrlimit(
                              resource.RLIMIT_NOFILE, (server_nofile, server_nofile)))
operator = url = None
for line in server.stdout:
    if m := re.search(r"Operator key.*: (\S+)$", line):
        operator = m.group(1)
    if m := re.search(r"listening on (\S+)", line):
        url = m.group(1)
        break


def call(method, path, key, body=None, timeout=10):
    request = urllib.request.Request(url + path, method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": "Bearer " + key, "Content-Type": "application/json"})
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, json.loads(reply.read() or b"null"), (time.perf_counter() - started) * 1000
    except Exception as error:  # a refused or dropped request is the figure here
        return repr(error), None, (time.perf_counter() - started) * 1000


try:
    status, account, _ = call("POST", "/v1/accounts", operator, {"name": "flood"})
    assert status == 201, f"creating an account: {status}"
    key = account["api_key"]
    manifest = 'name = "p"\n[[blocks]]\nname = "b"\nlanguage = "python"\ncode = """\ndef main(i, b):\n    return i\n"""\n'
    call("POST", "/v1/deployments", key, {"manifest": manifest})
    call("POST", "/v1/projects/p/blocks/b/invoke", key, 1)
    host, port = url.split("//")[1].split(":")
    idle, failed, started = [], 0, time.time()
    for i in range(count):
        s = socket.socket()
        try:
            s.bind(("127.0.%d.%d" % (1 + (i // 250) % 250, 1 + i % 250), 0))
            s.connect((host, int(port)))
            idle.append(s)
        except OSError:
            failed += 1
            s.close()
    print(f"opened {len(idle)} idle connections ({failed} failed) in {time.time() - started:.1f} s")
    status, _, ms = call("GET", "/v1/health", key)
    print(f"/v1/health: {status} in {ms:.1f} ms")
    for _ in range(3):
        status, _, ms = call("POST", "/v1/projects/p/blocks/b/invoke", key, 1)
        print(f"warm invocation: {status} in {ms:.1f} ms")
    closed = 0
    for s in idle:
        s.setblocking(False)
        try:
            if s.recv(1) == b"":
                closed += 1
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
    print(f"closed by the server: {closed} of {len(idle)}")
finally:
    server.terminate()
    server.wait()
    shutil.rmtree(data, ignore_errors=True)
