#!/usr/bin/env python3
"""Cold start of a network block vs. the same block without network.

Usage (as root): scripts/network-cold-start.py [SAMPLES] [REFINERY_BINARY]
Starts `refinery serve` on a scratch data dir with --keep-alive 1s, deploys two no-op Python
blocks (network = true / false) and invokes each cold SAMPLES times, printing the median of
the server's `init_ms`. Run it with REFINERY_LOG=info,refinery_sandbox=debug to also see the
hook's own split ("network instance connected" filter_ms / total_ms).
"""
import json, re, shutil, statistics, subprocess, sys, tempfile, time, urllib.request

samples = int(sys.argv[1]) if len(sys.argv) > 1 else 12
binary = sys.argv[2] if len(sys.argv) > 2 else "target/debug/refinery"
data = tempfile.mkdtemp(prefix="refinery-netbench-")
server = subprocess.Popen(
    [binary, "serve", "--listen", "127.0.0.1:0", "--data-dir", data, "--keep-alive", "1s"],
    stdout=subprocess.PIPE, text=True)
operator = url = None
for line in server.stdout:
    if m := re.search(r"Operator key.*: (\S+)$", line):
        operator = m.group(1)
    if line.startswith("Refinery listening on "):
        url = line.split()[-1]
        break


def call(method, path, key, body=None):
    req = urllib.request.Request(
        url + path, method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": "Bearer " + key, "Content-Type": "application/json"})
    with urllib.request.urlopen(req) as resp:
        return json.loads(resp.read())


try:
    key = call("POST", "/v1/accounts", operator, {"name": "netbench"})["api_key"]
    code = 'code = "def main(i, b):\\n    return 1\\n"\n'
    manifest = ('name = "netbench"\n'
                f'[[blocks]]\nname = "on"\nlanguage = "python"\n{code}network = true\n'
                f'[[blocks]]\nname = "off"\nlanguage = "python"\n{code}')
    call("POST", "/v1/deployments", key, {"manifest": manifest, "files": {}})
    init = {"off": [], "on": []}
    for _ in range(samples):
        for block in init:
            reply = call("POST", f"/v1/projects/netbench/blocks/{block}/invoke", key, {})
            assert reply["cold"], reply
            init[block].append(reply["init_ms"])
        time.sleep(2.5)  # past keep-alive and the reaper: the next call is cold again
    for block, values in init.items():
        print(f"network={block}: cold init_ms median {statistics.median(values):.1f} "
              f"(min {min(values):.1f}, max {max(values):.1f}, n={len(values)})")
finally:
    server.terminate()
    server.wait()
    shutil.rmtree(data, ignore_errors=True)
