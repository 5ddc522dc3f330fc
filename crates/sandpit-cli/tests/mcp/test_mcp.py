"""MCP end to end with the official Python SDK (`mcp`, pinned in requirements.txt) as a real
client, over both transports: stdio (launching `sandpit mcp`) and streamable HTTP (the
server's `/mcp`). Driven by `tests/it/mcp.rs`, which reads the JSON printed last.

Environment: SANDPIT_URL, SANDPIT_TOKEN, SANDPIT_BIN (the `sandpit` binary), OTHER_SANDBOX
(a sandbox of another workspace).
"""

import asyncio
import base64
import json
import os
import sys
import time
import urllib.parse

import httpx2
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

URL = os.environ["SANDPIT_URL"]
TOKEN = os.environ["SANDPIT_TOKEN"]
BIN = os.environ["SANDPIT_BIN"]
OTHER_SANDBOX = os.environ["OTHER_SANDBOX"]


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def stdio(token):
    return Client(
        StdioServerParameters(
            command=BIN,
            args=["mcp"],
            env={"SANDPIT_URL": URL, "SANDPIT_TOKEN": token},
        ),
        read_timeout_seconds=300,
    )


def http(token):
    client = httpx2.AsyncClient(
        headers={"Authorization": f"Bearer {token}"},
        timeout=httpx2.Timeout(30, read=300),
    )
    return Client(streamable_http_client(f"{URL}/mcp", http_client=client), read_timeout_seconds=300)


async def call(client, name, args):
    """A tool's structured result and whether it is an error."""
    r = await client.call_tool(name, args)
    if r.structured_content is None:
        raise AssertionError(f"{name}: no structured content: {r}")
    # The text content says the same as the structured one.
    assert r.content and r.content[0].type == "text", r
    return r.structured_content, r.is_error


async def ok(client, name, args):
    out, is_error = await call(client, name, args)
    assert not is_error, f"{name} {args}: {out}"
    return out


async def failed(client, name, args):
    """The REST error code of a tool call that must fail."""
    out, is_error = await call(client, name, args)
    assert is_error, f"{name} {args} did not fail: {out}"
    return out["error"]["code"]


async def rpc_error(client, name, args):
    try:
        await client.call_tool(name, args)
    except MCPError as e:
        return e.code
    raise AssertionError(f"{name} {args} was accepted")


def fetch_preview(url):
    """GET a preview URL through the server (its host names the sandbox and port; the
    server listens on loopback), trading the token in the query for the cookie."""
    u = urllib.parse.urlsplit(url)
    base = f"http://127.0.0.1:{u.port}"
    headers = {"Host": u.netloc}
    with httpx2.Client(follow_redirects=False, timeout=30) as h:
        target = u.path + (f"?{u.query}" if u.query else "")
        r = h.get(base + target, headers=headers)
        if r.status_code in (302, 303, 307):
            cookie = r.headers["set-cookie"].split(";")[0]
            loc = urllib.parse.urlsplit(r.headers["location"])
            target = loc.path + (f"?{loc.query}" if loc.query else "")
            r = h.get(base + target, headers={**headers, "Cookie": cookie})
        return r.status_code, r.text


