// The unmodified @codesandbox/sdk against a live Sandpit server.
// Env: CSB_BASE_URL (the server), CSB_API_KEY (a token), SANDPIT_ADDR (host:port the
// preview hosts resolve to). Prints one JSON line of observations on success; throws
// (exit 1) at the first expectation that fails. Run by tests/it/csb.rs.
import http from "node:http";
import { CodeSandbox, CommandError } from "@codesandbox/sdk";
import { unzipSync } from "fflate";

const baseUrl = process.env.CSB_BASE_URL;
const sdk = new CodeSandbox(process.env.CSB_API_KEY, { baseUrl });
const [addrHost, addrPort] = process.env.SANDPIT_ADDR.split(":");
const seen = {};

function expect(cond, what) {
  if (!cond) throw new Error(`expectation failed: ${what}`);
}

async function until(what, fn, ms = 20000) {
  const end = Date.now() + ms;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

// GET a preview URL (https://<id>-<port>.csb.app/...) through the Sandpit listener: the host
// name resolves to the server, the Host header stays as the SDK built it.
function get(url, extra = {}) {
  const u = new URL(url);
  return new Promise((resolve, reject) => {
    const req = http.get(
      {
        host: addrHost,
        port: Number(addrPort),
        path: u.pathname + u.search,
        headers: { host: u.host, ...extra },
      },
      (res) => {
        let body = "";
        res.on("data", (c) => (body += c));
        res.on("end", () => resolve({ status: res.statusCode, headers: res.headers, body }));
      },
    );
    req.on("error", reject);
  });
}

const t0 = Date.now();
function step(name) {
  console.error(`[${((Date.now() - t0) / 1000).toFixed(1)}s] ${name}`);
}

// ---- create, connect, commands ----
step('create, connect, commands');
const sandbox = await sdk.sandboxes.create({
  title: "csb-e2e",
  tags: ["e2e", "sdk-test"],
  privacy: "private",
});
seen.id = sandbox.id;
const client = await sandbox.connect();
expect(client.workspacePath === "/project/sandbox", `workspace path ${client.workspacePath}`);

const hello = await client.commands.run("echo hello-$((6*7))");
expect(hello.includes("hello-42"), `commands.run output ${JSON.stringify(hello)}`);
seen.run = hello.trim();

try {
  await client.commands.run("echo oops; exit 3");
  throw new Error("a failing command resolved");
} catch (e) {
  expect(e instanceof CommandError, `failure is a CommandError: ${e}`);
  expect(e.exitCode === 3, `exit code ${e.exitCode}`);
  expect(e.output.includes("oops"), `failure output ${e.output}`);
  seen.failedExit = e.exitCode;
}

// ---- background command with output ----
step('background command with output');
const bg = await client.commands.runBackground(
  "for i in 1 2 3; do echo tick-$i; sleep 0.2; done",
);
const ticks = [];
bg.onOutput((o) => ticks.push(o));
const bgOut = await bg.waitUntilComplete();
expect(bgOut.includes("tick-3"), `background output ${JSON.stringify(bgOut)}`);
expect(ticks.join("").includes("tick-1"), `streamed output ${JSON.stringify(ticks)}`);
seen.ticks = ticks.join("").trim().split("\n").length;
const again = await client.commands.runBackground(
  "echo run-$(cat /tmp/runs 2>/dev/null | wc -l); echo x >> /tmp/runs; exec sleep 1000",
);
const againOut = [];
again.onOutput((o) => againOut.push(o));
await until("first run", () => againOut.join("").includes("run-0"));
await again.restart();
await until("restarted run", () => againOut.join("").includes("run-1"));
await again.kill();

// ---- files ----
step('files');
await client.fs.writeTextFile("notes.txt", "kept across hibernation");
expect((await client.fs.readTextFile("notes.txt")) === "kept across hibernation", "readTextFile");
await client.fs.batchWrite([
  { path: "site/index.html", content: "<h1>from the sdk</h1>" },
  { path: "b.txt", content: "B" },
]);
expect((await client.fs.readTextFile("site/index.html")) === "<h1>from the sdk</h1>", "batchWrite");
const entries = await client.fs.readdir(".");
const names = entries.map((e) => e.name).sort();
expect(names.includes("notes.txt") && names.includes("site") && names.includes("b.txt"), `readdir ${names}`);
expect(entries.find((e) => e.name === "site").type === "directory", "site is a directory");
const st = await client.fs.stat("b.txt");
expect(st.type === "file" && st.size === 1, `stat ${JSON.stringify(st)}`);
await client.fs.rename("b.txt", "c.txt");
await client.fs.copy("c.txt", "d.txt");
expect((await client.fs.readTextFile("d.txt")) === "B", "copy");
await client.fs.mkdir("deep/er", true);
await client.fs.remove("deep", true);
try {
  await client.fs.readTextFile("deep/er");
  throw new Error("a removed path was read");
} catch (e) {
  expect(String(e).includes("2:"), `ENOENT after remove: ${e}`);
}
const watcher = await client.fs.watch(".", { recursive: true, excludes: ["**/node_modules/**"] });
const events = [];
watcher.onEvent((e) => events.push(e));
await client.fs.writeTextFile("watched/new.txt", "w");
await client.fs.writeTextFile("node_modules/ignored.js", "x");
await until("a watch event", () =>
  events.some((e) => e.type === "add" && e.paths.some((p) => p.endsWith("/watched/new.txt"))),
);
await client.fs.remove("watched/new.txt");
await until("a remove event", () =>
  events.some((e) => e.type === "remove" && e.paths.some((p) => p.endsWith("/watched/new.txt"))),
);
// A rewrite that keeps size and mtime (inotify sees it; polling would not).
await client.commands.run(
  "cd watched && printf aaaa > same.txt && touch -r same.txt /tmp/ref && sleep 0.2 && printf bbbb > same.txt && touch -r /tmp/ref same.txt",
);
await until("a same-size same-mtime change", () =>
  events.some((e) => e.type === "change" && e.paths.some((p) => p.endsWith("/watched/same.txt"))),
);
expect(!events.some((e) => e.paths.some((p) => p.includes("node_modules"))), "excluded paths");
watcher.dispose();
seen.files = names;
seen.watchEvents = events.length;

// ---- a token without sandbox_edit_code gets a read-only session ----
step("read-only session");
const ro = new CodeSandbox(process.env.CSB_READONLY_KEY, { baseUrl });
const roClient = await (await ro.sandboxes.resume(sandbox.id)).connect();
expect((await roClient.fs.readTextFile("notes.txt")) === "kept across hibernation", "read-only read");
for (const attempt of [
  () => roClient.fs.writeTextFile("notes.txt", "overwritten"),
  () => roClient.commands.run("echo no"),
]) {
  let refused = false;
  try {
    await attempt();
  } catch {
    refused = true;
  }
  expect(refused, "a read-only session cannot write or run");
}
expect((await client.fs.readTextFile("notes.txt")) === "kept across hibernation", "file unchanged");
await roClient.disconnect();
roClient.dispose();
seen.readOnly = true;

// ---- disconnect and reconnect (a fresh token from /vm/{id}/start) ----
step("reconnect");
await client.disconnect();
step("reconnect: disconnected");
await client.reconnect();
step("reconnect: connected");
expect(client.state === "CONNECTED", `state after reconnect ${client.state}`);
expect((await client.commands.run("echo again")).includes("again"), "command after reconnect");

// ---- terminals ----
step('terminals');
const term = await client.terminals.create();
const termOut = [];
term.onOutput((o) => termOut.push(o));
await term.open();
await term.run("echo term-$((2+3))");
await until("terminal output", () => termOut.join("").includes("term-5"));
// A real pty: what is typed is echoed, `tty` names a pts, and the size sent with input
// (the SDK's `dimensions`) reaches the terminal.
expect(termOut.join("").includes("echo term-$((2+3))"), "typed input is echoed");
await term.run("tty");
await until("a pty", () => termOut.join("").includes("/dev/pts/"));
await term.run("echo size $(stty size)", { cols: 120, rows: 40 });
await until("the new size", () => termOut.join("").includes("size 40 120"));
const listed = await client.terminals.getAll();
expect(listed.some((t) => t.id === term.id), "terminal is listed");
await term.kill();
seen.terminal = true;

// ---- ports and previews (private: host tokens) ----
step('ports and previews (private: host tokens)');
const server = await client.commands.runBackground("busybox httpd -f -p 8080 -h /project/sandbox/site");
const port = await client.ports.waitForPort(8080, { timeoutMs: 30000 });
expect(port.port === 8080, `waitForPort ${JSON.stringify(port)}`);
const url = client.hosts.getUrl(8080, "http");
const denied = await get(url);
expect(denied.status === 401 || denied.status === 403, `private preview without token: ${denied.status}`);
const hostToken = await sdk.hosts.createToken(sandbox.id, {
  expiresAt: new Date(Date.now() + 3600_000),
});
const tokenUrl = sdk.hosts.getUrl(hostToken, 8080, "http");
let page = await get(tokenUrl);
if (page.status === 307 || page.status === 302) {
  // The token moved into a cookie; follow once with it.
  const cookie = String(page.headers["set-cookie"]).split(";")[0];
  page = await new Promise((resolve, reject) => {
    const u = new URL(tokenUrl);
    http
      .get(
        { host: addrHost, port: Number(addrPort), path: page.headers.location?.startsWith("/") ? page.headers.location : "/", headers: { host: u.host, cookie } },
        (res) => {
          let body = "";
          res.on("data", (c) => (body += c));
          res.on("end", () => resolve({ status: res.statusCode, body }));
        },
      )
      .on("error", reject);
  });
}
expect(page.status === 200 && page.body.includes("from the sdk"), `preview with host token: ${page.status} ${page.body}`);
const tokens = await sdk.hosts.listTokens(sandbox.id);
expect(tokens.some((t) => t.tokenId === hostToken.tokenId), "host token listed");
await sdk.hosts.revokeToken(sandbox.id, hostToken.tokenId);
const revoked = await get(tokenUrl);
expect(revoked.status === 401 || revoked.status === 403, `revoked host token: ${revoked.status}`);
// A page on a trusted preview host of the workspace needs no token.
const hostsResp = await fetch(`${baseUrl}/workspace/preview_hosts`, {
  method: "PUT",
  headers: { authorization: `Bearer ${process.env.CSB_API_KEY}`, "content-type": "application/json" },
  body: JSON.stringify({ hosts: ["app.example.test"] }),
});
expect(hostsResp.status === 201, `PUT preview_hosts: ${hostsResp.status}`);
const trusted = await get(url, { origin: "http://app.example.test" });
expect(trusted.status === 200 && trusted.body.includes("from the sdk"), `trusted origin: ${trusted.status}`);
const untrusted = await get(url, { origin: "http://evil.example.test" });
expect(untrusted.status === 401, `untrusted origin: ${untrusted.status}`);
await server.kill();
seen.preview = page.status;
seen.trustedHost = trusted.status;

// ---- hibernate and resume: a file and a process survive ----
step('hibernate and resume: a file and a process survive');
await client.commands.runBackground("echo $$ > /tmp/bg.pid; exec sleep 100000");
await until("background pid", async () => {
  try {
    return (await client.fs.readTextFile("/tmp/bg.pid")).trim().length > 0;
  } catch {
    return false;
  }
});
const pid = (await client.fs.readTextFile("/tmp/bg.pid")).trim();
const hibernated = new Promise((resolve) =>
  client.onStateChange((s) => s === "HIBERNATED" && resolve(s)),
);
await sdk.sandboxes.hibernate(sandbox.id);
await hibernated;
const resumed = await sdk.sandboxes.resume(sandbox.id);
expect(resumed.bootupType === "RESUME", `bootup type ${resumed.bootupType}`);
const client2 = await resumed.connect();
expect((await client2.fs.readTextFile("notes.txt")) === "kept across hibernation", "file after resume");
const alive = await client2.commands.run(`kill -0 ${pid} && echo alive-${pid}`);
expect(alive.includes(`alive-${pid}`), `process after resume: ${alive}`);
seen.resumed = { pid, bootupType: resumed.bootupType };
await client2.commands.run("ln -sf /etc/passwd site/passwd && printf zipped > site/z.txt");
const { downloadUrl } = await client2.fs.download("site");
const archive = new Uint8Array(await (await fetch(downloadUrl)).arrayBuffer());
expect(archive[0] === 0x50 && archive[1] === 0x4b, `download is a zip (${archive.length} bytes)`);
const files = unzipSync(archive);
const text = (name) => new TextDecoder().decode(files[name]);
expect(text("site/z.txt") === "zipped", `zip entries: ${Object.keys(files)}`);
// The link is stored as a link (its target), never as what it points to.
expect(text("site/passwd") === "/etc/passwd", `symlink in the zip: ${text("site/passwd")}`);
seen.download = archive.length;

// ---- sessions: a Linux user each, write or read, git identity ----
const alice = await resumed.connect({
  id: "alice",
  permission: "write",
  git: { provider: "github.com", accessToken: "t0k", email: "alice@example.test", name: "Alice" },
});
const who = await alice.commands.run("id -un; cat $HOME/.gitconfig; pwd");
expect(who.includes("csb-alice") && who.includes("alice@example.test"), `session user: ${who}`);
const bob = await resumed.connect({ id: "bob", permission: "read" });
expect((await bob.fs.readTextFile("notes.txt")) === "kept across hibernation", "read session reads");
let bobRan = true;
try {
  await bob.commands.run("echo no");
} catch {
  bobRan = false;
}
expect(!bobRan, "a read session cannot run commands");
for (const c of [alice, bob]) {
  await c.disconnect();
  c.dispose();
}
// Commands run on a pty, as on CodeSandbox: lines end in "\r\n".
seen.sessions = who.split("\n")[0].trimEnd();

// ---- list and get with tags ----
step('list and get with tags');
const info = await sdk.sandboxes.get(sandbox.id);
expect(info.title === "csb-e2e" && info.tags.includes("e2e"), `get ${JSON.stringify(info)}`);
const list = await sdk.sandboxes.list({ tags: ["e2e"] });
expect(list.sandboxes.some((s) => s.id === sandbox.id), "list by tag");
const none = await sdk.sandboxes.list({ tags: ["no-such-tag"] });
expect(!none.sandboxes.some((s) => s.id === sandbox.id), "list by another tag");

// ---- fork ----
step('fork');
const fork = await sdk.sandboxes.fork(sandbox.id, { title: "csb-e2e-fork" });
expect(fork.id !== sandbox.id, "fork has its own id");
const forkClient = await fork.connect();
expect((await forkClient.fs.readTextFile("notes.txt")) === "kept across hibernation", "file in fork");
seen.fork = fork.id;

// ---- restart: a clean boot runs .codesandbox/tasks.json's setup and runAtStart tasks ----
step("tasks and setup after restart");
await forkClient.fs.writeTextFile(
  ".codesandbox/tasks.json",
  JSON.stringify({
    setupTasks: ["echo one > /tmp/setup-one", { name: "Second", command: "echo two; exit 4" }],
    tasks: {
      dev: { name: "Dev", command: "echo dev-started; exec sleep 1000", runAtStart: true },
      once: { name: "Once", command: "echo once-ran" },
    },
  }),
);
await forkClient.disconnect();
forkClient.dispose();
const restarted = await sdk.sandboxes.restart(fork.id);
expect(restarted.bootupType === "CLEAN", `bootup after restart ${restarted.bootupType}`);
const rc = await restarted.connect();
const steps = await until("setup to finish", async () => {
  const progress = await rc.setup.waitUntilComplete().then(() => rc.setup.getSteps());
  return progress;
}, 60000);
expect(steps.length === 2, `setup steps ${steps.length}`);
expect(steps[0].status === "SUCCEEDED" && steps[1].status === "FAILED", `step statuses ${steps.map((s) => s.status)}`);
expect((await rc.fs.readTextFile("/tmp/setup-one")).trim() === "one", "setup step ran");
const tasks = await rc.tasks.getAll();
const dev = tasks.find((t) => t.id === "dev");
expect(dev && dev.status === "RUNNING", `runAtStart task: ${dev?.status}`);
const once = tasks.find((t) => t.id === "once");
expect(once && once.status === "IDLE", `idle task: ${once?.status}`);
await once.run();
await until("the task's shell", () => once.shell);
await until("the task's output", async () => (await once.open()).includes("once-ran"));
await dev.stop();
await rc.disconnect();
rc.dispose();
seen.setup = steps.map((s) => s.status);

// ---- shutdown and delete ----
step('shutdown and delete');
// `disconnect` waits for pending calls (the SDK asks for the port list on its own when a
// client is made, and disposing with that call pending is an unhandled rejection).
for (const c of [client2]) {
  await c.disconnect();
  c.dispose();
}
client.dispose();
await sdk.sandboxes.shutdown(fork.id);
await sdk.sandboxes.delete(fork.id);
await sdk.sandboxes.delete(sandbox.id);
try {
  await sdk.sandboxes.get(sandbox.id);
  throw new Error("a deleted sandbox was found");
} catch (e) {
  expect(String(e).includes("not found"), `get after delete: ${e}`);
}

console.log(JSON.stringify(seen));
process.exit(0);
