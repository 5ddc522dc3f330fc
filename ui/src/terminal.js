// A live terminal: xterm.js attached to a terminal the sandbox's agent keeps
// (POST /v1/sandboxes/{id}/terminals, then its attach WebSocket). Binary messages are the
// terminal's bytes both ways; text messages are JSON control (`resize` from here, `exit`
// and `error` from the server).

import { Terminal } from "./vendor/xterm.mjs";
import { FitAddon } from "./vendor/addon-fit.mjs";
import { api, terminalSocket } from "./api.js";

export class LiveTerminal {
  /** `onState(text)` reports what the connection is doing. */
  constructor(container, onState) {
    this.container = container;
    this.onState = onState;
    this.term = null;
    this.ws = null;
  }

  /** Create a terminal in `sandboxId` and attach to it. */
  async open(sandboxId) {
    this.close();
    this.container.replaceChildren();
    const term = new Terminal({
      convertEol: false,
      cursorBlink: true,
      fontSize: 14,
      scrollback: 2000,
      theme: { background: "#10141a" },
    });
    const fit = new FitAddon();
    term.loadAddon(fit);
    term.open(this.container);
    fit.fit();
    this.term = term;
    this.onState("starting…");
    const created = await api("POST", `/v1/sandboxes/${encodeURIComponent(sandboxId)}/terminals`, {
      json: { cols: term.cols, rows: term.rows },
    });
    const ws = terminalSocket(sandboxId, created.id);
    this.ws = ws;
    const encoder = new TextEncoder();
    ws.onopen = () => {
      this.onState(`attached to terminal ${created.id}`);
      term.focus();
    };
    ws.onmessage = (m) => {
      if (typeof m.data !== "string") {
        term.write(new Uint8Array(m.data));
        return;
      }
      const msg = JSON.parse(m.data);
      if (msg.type === "exit") this.onState(`exited with ${msg.exit_code}`);
      else if (msg.type === "error") this.onState(`error: ${msg.message}`);
    };
    ws.onclose = (e) => {
      if (this.ws !== ws) return;
      this.onState(e.code === 1012 ? "detached: the sandbox was suspended (open again to wake it)" : `closed (${e.code})`);
    };
    term.onData((d) => {
      if (ws.readyState === WebSocket.OPEN) ws.send(encoder.encode(d));
    });
    term.onResize(({ cols, rows }) => {
      if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "resize", cols, rows }));
    });
    this.resizeObserver = new ResizeObserver(() => fit.fit());
    this.resizeObserver.observe(this.container);
  }

  close() {
    this.resizeObserver?.disconnect();
    this.resizeObserver = null;
    if (this.ws) {
      const ws = this.ws;
      this.ws = null;
      ws.close();
    }
    this.term?.dispose();
    this.term = null;
  }
}
