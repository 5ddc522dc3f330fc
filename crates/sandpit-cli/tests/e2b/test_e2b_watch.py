"""File watches through the unmodified `e2b` Python SDK (pinned in requirements.txt).

The sync SDK's `watch_dir` polls (`CreateWatcher`, `GetWatcherEvents`, `RemoveWatcher`);
the async SDK's streams (`WatchDir`). Configured like test_e2b.py (E2B_API_KEY,
E2B_API_URL, E2B_SANDBOX_URL). Prints one JSON line of what it saw; `tests/it/e2b.rs`
checks it. Any failure raises.
"""

import asyncio
import json
import time

from e2b import AsyncSandbox, Sandbox
from e2b import NotFoundException, SandboxException

seen = {}


def poll(handle, until, seconds=20):
    """Events from `handle` until `until(events)` holds (or the time is up)."""
    events = []
    deadline = time.time() + seconds
    while time.time() < deadline:
        events += [(e.name, e.type.value) for e in handle.get_new_events()]
        if until(events):
            break
        time.sleep(0.2)
    return events


sbx = Sandbox.create(timeout=300)
seen["id"] = sbx.sandbox_id
sbx.files.make_dir("/tmp/w/sub")

# Not recursive: direct entries only. A write through envd, a shell append, a new
# directory, a rename, a removal; the nested file is not seen.
flat = sbx.files.watch_dir("/tmp/w")
sbx.files.write("/tmp/w/a.txt", "one")
sbx.commands.run(
    "echo more >> /tmp/w/a.txt; mkdir /tmp/w/d; echo x > /tmp/w/sub/nested; "
    "mv /tmp/w/a.txt /tmp/w/b.txt; rm /tmp/w/b.txt"
)
events = poll(flat, lambda ev: ("b.txt", "remove") in ev)
seen["flat"] = events
seen["flatTypes"] = sorted({t for _, t in events})
seen["flatNested"] = any(n.startswith("sub/") for n, _ in events)
seen["flatEmptyAfter"] = flat.get_new_events() == []
flat.stop()
try:
    flat.get_new_events()
    seen["afterStop"] = "events"
except SandboxException as e:
    seen["afterStop"] = type(e).__name__

# Recursive: changes under subdirectories, named relative to the watched directory,
# including a directory made after the watch began.
deep = sbx.files.watch_dir("/tmp/w", recursive=True)
sbx.files.write("/tmp/w/sub/deep.txt", "deep")
sbx.commands.run("mkdir -p /tmp/w/new/inner && echo y > /tmp/w/new/inner/f")
events = poll(deep, lambda ev: ("new/inner/f", "write") in ev)
seen["deep"] = [e for e in events if e[0] in ("sub/deep.txt", "new/inner/f")]
seen["deepNew"] = sorted({n for n, t in events if t == "create" and n.startswith("new")})

# Bad paths: missing, a file, outside (`..`).
for key, path in [
    ("missingDir", "/tmp/w/missing"),
    ("fileNotDir", "/tmp/w/sub/deep.txt"),
    ("escape", "/tmp/../../etc"),
]:
    try:
        sbx.files.watch_dir(path)
        seen[key] = "watching"
    except NotFoundException:
        seen[key] = "not_found"
    except SandboxException as e:
        seen[key] = type(e).__name__

# A pause cuts the watch: once resumed, the old watcher reports an error, a new one works.
cut = sbx.files.watch_dir("/tmp/w")
started = time.time()
sbx.pause()
seen["pauseSeconds"] = round(time.time() - started)
again = Sandbox.connect(sbx.sandbox_id)
try:
    cut.get_new_events()
    seen["afterPause"] = "events"
except SandboxException:
    seen["afterPause"] = "error"
fresh = again.files.watch_dir("/tmp/w")
again.files.write("/tmp/w/after.txt", "after")
seen["afterResume"] = poll(fresh, lambda ev: ("after.txt", "write") in ev)
fresh.stop()
deep.stop()


async def streamed():
    """The async SDK's `watch_dir` is a WatchDir stream."""
    a = await AsyncSandbox.connect(sbx.sandbox_id)
    got = []
    exits = []
    h = await a.files.watch_dir(
        "/tmp/w",
        on_event=lambda e: got.append((e.name, e.type.value)),
        on_exit=lambda err: exits.append(err),
        recursive=True,
    )
    await a.files.write("/tmp/w/sub/streamed.txt", "s")
    await a.commands.run("rm /tmp/w/sub/streamed.txt")
    for _ in range(100):
        if ("sub/streamed.txt", "remove") in got:
            break
        await asyncio.sleep(0.2)
    await h.stop()
    seen["stream"] = got
    seen["streamStopExit"] = [e is None for e in exits]
    # The watch's `timeout` ends the stream with an error.
    timed = []
    await a.files.watch_dir(
        "/tmp/w", on_event=lambda e: None, on_exit=lambda err: timed.append(err), timeout=2
    )
    for _ in range(100):
        if timed:
            break
        await asyncio.sleep(0.2)
    seen["streamTimeout"] = [type(e).__name__ if e else None for e in timed]


asyncio.run(streamed())

again.kill()
print(json.dumps(seen))
