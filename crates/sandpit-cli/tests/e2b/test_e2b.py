"""The unmodified `e2b` Python SDK (pinned in requirements.txt) against a live Sandpit server.

Configured only through the SDK's own environment variables, the plain-HTTP way:
E2B_API_KEY (a Sandpit API token), E2B_API_URL and E2B_SANDBOX_URL (the server's URL).
Prints one JSON line of what it saw; `tests/it/e2b.rs` checks it. Any failure raises.
"""

import http.client
from datetime import datetime, timezone
import json
import time

from e2b import PtySize, Sandbox, SandboxQuery, SandboxState
from e2b import CommandExitException, NotFoundException, SandboxException, TimeoutException

seen = {}

sbx = Sandbox.create(metadata={"suite": "e2b-python"}, envs={"GREETING": "hello"}, timeout=300)
seen["id"] = sbx.sandbox_id
seen["running"] = sbx.is_running()

# A command's stdout and exit code (a non-zero exit raises, carrying both).
try:
    sbx.commands.run("echo hi; exit 3")
    raise AssertionError("exit 3 did not raise")
except CommandExitException as e:
    seen["exit"] = e.exit_code
    seen["exitStdout"] = e.stdout
ok = sbx.commands.run("echo $GREETING; echo oops >&2")
seen["run"] = ok.stdout.strip()
seen["stderr"] = ok.stderr.strip()
seen["env"] = sbx.commands.run("echo $WHO", envs={"WHO": "e2b"}).stdout.strip()
seen["cwd"] = sbx.commands.run("pwd", cwd="/tmp").stdout.strip()
# A command that outlives its timeout raises the SDK's timeout error, and is gone.
try:
    sbx.commands.run("sleep 30", timeout=2)
    seen["timeout"] = "returned"
except TimeoutException:
    seen["timeout"] = "TimeoutException"
# (the SDK's own timer and the server's may end the call in either order: the server's kill
# lands within moments)
for _ in range(50):
    seen["timedOutListed"] = any("sleep 30" in " ".join(p.args) for p in sbx.commands.list())
    if not seen["timedOutListed"]:
        break
    time.sleep(0.1)

# A background command with streamed output (the sync SDK streams as the handle is
# iterated), then listed and killed.
h = sbx.commands.run(
    "for i in 1 2 3; do echo tick$i; sleep 0.2; done; sleep 600",
    background=True,
)
streamed = ""
for stdout, _stderr, _pty in h:
    streamed += stdout or ""
    if streamed.count("tick") >= 3:
        break
seen["ticks"] = streamed.count("tick")
seen["listed"] = h.pid in [p.pid for p in sbx.commands.list()]
seen["killed"] = h.kill()
try:
    h.wait()
    seen["killedExit"] = 0
except CommandExitException as e:
    seen["killedExit"] = e.exit_code
seen["listedAfterKill"] = h.pid in [p.pid for p in sbx.commands.list()]

# Files.
info = sbx.files.write("/tmp/e2b/hello.txt", "hello from e2b")
seen["writePath"] = info.path
seen["read"] = sbx.files.read("/tmp/e2b/hello.txt")
seen["madeDir"] = sbx.files.make_dir("/tmp/e2b/sub")
seen["madeDirAgain"] = sbx.files.make_dir("/tmp/e2b/sub")
seen["list"] = sorted((e.name, e.type.value if e.type else None) for e in sbx.files.list("/tmp/e2b"))
seen["exists"] = sbx.files.exists("/tmp/e2b/hello.txt")
sbx.files.rename("/tmp/e2b/hello.txt", "/tmp/e2b/renamed.txt")
seen["renamed"] = sbx.files.read("/tmp/e2b/renamed.txt")
sbx.files.remove("/tmp/e2b/sub")
seen["afterRemove"] = sorted(e.name for e in sbx.files.list("/tmp/e2b"))
try:
    sbx.files.read("/tmp/e2b/missing.txt")
    seen["missing"] = "read"
except NotFoundException:
    seen["missing"] = "not_found"

# A port opened in the sandbox, fetched at the SDK's host URL (`<port>-<id>.<domain>`, the
# domain the server answered with); the name is looked up as loopback (`*.localhost`).
sbx.files.write("/tmp/www/index.html", "served from the sandbox")
sbx.commands.run("busybox httpd -p 8000 -h /tmp/www")
host = sbx.get_host(8000)
seen["hostShape"] = host.startswith("8000-" + sbx.sandbox_id + ".")
name, _, port = host.partition(":")
conn = http.client.HTTPConnection("127.0.0.1", int(port or 80), timeout=30)
conn.request("GET", "/", headers={"Host": host})
resp = conn.getresponse()
seen["hostBody"] = f"{resp.status} {resp.read().decode()}"
conn.close()

