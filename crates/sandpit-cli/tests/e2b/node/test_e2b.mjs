// The unmodified `e2b` JS SDK (pinned in package-lock.json) against a live Sandpit server.
// Configured only through the SDK's own environment variables, the plain-HTTP way:
// E2B_API_KEY (a Sandpit API token), E2B_API_URL and E2B_SANDBOX_URL (the server's URL).
// Covers PTYs, `commands.connect` and a process that survives a pause too. Prints one JSON line of what it saw; tests/it/e2b_node.rs checks it.
// Throws (exit 1) at the first expectation that fails.
import http from "node:http";
import {
  AuthenticationError,
  CommandExitError,
  NotFoundError,
  Sandbox,
} from "e2b";

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

const sbx = await Sandbox.create({
  metadata: { suite: "e2b-node" },
  envs: { GREETING: "hello" },
  timeoutMs: 300_000,
});
seen.id = sbx.sandboxId;
seen.running = await sbx.isRunning();

// A command's stdout and exit code (a non-zero exit throws, carrying both).
try {
  await sbx.commands.run("echo hi; exit 3");
  throw new Error("exit 3 did not throw");
} catch (e) {
  expect(e instanceof CommandExitError, `CommandExitError, not ${e}`);
  seen.exit = e.exitCode;
  seen.exitStdout = e.stdout;
}
const ok = await sbx.commands.run("echo $GREETING; echo oops >&2");
seen.run = ok.stdout.trim();
seen.stderr = ok.stderr.trim();
seen.env = (await sbx.commands.run("echo $WHO", { envs: { WHO: "e2b" } })).stdout.trim();
seen.cwd = (await sbx.commands.run("pwd", { cwd: "/tmp" })).stdout.trim();

// A background command with streamed output (onStdout), then listed and killed.
let streamed = "";
const h = await sbx.commands.run("for i in 1 2 3; do echo tick$i; sleep 0.2; done; sleep 600", {
  background: true,
  onStdout: (d) => {
    streamed += d;
  },
});
await until("three ticks", () => (streamed.match(/tick/g) || []).length >= 3);
seen.ticks = (streamed.match(/tick/g) || []).length;
seen.listed = (await sbx.commands.list()).some((p) => p.pid === h.pid);
seen.killed = await h.kill();
try {
  await h.wait();
  seen.killedExit = 0;
} catch (e) {
  expect(e instanceof CommandExitError, `CommandExitError after kill, not ${e}`);
  seen.killedExit = e.exitCode;
}
seen.listedAfterKill = (await sbx.commands.list()).some((p) => p.pid === h.pid);

// Files.
await sbx.files.makeDir("/tmp/e2b");
// The JS SDK watches through the WatchDir stream.
const watched = [];
const watch = await sbx.files.watchDir(
  "/tmp/e2b",
  (ev) => {
    watched.push([ev.name, ev.type]);
  },
  { recursive: true },
);
const info = await sbx.files.write("/tmp/e2b/hello.txt", "hello from e2b");
seen.writePath = info.path;
seen.read = await sbx.files.read("/tmp/e2b/hello.txt");
seen.madeDir = await sbx.files.makeDir("/tmp/e2b/sub");
seen.madeDirAgain = await sbx.files.makeDir("/tmp/e2b/sub");
await sbx.files.write("/tmp/e2b/sub/deep.txt", "deep");
seen.list = (await sbx.files.list("/tmp/e2b"))
  .map((e) => [e.name, e.type])
  .sort((a, b) => a[0].localeCompare(b[0]));
seen.exists = await sbx.files.exists("/tmp/e2b/hello.txt");
await sbx.files.rename("/tmp/e2b/hello.txt", "/tmp/e2b/renamed.txt");
seen.renamed = await sbx.files.read("/tmp/e2b/renamed.txt");
await sbx.files.remove("/tmp/e2b/sub");
seen.afterRemove = (await sbx.files.list("/tmp/e2b")).map((e) => e.name).sort();
try {
  await sbx.files.read("/tmp/e2b/missing.txt");
  seen.missing = "read";
} catch (e) {
  seen.missing = e instanceof NotFoundError ? "not_found" : String(e);
}
await until("the watch to see the removal", () =>
  watched.some(([n, t]) => n === "sub" && t === "remove"),
);
await watch.stop();
seen.watched = watched;
try {
  await sbx.files.watchDir("/tmp/e2b/missing", () => {});
  seen.watchMissing = "watching";
} catch (e) {
  seen.watchMissing = e instanceof NotFoundError ? "not_found" : String(e);
}

// Listing, with the metadata filter.
const listed = await Sandbox.list({ query: { metadata: { suite: "e2b-node" } } }).nextItems();
seen.listedIds = listed.map((s) => s.sandboxId);
seen.listedState = listed.map((s) => s.state);
const got = await sbx.getInfo();
seen.metadata = got.metadata;
seen.infoId = got.sandboxId;

