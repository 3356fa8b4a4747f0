// The REST API client of the console. The key lives in sessionStorage only (this tab,
// until it closes or the user signs out); it is sent as `Authorization: Bearer`, never in a
// URL. Every answer belongs to the key that asked: a session counter drops answers that
// arrive after a sign-out or a change of key, and nothing is cached (`cache: "no-store"`,
// and the server says `Cache-Control: no-store`).

const KEY = "refinery.key";
let session = 0;
// Bumped by every page change: an answer to a request made for an earlier page is dropped
// (a slow page must not draw over the one the user went to since).
let navigation = 0;

export function newNavigation() {
  navigation += 1;
}

export function currentKey() {
  return sessionStorage.getItem(KEY);
}

export function setKey(key) {
  session += 1;
  if (key) sessionStorage.setItem(KEY, key);
  else sessionStorage.removeItem(KEY);
}

export function sessionId() {
  return session;
}

/// An API refusal, with the server's error JSON (`{"error": {"code", "message", ...}}`).
export class ApiError extends Error {
  constructor(status, body, method, path) {
    const error = (body && body.error) || {};
    super(error.message || (typeof body === "string" && body) || `HTTP ${status}`);
    this.status = status;
    this.code = error.code || null;
    this.detail = error;
    this.method = method;
    this.path = path;
  }

  /// What the refusal means for the person reading the console.
  explain() {
    const d = this.detail;
    switch (this.status) {
      case 0:
        return `The server could not be reached (${this.message}). Is \`refinery serve\` running?`;
      case 401:
        return "This key was not recognised: check that you pasted the whole account key (or the operator key from the server's operator.key).";
      case 402:
        return `Spending cap reached: this account has spent its cap for the month, so nothing more runs until the operator raises the cap or the month ends. ${this.message}`;
      case 403:
        if (this.code === "account_disabled") return `This account is disabled: the operator must enable it again. ${this.message}`;
        return `Not allowed for this key: ${this.message}`;
      case 404:
        return `Not found: ${this.message}`;
      case 413:
        return `Too large: ${this.message}`;
      case 429: {
        const limit = d.limit ? ` (limit: ${d.limit})` : "";
        const retry = d.retry_after_s != null ? ` Try again in ${d.retry_after_s} s.` : "";
        return `Throttled${limit}: the request was refused before anything ran.${retry} ${this.message}`;
      }
      case 503:
        return `The server is refusing new work for now${d.retry_after_s != null ? ` (retry in ${d.retry_after_s} s)` : ""}: ${this.message}`;
      default:
        return `${this.method} ${this.path} failed (HTTP ${this.status}${this.code ? ", " + this.code : ""}): ${this.message}`;
    }
  }
}

/// Thrown when the key or the page changed while a request was in flight: its answer is
/// dropped.
export class Stale extends Error {}

async function send(method, path, body, raw) {
  const key = currentKey();
  const mine = session;
  const page = navigation;
  const headers = {};
  if (key) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
      credentials: "omit",
    });
  } catch (e) {
    throw new ApiError(0, String(e), method, path);
  }
  if (mine !== session) throw new Stale("the key changed");
  if (page !== navigation) throw new Stale("the page changed");
  if (raw && response.ok) return response;
  const text = await response.text();
  if (mine !== session) throw new Stale("the key changed");
  if (page !== navigation) throw new Stale("the page changed");
  let parsed = text;
  try {
    parsed = text ? JSON.parse(text) : null;
  } catch (_) {
    /* not JSON: keep the text */
  }
  if (!response.ok) throw new ApiError(response.status, parsed, method, path);
  return parsed;
}

export const api = {
  get: (path) => send("GET", path),
  post: (path, body) => send("POST", path, body === undefined ? {} : body),
  put: (path, body) => send("PUT", path, body),
  raw: (path) => send("GET", path, undefined, true),
};

export const enc = encodeURIComponent;
