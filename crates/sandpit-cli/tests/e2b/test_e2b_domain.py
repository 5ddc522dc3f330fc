"""The unmodified `e2b` Python SDK against a Sandpit server that serves HTTPS, configured the
way the hosted service is: E2B_API_KEY and E2B_DOMAIN (`<preview domain>:<port>`) only, the
test CA trusted through SSL_CERT_FILE (the SDK's transport, pyqwest, reads it and resolves
`*.localhost` to loopback itself). The API is then `https://api.<domain>`, envd
`https://49983-<id>.<domain>`, a port `https://<port>-<id>.<domain>`.

Prints one JSON line of what it saw; `tests/it/e2b.rs` checks it. Any failure raises.
"""

import json
import os
import time

from e2b import Sandbox, NotFoundException, SandboxException
from pyqwest import SyncClient, SyncHTTPTransport

seen = {}

sbx = Sandbox.create(timeout=300)
seen["id"] = sbx.sandbox_id
seen["domain"] = sbx.sandbox_domain
seen["whoami"] = sbx.commands.run("whoami").stdout.strip()
seen["bash"] = sbx.commands.run("bash -c 'echo $BASH_VERSION'").stdout.strip()
seen["home"] = sbx.commands.run("pwd").stdout.strip()
seen["rootWhoami"] = sbx.commands.run("whoami", user="root").stdout.strip()

# A relative path is in the user's home, and the file is the user's.
info = sbx.files.write("notes.txt", "over TLS")
seen["writePath"] = info.path
seen["read"] = sbx.files.read("notes.txt")
seen["owner"] = sbx.commands.run("stat -c %U /home/user/notes.txt").stdout.strip()

# A server in the sandbox, reached at the SDK's host URL for its port.
sbx.commands.run(
    "mkdir -p /tmp/www && echo served over tls > /tmp/www/index.html && "
    "busybox httpd -f -p 8000 -h /tmp/www",
    background=True,
)
host = sbx.get_host(8000)
seen["host"] = host
client = SyncClient(SyncHTTPTransport(tls_include_system_certs=True))
body = None
deadline = time.time() + 20
while time.time() < deadline:
    r = client.get(f"https://{host}/")
    if r.status == 200:
        body = r.content.decode()
        break
    time.sleep(0.2)
seen["fetched"] = (body or "").strip()

sbx.kill()
try:
    Sandbox.connect(sbx.sandbox_id)
    seen["afterKill"] = "connected"
except (NotFoundException, SandboxException) as e:
    seen["afterKill"] = type(e).__name__

print(json.dumps(seen))