# Listing, with the metadata filter.
listed = Sandbox.list(query=SandboxQuery(metadata={"suite": "e2b-python"})).next_items()
seen["listedIds"] = [s.sandbox_id for s in listed]
seen["listedState"] = [s.state.value for s in listed]
seen["metadata"] = sbx.get_info().metadata

sbx.set_timeout(600)

# Pause, then resume through connect: the file is still there, and so is a background
# process (its stream is cut by the pause; it runs on and is reattached with connect).
sbx.commands.run("echo kept > /tmp/e2b/kept.txt")
counter = sbx.commands.run(
    "i=0; while true; do i=$((i+1)); echo $i > /tmp/e2b/count; echo beat$i; sleep 0.2; done",
    background=True,
)
for stdout, _stderr, _pty in counter:
    if "beat2" in (stdout or ""):
        break
seen["paused"] = sbx.pause()
seen["pausedAgain"] = sbx.pause()
seen["pausedState"] = [
    s.state.value
    for s in Sandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED])).next_items()
    if s.sandbox_id == sbx.sandbox_id
]
# Paused, it waits for a resume instead of running out its timeout (kept 30 days).
ends = Sandbox.get_info(sbx.sandbox_id).end_at
seen["pausedKeptDays"] = (ends - datetime.now(timezone.utc)).days
again = Sandbox.connect(sbx.sandbox_id)
seen["resumedTimeout"] = (again.get_info().end_at - datetime.now(timezone.utc)).total_seconds() < 700
seen["resumedRead"] = again.files.read("/tmp/e2b/kept.txt").strip()
seen["resumedRun"] = again.commands.run("cat /tmp/e2b/kept.txt").stdout.strip()
listed_after = again.commands.list()
seen["processKept"] = counter.pid in [p.pid for p in listed_after]
if seen["processKept"]:
    first = int(again.files.read("/tmp/e2b/count").strip())
    reattached = again.commands.connect(counter.pid)
    beats = ""
    for stdout, _stderr, _pty in reattached:
        beats += stdout or ""
        if beats.count("beat") >= 2:
            break
    seen["beatsAfterResume"] = beats.count("beat") >= 2
    seen["counterAdvanced"] = int(again.files.read("/tmp/e2b/count").strip()) > first
    again.commands.kill(counter.pid)
    seen["keptListedAfterKill"] = counter.pid in [p.pid for p in again.commands.list()]
else:
    # Lost across the pause: what was listed, and the agent's log (in the sandbox's memory).
    seen["pid"] = counter.pid
    seen["processesAfter"] = [[p.pid, p.cmd, p.args] for p in listed_after]
    seen["agentLog"] = again.files.read("/dev/.sandpit-agent.log")[-20000:]

# A PTY: typed input runs in a shell whose stdin is a terminal; resize; kill.
term = again.pty.create(PtySize(rows=24, cols=80))
again.pty.send_stdin(term.pid, b"[ -t 0 ] && echo T$((3+4))Y\n")
screen = b""
for _stdout, _stderr, pty in term:
    screen += pty or b""
    if b"T7Y" in screen:
        break
seen["pty"] = b"T7Y" in screen
again.pty.resize(term.pid, PtySize(rows=40, cols=100))
again.pty.send_stdin(term.pid, b"stty size\n")
for _stdout, _stderr, pty in term:
    screen += pty or b""
    if b"40 100" in screen:
        break
seen["ptyResized"] = b"40 100" in screen
seen["ptyKilled"] = again.pty.kill(term.pid)

# Stdin to a background process, which a kill of the sandbox then ends (it does not wait).
cat = again.commands.run("cat", background=True, stdin=True)
again.commands.send_stdin(cat.pid, "fed through stdin\n")
fed = ""
for stdout, _stderr, _pty in cat:
    fed += stdout or ""
    if "\n" in fed:
        break
seen["stdin"] = fed.strip()

started = time.time()
again.kill()
seen["killSeconds"] = round(time.time() - started)
try:
    Sandbox.connect(sbx.sandbox_id)
    seen["afterKill"] = "connected"
except (NotFoundException, SandboxException) as e:
    seen["afterKill"] = type(e).__name__

print(json.dumps(seen))
