#!/usr/bin/env python3
"""Where the added cost of a `then` step goes (issue 12; figures in docs/BENCHMARKS.md, "Services").

Usage (as root): scripts/services-step-profile.py [RUNS] [REFINERY_BINARY]
Starts `refinery serve` (the flags refinery-bench uses) with REFINERY_LOG=warn,sqlx::query=debug,
deploys the bench's 10-block `then` chain (s1 -> ... -> s10, warm Python blocks) and prints:
1. wall time and server CPU (utime + stime of every thread, /proc/PID/stat) per 1-block and
   per 10-block run, RUNS runs each, twice, alternating; the debug log slows it a little;
2. context switches of the server's threads and SQL statements logged by sqlx, per run;
3. from the sqlx log's timestamps, per step of the 10-block runs (medians, microseconds):
   A = the step's read -> the run's read -> "marked running" (two statements after the first),
   B = marked running -> the first statement of its commit (the invocation of the block),
   C = that commit's statements, D = the commit's last statement -> the next step's first read
   (COMMIT, enqueue, dispatch).
PROFILE_LOG=warn runs 1 and 2 without the debug log (2 then counts no statements; 3 is empty).
"""
import glob, http.client, json, os, re, shutil, statistics, subprocess, sys, tempfile, time
from datetime import datetime

runs = int(sys.argv[1]) if len(sys.argv) > 1 else 200
binary = sys.argv[2] if len(sys.argv) > 2 else "target/release/refinery"
data = tempfile.mkdtemp(prefix="refinery-stepprof-")
log_path = os.path.join(data, "server.log")
server = subprocess.Popen(
    [binary, "serve", "--listen", "127.0.0.1:0", "--keep-alive", "10m",
     "--quota-rate", "1000000", "--quota-burst", "1000000", "--quota-instances", "2000",
     "--quota-memory-mb", "1000000", "--scale-up-limit", "1000/10s",
     "--data-dir", os.path.join(data, "data")],
    stdout=subprocess.PIPE, stderr=open(log_path, "w"), text=True,
    env=dict(os.environ, REFINERY_LOG=os.environ.get("PROFILE_LOG", "warn,sqlx::query=debug")))
host = None
for line in server.stdout:
    if line.startswith("Refinery listening on "):
        host = line.split()[-1].split("//")[1]
        break
if host is None:
    sys.exit(f"{binary} serve exited before listening; see {log_path}")
operator = open(os.path.join(data, "data", "operator.key")).read().strip()
conn = http.client.HTTPConnection(host)


def call(method, path, key, body=None):
    conn.request(method, path, body=None if body is None else json.dumps(body),
                 headers={"Authorization": "Bearer " + key, "Content-Type": "application/json"})
    reply = conn.getresponse()
    return reply.status, json.loads(reply.read() or b"null")


key = call("POST", "/v1/accounts", operator, {"name": "profile"})[1]["api_key"]
manifest = 'name = "svc"\n'
for i in range(1, 11):
    manifest += (f'\n[[blocks]]\nname = "s{i}"\nlanguage = "python"\nmemory_mb = 128\n'
                 f"max_concurrency = 64\ncode = '''\ndef main(block_input, backpack):\n"
                 f"    return (block_input or 0) + 1\n'''\n")
for i in range(1, 10):
    manifest += f'\n[[transitions]]\nfrom = "s{i}"\nto = "s{i + 1}"\ntype = "then"\n'
status, reply = call("POST", "/v1/deployments", key, {"manifest": manifest, "files": {}})
if status >= 300:
    sys.exit(f"deploy failed: HTTP {status}: {reply}")


def run(n):
    status, reply = call("POST", "/v1/projects/svc/runs?wait=30", key,
                         {"start": f"s{11 - n}", "input": 0})
    if status != 200 or reply["status"] != "succeeded":
        sys.exit(f"a {n}-block run failed: HTTP {status}: {reply}")


def cpu_s():
    fields = open(f"/proc/{server.pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def switches():
    total = 0
    for path in glob.glob(f"/proc/{server.pid}/task/*/status"):
        for line in open(path):
            if "ctxt_switches" in line:
                total += int(line.split()[1])
    return total


def log_lines():
    with open(log_path) as f:
        return sum(1 for _ in f)


for n in (1, 10):
    for _ in range(30):
        run(n)
print("1. per run:")
for n in (1, 10, 1, 10):
    cpu0, t0 = cpu_s(), time.time()
    for _ in range(runs):
        run(n)
    wall, cpu = time.time() - t0, cpu_s() - cpu0
    print(f"   {n:2d}-block run: wall {wall / runs * 1000:.2f} ms, server CPU {cpu / runs * 1000:.2f} ms")
print("2. per run (20 runs each):")
for n in (1, 10):
    time.sleep(0.3)
    l0, x0 = log_lines(), switches()
    for _ in range(20):
        run(n)
    time.sleep(0.3)
    l1, x1 = log_lines(), switches()
    print(f"   {n:2d}-block run: {(l1 - l0) / 20:.1f} SQL statements, {(x1 - x0) / 20:.0f} context switches")
server.terminate()
server.wait()

statements = []
for line in open(log_path):
    m = re.match(r'(\S+)Z DEBUG sqlx::query: summary="([^"]*)"', line)
    if m:
        statements.append((datetime.fromisoformat(m.group(1)).timestamp() * 1e6, m.group(2)))
phases = {"A": [], "B": [], "C": [], "D": []}
# One step: read step, read run, mark running, [invoke], read run (tx), finish step,
# insert next step, insert frame, read frame, update run; then the next step's read.
shape = ["SELECT id, run_id, seq", "SELECT id, account_id", "UPDATE steps SET status",
         "SELECT id, account_id", "UPDATE steps SET status", "INSERT INTO steps"]
i = 0
while i + 10 <= len(statements):
    names = [s for _, s in statements[i:i + 10]]
    if all(names[k].startswith(shape[k]) for k in range(len(shape))):
        t = [s for s, _ in statements[i:i + 10]]
        phases["A"].append(t[2] - t[0])
        phases["B"].append(t[3] - t[2])
        phases["C"].append(t[8] - t[3])
        if names[9].startswith(shape[0]):
            phases["D"].append(t[9] - t[8])
        i += 9
    else:
        i += 1
print("3. per step of the chains (median µs, from the sqlx log):")
for name, values in phases.items():
    if values:
        print(f"   {name}: {statistics.median(values):.0f} (mean {statistics.mean(values):.0f}, {len(values)} steps)")
shutil.rmtree(data, ignore_errors=True)
