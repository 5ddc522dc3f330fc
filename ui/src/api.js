// The console's only way to the server: the /v1 API with the signed-in token in an
// `Authorization: Bearer` header (fetch), a fetch-read Server-Sent Events stream (an
// EventSource cannot send headers), and the terminal WebSocket, whose token travels as the
// `bearer.<token>` subprotocol (a browser cannot set headers there either). The token is
// never put in a URL.

const KEY = "sandpit.token";

export function token() {
  return sessionStorage.getItem(KEY);
}

export function setToken(t) {
  if (t) sessionStorage.setItem(KEY, t);
  else sessionStorage.removeItem(KEY);
}

/** An API error: HTTP status, the body's machine-readable `code` and its message. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(`${message} (${status} ${code})`);
    this.status = status;
    this.code = code;
  }
}

function headers(extra = {}) {
  return { Authorization: `Bearer ${token()}`, ...extra };
}

async function failure(resp) {
  let code = "http_error";
  let message = resp.statusText;
  try {
    const body = await resp.json();
    code = body.error?.code ?? code;
    message = body.error?.message ?? message;
  } catch {
    // Not a JSON error body: keep the status text.
  }
  return new ApiError(resp.status, code, message);
}

/**
 * Call the API. `json` is sent as a JSON body, `body` as is (a File or Blob uploads as
 * application/octet-stream). Answers the parsed JSON, or the Response with `raw`, or null
 * for 204.
 */
export async function api(method, path, { json, body, raw, signal } = {}) {
  const init = { method, headers: headers(), signal };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (body !== undefined) {
    init.headers["Content-Type"] = "application/octet-stream";
    init.body = body;
  }
  const resp = await fetch(path, init);
  if (!resp.ok) throw await failure(resp);
  if (raw) return resp;
  if (resp.status === 204) return null;
  return resp.json();
}

/** A query string from an object, leaving out undefined values. */
export function qs(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== "") q.set(k, v);
  const s = q.toString();
  return s ? `?${s}` : "";
}

/**
 * Read a Server-Sent Events stream: `onEvent({event, data, id})` for each event until the
 * stream ends or `signal` aborts. Resolves when the stream ends.
 */
export async function sse(path, onEvent, { signal, lastEventId } = {}) {
  const h = headers({ Accept: "text/event-stream" });
  if (lastEventId) h["Last-Event-ID"] = lastEventId;
  const resp = await fetch(path, { headers: h, signal });
  if (!resp.ok) throw await failure(resp);
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, end);
      buf = buf.slice(end + 2);
      const ev = { event: "message", data: "", id: undefined };
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue;
        const i = line.indexOf(":");
        const field = i < 0 ? line : line.slice(0, i);
        const val = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
        if (field === "event") ev.event = val;
        else if (field === "data") data.push(val);
        else if (field === "id") ev.id = val;
      }
      if (data.length === 0) continue;
      ev.data = data.join("\n");
      onEvent(ev);
    }
  }
}

/** The terminal WebSocket, authenticated by the `bearer.<token>` subprotocol. */
export function terminalSocket(sandboxId, terminalId) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const path = `/v1/sandboxes/${encodeURIComponent(sandboxId)}/terminals/${encodeURIComponent(terminalId)}/attach`;
  const ws = new WebSocket(`${scheme}//${location.host}${path}`, ["sandpit.v1", `bearer.${token()}`]);
  ws.binaryType = "arraybuffer";
  return ws;
}
