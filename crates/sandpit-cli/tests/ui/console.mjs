// Drives the web console (/ui/) in Debian's Chromium, headless, through playwright-core (no
// browser download): sign in, create a sandbox, type in its terminal and read the output,
// upload a file and see it listed (and download it back), open a preview link of an HTTP
// server started in the sandbox, build a template and watch its log, destroy the sandbox.
// Prints one JSON line of what it saw; tests/it/console.rs checks it. Screenshots go to
// SANDPIT_SCREENSHOTS.
//
// Environment: SANDPIT_URL, SANDPIT_TOKEN, SANDPIT_MARKER (random, lower case),
// SANDPIT_SCREENSHOTS, and optionally SANDPIT_CHROMIUM (default /usr/bin/chromium).

import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const url = process.env.SANDPIT_URL;
const token = process.env.SANDPIT_TOKEN;
const marker = process.env.SANDPIT_MARKER;
const shots = process.env.SANDPIT_SCREENSHOTS;
const step = (s) => console.error(`[console.mjs] ${s}`);

const profile = mkdtempSync(join(tmpdir(), "sandpit-chromium-"));
// A fresh profile directory (the persistent context is how playwright takes one).
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.SANDPIT_CHROMIUM || "/usr/bin/chromium",
  headless: true,
  // This machine's network is closed: nothing of Chromium's own may go out.
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    // Preview hosts (<id>-<port>.localhost) reach the server's loopback address.
    "--host-resolver-rules=MAP *.localhost 127.0.0.1",
  ],
  viewport: { width: 1360, height: 1000 },
  acceptDownloads: true,
});

