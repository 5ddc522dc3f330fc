"""The unmodified `e2b` Python SDK against an API replica of a fleet (`sandpit serve
--api-only`): E2B_API_URL and E2B_SANDBOX_URL are the replica's URL, which runs no sandbox,
so every envd call is relayed to the sandbox's node. Prints one JSON line of what it saw.
"""

import json

from e2b import Sandbox, SandboxQuery

seen = {}

sbx = Sandbox.create(metadata={"suite": "e2b-fleet"}, timeout=300)
seen["id"] = sbx.sandbox_id
seen["run"] = sbx.commands.run("echo relayed").stdout.strip()
sbx.files.write("/tmp/fleet.txt", "through the replica")
seen["read"] = sbx.files.read("/tmp/fleet.txt")
h = sbx.commands.run("for i in 1 2 3; do echo beat$i; sleep 0.2; done; sleep 600", background=True)
beats = ""
for stdout, _stderr, _pty in h:
    beats += stdout or ""
    if beats.count("beat") >= 3:
        break
seen["beats"] = beats.count("beat")
seen["listed"] = h.pid in [p.pid for p in sbx.commands.list()]
seen["paused"] = sbx.pause()
again = Sandbox.connect(sbx.sandbox_id)
seen["resumedRead"] = again.files.read("/tmp/fleet.txt")
listed_after = again.commands.list()
seen["keptProcess"] = h.pid in [p.pid for p in listed_after]
if not seen["keptProcess"]:
    # What the test reports when the process was lost: what was listed, and the agent's log
    # (kept in the sandbox's memory).
    seen["pid"] = h.pid
    seen["processesAfter"] = [[p.pid, p.cmd, p.args] for p in listed_after]
    seen["agentLog"] = again.files.read("/dev/.sandpit-agent.log")[-20000:]
seen["listedIds"] = [
    s.sandbox_id for s in Sandbox.list(query=SandboxQuery(metadata={"suite": "e2b-fleet"})).next_items()
]
again.kill()
print(json.dumps(seen))