async def scenario(client):
    seen = {"protocol": client.protocol_version}
    tools = await client.list_tools()
    seen["tools"] = sorted(t.name for t in tools.tools)
    assert all(t.input_schema.get("type") == "object" for t in tools.tools)

    made = await ok(client, "create_sandbox", {"template": "base", "timeout": "10m"})
    sid = made["id"]
    seen["id"] = sid
    seen["created"] = made["status"]

    run = await ok(
        client, "run_command", {"sandbox_id": sid, "command": "echo hello; echo oops >&2; exit 3"}
    )
    seen["exit"] = run["exit_code"]
    seen["stdout"] = run["stdout"]
    seen["stderr"] = run["stderr"]
    run = await ok(
        client,
        "run_command",
        {"sandbox_id": sid, "command": "echo $GREETING; pwd", "cwd": "/tmp", "env": {"GREETING": "hi"}},
    )
    seen["envCwd"] = run["stdout"]

    await ok(client, "write_file", {"sandbox_id": sid, "path": "/tmp/mcp/hello.txt", "content": "hello from mcp"})
    blob = bytes(range(256))
    await ok(
        client,
        "write_file",
        {"sandbox_id": sid, "path": "/tmp/mcp/blob.bin", "content": base64.b64encode(blob).decode(), "encoding": "base64"},
    )
    read = await ok(client, "read_file", {"sandbox_id": sid, "path": "/tmp/mcp/hello.txt"})
    seen["read"] = read["content"]
    seen["readEncoding"] = read["encoding"]
    read = await ok(client, "read_file", {"sandbox_id": sid, "path": "/tmp/mcp/blob.bin"})
    seen["binaryKept"] = read["encoding"] == "base64" and base64.b64decode(read["content"]) == blob
    listed = await ok(client, "list_files", {"sandbox_id": sid, "path": "/tmp/mcp"})
    seen["list"] = [[e["name"], e["kind"]] for e in listed["entries"]]
    seen["missingFile"] = await failed(client, "read_file", {"sandbox_id": sid, "path": "/tmp/mcp/nope"})

    # A web server in the sandbox, reached through the preview URL.
    await ok(
        client,
        "run_command",
        {"sandbox_id": sid, "command": "mkdir -p /srv && echo preview-ok > /srv/index.html && httpd -p 8080 -h /srv"},
    )
    preview = await ok(client, "preview_url", {"sandbox_id": sid, "port": 8080})
    seen["previewHost"] = preview["host"]
    seen["previewPrivacy"] = preview["privacy"]
    seen["previewHasToken"] = "preview_token=" in preview["url"]
    deadline = time.monotonic() + 30
    while True:
        status, body = await asyncio.to_thread(fetch_preview, preview["url"])
        if status == 200 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    seen["previewStatus"] = status
    seen["previewBody"] = body
    seen["reservedPort"] = await failed(client, "preview_url", {"sandbox_id": sid, "port": 49983})

    slept = await ok(client, "hibernate", {"sandbox_id": sid})
    seen["hibernated"] = slept["status"]
    listed = await ok(client, "list_sandboxes", {"status": "suspended"})
    seen["listedSuspended"] = [s["id"] for s in listed["sandboxes"] if s["id"] == sid]
    woke = await ok(client, "run_command", {"sandbox_id": sid, "command": "cat /tmp/mcp/hello.txt"})
    seen["afterWake"] = woke["stdout"]
    listed = await ok(client, "list_sandboxes", {})
    seen["statusAfterWake"] = [s["status"] for s in listed["sandboxes"] if s["id"] == sid]

    # Failures: REST errors as error results, malformed calls as JSON-RPC errors.
    seen["unknownSandbox"] = await failed(client, "run_command", {"sandbox_id": "sb0000000000000000", "command": "true"})
    seen["otherWorkspace"] = await failed(client, "run_command", {"sandbox_id": OTHER_SANDBOX, "command": "true"})
    seen["otherWorkspaceFile"] = await failed(client, "read_file", {"sandbox_id": OTHER_SANDBOX, "path": "/etc/hostname"})
    seen["otherWorkspaceDestroy"] = await failed(client, "destroy", {"sandbox_id": OTHER_SANDBOX})
    seen["badId"] = await rpc_error(client, "run_command", {"sandbox_id": "../templates", "command": "true"})
    seen["unknownTool"] = await rpc_error(client, "format_disk", {})
    seen["missingArg"] = await rpc_error(client, "run_command", {"sandbox_id": sid})

    gone = await ok(client, "destroy", {"sandbox_id": sid})
    seen["destroyed"] = gone["destroyed"]
    seen["afterDestroy"] = await failed(client, "run_command", {"sandbox_id": sid, "command": "true"})
    return seen


def mcp_error(e):
    """The MCPError in `e` (the SDK's task groups may wrap it in exception groups)."""
    if isinstance(e, MCPError):
        return e
    for inner in getattr(e, "exceptions", ()):
        found = mcp_error(inner)
        if found is not None:
            return found
    return None


async def bad_token(make):
    try:
        async with make("spt_not-a-token") as client:
            await client.list_tools()
    except Exception as e:
        found = mcp_error(e)
        if found is not None:
            return {"code": found.code, "message": found.error.message}
        # Anything else is a failure to report, not a pass.
        return {"code": None, "message": f"{type(e).__name__}: {e!r}"}
    return {"code": None, "message": "connected with a bad token"}


async def main():
    out = {}
    for name, make in [("stdio", stdio), ("http", http)]:
        log(f"--- {name}")
        async with make(TOKEN) as client:
            out[name] = await scenario(client)
        out[name]["badToken"] = await bad_token(make)
        log(json.dumps(out[name]))
    print(json.dumps(out))


asyncio.run(main())