const seen = { cspViolations: [], pageErrors: [], tokenInUrl: [] };
try {
  context.setDefaultTimeout(90_000);
  context.on("request", (r) => {
    if (r.url().includes(token)) seen.tokenInUrl.push(r.url());
  });
  const page = await context.newPage();
  page.on("console", (m) => {
    step(`page console ${m.type()}: ${m.text()}`);
    if (m.text().includes("Content Security Policy")) seen.cspViolations.push(m.text());
  });
  page.on("pageerror", (e) => {
    step(`page error: ${e}`);
    seen.pageErrors.push(String(e));
  });
  const shot = (name) => page.screenshot({ path: join(shots, `${name}.png`), fullPage: true });

  step("sign in");
  await page.goto(`${url}/ui/`);
  await page.locator("#sign-in-view").waitFor({ state: "visible", timeout: 15_000 });
  // A wrong token is refused on the sign-in form and not kept.
  await page.locator("#token").fill("sp_not_a_token");
  await page.locator("#sign-in button[type=submit]").click();
  await page.locator("#sign-in-error", { hasText: "401" }).waitFor();
  seen.badTokenKept = await page.evaluate(() => sessionStorage.length);
  await page.locator("#token").fill(token);
  await shot("01-sign-in");
  await page.locator("#sign-in button[type=submit]").click();
  await page.locator("#console-view").waitFor({ state: "visible" });
  seen.workspace = await page.locator("#workspace").textContent();

  step("create a sandbox");
  await page.locator("#create-template option[value=base]").waitFor({ state: "attached" });
  await page.locator("#create-template").selectOption("base");
  await page.locator("#create button[type=submit]").click();
  await page.locator("#sb-status", { hasText: "running" }).waitFor();
  const id = (await page.locator("#sb-id").textContent()).trim();
  seen.id = id;
  await page.locator(`#sandboxes li[data-id="${id}"][data-status=running]`).waitFor();
  seen.listed = true;

  step("live list and filter");
  // A sandbox made elsewhere (the API) appears without a reload, and goes when destroyed.
  const api = (method, path, body) =>
    fetch(`${url}${path}`, {
      method,
      headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" },
      body: body && JSON.stringify(body),
    });
  const other = await (await api("POST", "/v1/sandboxes", { template: "base", metadata: { made: "elsewhere" } })).json();
  await page.locator(`#sandboxes li[data-id="${other.id}"]`).waitFor({ timeout: 15_000 });
  seen.otherAppeared = true;
  await page.locator("#filter").fill("elsewhere");
  await page.locator(`#sandboxes li[data-id="${id}"]`).waitFor({ state: "detached" });
  seen.filterHides = (await page.locator(`#sandboxes li[data-id="${other.id}"]`).count()) === 1;
  await page.locator("#filter").fill("");
  seen.otherDestroyStatus = (await api("DELETE", `/v1/sandboxes/${other.id}`)).status;
  await page.locator(`#sandboxes li[data-id="${other.id}"]`).waitFor({ state: "detached", timeout: 15_000 });
  seen.otherGone = true;

  step("terminal");
  await page.locator("#term-open").click();
  await page.locator("#term-state", { hasText: "attached" }).waitFor();
  await page.locator("#terminal .xterm").click();
  // The shell computes the number, so finding it proves output, not the echo of input.
  await page.keyboard.type(`echo ${marker}-$((1200+34))\n`);
  const expected = `${marker}-1234`;
  await page.waitForFunction(
    (want) => document.querySelector("#terminal .xterm-rows")?.textContent.includes(want),
    expected,
  );
  seen.terminalOutput = expected;

  step("upload a file");
  const name = `${marker}.txt`;
  const content = `uploaded from the console ${marker}\n`;
  await page.locator("#upload-file").setInputFiles({ name, mimeType: "text/plain", buffer: Buffer.from(content) });
  await page.locator("#upload").click();
  await page.locator(`#files tr[data-name="${name}"]`).waitFor();
  seen.uploaded = name;
  seen.listedSize = (await page.locator(`#files tr[data-name="${name}"] td.num`).textContent()).trim();
  const [download] = await Promise.all([
    page.waitForEvent("download"),
    page.locator(`#files tr[data-name="${name}"] button`).click(),
  ]);
  const chunks = [];
  for await (const c of await download.createReadStream()) chunks.push(c);
  seen.downloaded = Buffer.concat(chunks).toString();
  seen.downloadName = download.suggestedFilename();
  await shot("02-sandbox");

  step("preview");
  // A small HTTP server in the sandbox, started through the API.
  const exec = await fetch(`${url}/v1/sandboxes/${id}/exec`, {
    method: "POST",
    headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" },
    body: JSON.stringify({
      command: `mkdir -p /tmp/www && echo preview-${marker} > /tmp/www/index.html && httpd -p 8080 -h /tmp/www`,
      timeout: "30s",
    }),
  });
  seen.execStatus = exec.status;
  const wait = await fetch(`${url}/v1/sandboxes/${id}/ports/8080/wait`, {
    headers: { Authorization: `Bearer ${token}` },
  });
  seen.portWaitStatus = wait.status;
  await page.locator("#ports-refresh").click();
  await page.locator('#ports li[data-port="8080"] button').click();
  const link = page.locator('#ports li[data-port="8080"] a.preview');
  await link.waitFor();
  const href = await link.getAttribute("href");
  seen.previewHost = new URL(href).hostname;
  const preview = await context.newPage();
  await preview.goto(href);
  seen.previewBody = (await preview.locator("body").textContent()).trim();
  // The query token was traded for a cookie: the address bar no longer shows it.
  seen.previewUrlHasToken = preview.url().includes("preview_token");
  await preview.screenshot({ path: join(shots, "03-preview.png") });
  await preview.close();
  await shot("04-previews");

  step("template build");
  await page.locator('.tabs button[data-tab="templates"]').click();
  const template = `console-${marker}`;
  await page.locator("#build-name").fill(template);
  await page.locator("#build-dockerfile").fill(`FROM base\nRUN echo build-$((6*7))-${marker}\n`);
  await page.locator("#build button[type=submit]").click();
  // The step's output (the shell computed 42), then the end of the build.
  await page.locator("#build-log", { hasText: `build-42-${marker}` }).waitFor({ timeout: 150_000 });
  seen.buildLogOutput = true;
  await page.locator("#build-state[data-status=ready], #build-state[data-status=failed]").waitFor({ timeout: 150_000 });
  seen.buildStatus = await page.locator("#build-state").getAttribute("data-status");
  await page.locator(`#templates td`, { hasText: template }).first().waitFor();
  seen.buildListed = true;
  await shot("05-build");

  step("usage");
  // Only this test's first sandbox runs by now.
  await page.locator("#usage tr[data-key=running] td.num", { hasText: /^1 \// }).waitFor({ timeout: 15_000 });
  seen.usageRunning = (await page.locator("#usage tr[data-key=running] td.num").textContent()).trim();
  seen.chartLines = await page.locator("#usage-chart polyline").count();

  step("destroy");
  await page.locator('.tabs button[data-tab="sandbox"]').click();
  await shot("06-console");
  page.once("dialog", (d) => d.accept());
  await page.locator("#sb-destroy").click();
  await page.locator("#sb-status", { hasText: "destroyed" }).waitFor();
  await page.locator(`#sandboxes li[data-id="${id}"]`).waitFor({ state: "detached" });
  seen.destroyed = true;

  step("sign out");
  await page.locator("#sign-out").click();
  await page.locator("#sign-in-view").waitFor({ state: "visible" });
  seen.tokenKept = await page.evaluate(() => sessionStorage.length);
} catch (e) {
  // What was seen so far, and the page as it was, for the failure message.
  step(`failed; seen so far: ${JSON.stringify(seen)}`);
  await context.pages()[0]?.screenshot({ path: join(shots, "failure.png"), fullPage: true }).catch(() => {});
  throw e;
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
console.log(JSON.stringify(seen));