await sbx.setTimeout(600_000);
const endAt = (await sbx.getInfo()).endAt;
seen.timeoutExtended = new Date(endAt).getTime() - Date.now() > 400_000;

// PTY: a shell in a terminal, typed into, resized, killed.
{
  let out = "";
  const decoder = new TextDecoder();
  const term = await sbx.pty.create({
    cols: 80,
    rows: 24,
    onData: (d) => {
      out += decoder.decode(d);
    },
  });
  await sbx.pty.sendInput(term.pid, new TextEncoder().encode("echo pty-$((6*7))\n"));
  await until("the PTY's echo", () => out.includes("pty-42"));
  await sbx.pty.resize(term.pid, { cols: 100, rows: 30 });
  await sbx.pty.sendInput(term.pid, new TextEncoder().encode("stty size\n"));
  await until("the new size", () => out.includes("30 100"));
  seen.pty = out.includes("pty-42");
  seen.ptySize = out.includes("30 100");
  seen.ptyKilled = await sbx.pty.kill(term.pid);
  try {
    await term.wait();
  } catch (e) {
    expect(e instanceof CommandExitError, `CommandExitError after a PTY kill, not ${e}`);
  }
}

// A port opened in the sandbox, fetched through the SDK's host URL (`<port>-<id>.<domain>`,
// the domain being the one the server answered with). Node does not resolve `*.localhost`
// here, so only the name's lookup is pinned to loopback; the Host is the SDK's.
await sbx.files.write("/tmp/www/index.html", "served from the sandbox");
await sbx.commands.run("busybox httpd -p 8000 -h /tmp/www");
const hostUrl = sbx.getHost(8000);
seen.hostShape = /^8000-sb[0-9a-f]{16}\./.test(hostUrl);
const [hostName, hostPort] = hostUrl.split(":");
seen.hostBody = await new Promise((resolve, reject) => {
  const req = http.get(
    {
      hostname: hostName,
      port: Number(hostPort ?? 80),
      path: "/",
      lookup: (_name, opts, cb) =>
        opts && opts.all ? cb(null, [{ address: "127.0.0.1", family: 4 }]) : cb(null, "127.0.0.1", 4),
    },
    (res) => {
      let body = "";
      res.on("data", (c) => (body += c));
      res.on("end", () => resolve(`${res.statusCode} ${body}`));
    },
  );
  req.on("error", reject);
});

// A background process that survives a pause: listed after resume, its output followed
// through commands.connect.
let survivor;
{
  survivor = await sbx.commands.run(
    "i=0; while true; do i=$((i+1)); echo beat$i; sleep 0.5; done",
    { background: true },
  );
}

// Pause, then resume through connect: the file is still there.
await sbx.commands.run("echo kept > /tmp/e2b/kept.txt");
seen.paused = await sbx.pause();
const pausedList = await Sandbox.list({ query: { state: ["paused"] } }).nextItems();
seen.pausedState = pausedList.filter((s) => s.sandboxId === sbx.sandboxId).map((s) => s.state);
const again = await Sandbox.connect(sbx.sandboxId);
seen.resumedRead = (await again.files.read("/tmp/e2b/kept.txt")).trim();
seen.resumedRun = (await again.commands.run("cat /tmp/e2b/kept.txt")).stdout.trim();

{
  const listedAfter = await again.commands.list();
  seen.survivorListed = listedAfter.some((p) => p.pid === survivor.pid);
  if (seen.survivorListed) {
    let beats = "";
    const followed = await again.commands.connect(survivor.pid, {
      onStdout: (d) => {
        beats += d;
      },
    });
    await until("beats after resume", () => (beats.match(/beat/g) || []).length >= 2);
    seen.survivorBeats = (beats.match(/beat/g) || []).length;
    await followed.kill();
  } else {
    // Lost across the pause: what was listed, and the agent's log (in the sandbox's memory).
    seen.survivorPid = survivor.pid;
    seen.processesAfter = listedAfter.map((p) => [p.pid, p.cmd, p.args]);
    seen.agentLog = (await again.files.read("/dev/.sandpit-agent.log")).slice(-20000);
  }
}

const started = Date.now();
await again.kill();
seen.killSeconds = Math.round((Date.now() - started) / 1000);
try {
  await Sandbox.connect(sbx.sandboxId);
  seen.afterKill = "connected";
} catch (e) {
  seen.afterKill = e instanceof NotFoundError ? "NotFoundError" : `${e.name}: ${e.message}`;
}

// A wrong API key: AuthenticationError, nothing made.
try {
  await Sandbox.create({ apiKey: "spt_not-a-token" });
  seen.badKey = "created";
} catch (e) {
  seen.badKey = e instanceof AuthenticationError ? "AuthenticationError" : `${e.name}: ${e.message}`;
}

console.log(JSON.stringify(seen));
