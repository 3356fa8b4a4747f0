// Refinery's Node.js runtime shim.
//
// Runs inside a sandboxed instance as
//     node node_shim.cjs /code/<source>
// or, started ahead of time in a standby sandbox, as `node node_shim.cjs --standby` (see
// adopt() below).
// Loads the block's module once (require() for CommonJS, import() for ES modules), then serves
// invocations one at a time over the framed protocol: requests on fd 3, responses on fd 4,
// each frame a 4-byte big-endian length followed by UTF-8 JSON. Requests are read
// synchronously between invocations, so nothing of the block runs while the instance
// waits. After an init_error it exits.
//
// Installed by refinery-runtimes; the bounds below are filled in at install time.

'use strict';
// CommonJS on purpose: an ES-module entry point costs Node about 10 ms more at start-up (the
// ESM loader), paid by every cold start; blocks written as ES modules still load, by import().
const fs = require('node:fs');
const path = require('node:path');
const { spawnSync } = require('node:child_process');
const { pathToFileURL } = require('node:url');
const { performance } = require('node:perf_hooks');

const REQUESTS_FD = 3;
const RESPONSES_FD = 4;
const MAX_FRAME_BYTES = __MAX_FRAME_BYTES__;
const LOG_CAP_BYTES = __LOG_CAP_BYTES__;
const MAX_JSON_DEPTH = __MAX_JSON_DEPTH__;

// ------------------------------------------------------------------ framing

const sleeper = new Int32Array(new SharedArrayBuffer(4));

/** Reads exactly n bytes from the requests pipe; null on EOF. */
function readExact(n) {
  const buf = Buffer.allocUnsafe(n);
  let off = 0;
  while (off < n) {
    let got;
    try {
      got = fs.readSync(REQUESTS_FD, buf, off, n - off, null);
    } catch (err) {
      if (err.code === 'EAGAIN') {
        // The pipe was handed to us non-blocking: wait a little instead of spinning.
        Atomics.wait(sleeper, 0, 0, 2);
        continue;
      }
      if (err.code === 'EINTR') continue;
      throw err;
    }
    if (got === 0) return null;
    off += got;
  }
  return buf;
}

function readMessage() {
  const header = readExact(4);
  if (header === null) return null;
  const length = header.readUInt32BE(0);
  if (length > MAX_FRAME_BYTES) {
    throw new Error(`request frame of ${length} bytes exceeds ${MAX_FRAME_BYTES}`);
  }
  const body = readExact(length);
  if (body === null) return null;
  return JSON.parse(body.toString('utf8'));
}

function writeFrame(text) {
  const body = Buffer.from(text, 'utf8');
  const frame = Buffer.allocUnsafe(4 + body.length);
  frame.writeUInt32BE(body.length, 0);
  body.copy(frame, 4);
  let off = 0;
  while (off < frame.length) {
    try {
      off += fs.writeSync(RESPONSES_FD, frame, off, frame.length - off);
    } catch (err) {
      if (err.code === 'EAGAIN') {
        Atomics.wait(sleeper, 0, 0, 2);
        continue;
      }
      throw err;
    }
  }
  return body.length;
}

/**
 * How deeply a JSON text nests arrays and objects (0 for a scalar; brackets inside strings
 * do not count), as the host measures it — exactly when that is past MAX_JSON_DEPTH. A text
 * with at most MAX_JSON_DEPTH brackets is not scanned: its bracket count (a bound of its
 * depth) is returned.
 */
function jsonDepth(text) {
  let brackets = 0;
  for (const open of ['[', '{']) {
    for (let at = text.indexOf(open); at !== -1; at = text.indexOf(open, at + 1)) {
      if (++brackets > MAX_JSON_DEPTH) break;
    }
  }
  if (brackets <= MAX_JSON_DEPTH) return brackets;
  let depth = 0;
  let deepest = 0;
  let inString = false;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (inString) {
      if (c === 92) i++; // backslash: skip the escaped character
      else if (c === 34) inString = false;
    } else if (c === 34) inString = true;
    else if (c === 91 || c === 123) {
      if (++depth > deepest) deepest = depth;
    } else if (c === 93 || c === 125) depth--;
  }
  return deepest;
}

/** depth undefined: too deep for JSON.stringify itself to measure. */
function tooDeepError(what, depth) {
  const nested = depth === undefined ? 'too deeply to encode' : `${depth} levels deep`;
  return {
    type: 'OutputTooDeep',
    message:
      `${what} is nested ${nested}; the limit is ${MAX_JSON_DEPTH} ` +
      'levels of nested arrays and objects: return a flatter value',
    traceback: null,
  };
}

// ------------------------------------------------------------------ errors

/**
 * Drops the platform's lines from an error text: this shim's frames, Node's own
 * (`node:internal/...`) and the shim in a `Require stack:` list. The author's stack ends at
 * their handler; the error's first line (type and message) is kept as it was.
 */
function withoutPlatformLines(text) {
  return text
    .split('\n')
    .filter((line) => {
      const trimmed = line.trimStart();
      if (trimmed.startsWith('at ')) {
        return !line.includes(__filename) && !/[( ]node:internal\//.test(line);
      }
      return trimmed !== `- ${__filename}`;
    })
    .join('\n');
}

function errorOf(value) {
  if (value instanceof Error || (value !== null && typeof value === 'object' && 'stack' in value)) {
    let type = 'Error';
    try {
      type = value.name || value.constructor?.name || 'Error';
    } catch {}
    let message = '';
    try {
      message = withoutPlatformLines(String(value.message ?? ''));
    } catch {}
    let stack = null;
    try {
      stack = typeof value.stack === 'string' ? withoutPlatformLines(value.stack) : null;
    } catch {}
    return { type: String(type), message, traceback: stack };
  }
  let message;
  try {
    message = String(value);
  } catch {
    message = Object.prototype.toString.call(value);
  }
  return { type: 'Error', message, traceback: null };
}

/**
 * A syntax error's message gains the file and line. CommonJS syntax errors carry them at
 * the top of their stack; ES module ones loaded with import() do not, so the file is
 * re-parsed with `node --check`, which prints them (only on this failure path).
 */
function initErrorOf(value, file) {
  const error = errorOf(value);
  if (!(value instanceof SyntaxError)) return error;
  const stack = typeof value.stack === 'string' ? value.stack : '';
  let report = stack.startsWith('/') || stack.startsWith('file://') ? stack : null;
  if (report === null) {
    try {
      const checked = spawnSync(process.execPath, ['--check', file], {
        encoding: 'utf8',
        stdio: ['ignore', 'ignore', 'pipe'],
        timeout: 10000,
      });
      if (checked.status !== 0 && typeof checked.stderr === 'string') {
        report = checked.stderr;
      }
    } catch {}
  }
  if (report !== null && (report.startsWith('/') || report.startsWith('file://'))) {
    const where = report.split('\n', 1)[0].replace(/^file:\/\//, '');
    error.message = `${error.message} (${where})`;
    // Keep the location, the source line and the caret; drop node's internal frames.
    error.traceback = report
      .split('\n')
      .filter((line) => !/^\s+at .*node:internal/.test(line) && !/^Node\.js v/.test(line))
      .join('\n')
      .trim();
  }
  return error;
}

// ------------------------------------------------------------------ log capture

const realStdoutWrite = process.stdout.write;
const realStderrWrite = process.stderr.write;

/** Routes process.stdout/stderr writes (and so console.*) into one buffer, in order. */
class Capture {
  start() {
    this.chunks = [];
    this.bytes = 0;
    this.truncated = false;
    const capture = (chunk, encoding, callback) => {
      if (typeof encoding === 'function') {
        callback = encoding;
        encoding = undefined;
      }
      const buf = Buffer.isBuffer(chunk) || chunk instanceof Uint8Array
        ? Buffer.from(chunk)
        : Buffer.from(String(chunk), typeof encoding === 'string' ? encoding : 'utf8');
      const room = LOG_CAP_BYTES - this.bytes;
      if (buf.length > room) this.truncated = true;
      if (room > 0) {
        const kept = buf.length > room ? buf.subarray(0, room) : buf;
        this.chunks.push(kept);
        this.bytes += kept.length;
      }
      if (typeof callback === 'function') process.nextTick(callback);
      return true;
    };
    process.stdout.write = capture;
    process.stderr.write = capture;
  }

  stop() {
    process.stdout.write = realStdoutWrite;
    process.stderr.write = realStderrWrite;
    // A cut multi-byte character decodes to U+FFFD; the host re-checks the byte bound.
    let logs = Buffer.concat(this.chunks).toString('utf8');
    if (this.truncated) {
      while (Buffer.byteLength(logs, 'utf8') > LOG_CAP_BYTES) logs = logs.slice(0, -1);
    }
    return { logs, truncated: this.truncated };
  }
}

// ------------------------------------------------------------------ loading

class HandlerNotFound extends Error {
  constructor(message) {
    super(message);
    this.name = 'HandlerNotFound';
  }
}

/** CommonJS through require() (no ES-module loader at all); an ES module (`.mjs`, or `.js`
 *  under a `"type": "module"` package.json) is refused by require() and loaded by import(). */
async function importOrRequire(file) {
  if (!file.endsWith('.mjs')) {
    try {
      return require(file);
    } catch (err) {
      if (err?.code !== 'ERR_REQUIRE_ESM' && err?.code !== 'ERR_REQUIRE_ASYNC_MODULE') throw err;
    }
  }
  return import(pathToFileURL(file).href);
}

/** The project shared directories the block lists are `/shared/<name>`: `/shared` goes on
 *  CommonJS's global search path (NODE_PATH), so `require("common/util")` finds
 *  `/shared/common/util.js`. ES modules import them by path. */
function addSharedToSearchPath() {
  let listed;
  try {
    listed = fs.readdirSync('/shared');
  } catch {
    return; // the block lists none
  }
  if (listed.length === 0) return;
  const current = process.env.NODE_PATH;
  process.env.NODE_PATH = current ? `${current}${path.delimiter}/shared` : '/shared';
  require('node:module')._initPaths();
}

async function load(file, fn = 'main') {
  addSharedToSearchPath();
  const mod = await importOrRequire(file);
  if (fn === 'main' && typeof mod === 'function') return mod; // module.exports = function
  if (typeof mod?.[fn] === 'function') return mod[fn];
  const dflt = mod?.default;
  if (fn === 'main' && typeof dflt === 'function') return dflt;
  if (dflt !== null && typeof dflt === 'object' && typeof dflt[fn] === 'function') {
    return (input, backpack) => dflt[fn](input, backpack);
  }
  throw new HandlerNotFound(
    fn === 'main'
      ? `${path.basename(file)} must define main(blockInput, backpack) ` +
          '(export function main, export default, or module.exports.main)'
      : `${path.basename(file)} must define ${fn}(blockInput, backpack) ` +
          `(export function ${fn}, or module.exports.${fn})`,
  );
}

// ------------------------------------------------------------------ stragglers

/**
 * No process the block started outlives its invocation (its Workers, threads of this process,
 * do, frozen, into the next warm invocation, as on Lambda): SIGKILL every process this one may
 * signal (in the sandbox: every process of the instance but this shim and pid 1, the
 * sandbox's reaper, which collects the orphans; libuv reaps the shim's own child_process
 * children). Only inside the sandbox, where the shim is pid 2 under the reaper (or pid 1):
 * on a host, pids 1 and 2 are init and kthreadd, so a shim run outside a sandbox never kills
 * anything.
 */
function killStragglers() {
  if (process.pid > 2) return;
  try {
    process.kill(-1, 'SIGKILL');
  } catch {}
}

// ------------------------------------------------------------------ serving

function encodeTail(id, logs, truncated) {
  return `,"id":${JSON.stringify(id ?? null)},"logs":${JSON.stringify(logs)},"logs_truncated":${truncated}}`;
}

// A step's run context as environment variables: [variable, key in the frame's context].
const CONTEXT_VARS = [
  ['REFINERY_RUN_ID', 'run_id'],
  ['REFINERY_STEP_ID', 'step_id'],
  ['REFINERY_ATTEMPT', 'attempt'],
];

/**
 * A step of a service run: its run id, step id and attempt in process.env for that
 * invocation (child processes inherit it). An invocation without a context (a plain invoke)
 * sees none of them left from an earlier invocation of this warm instance; while none was set
 * since the last clearing that costs one boolean test.
 */
class RunContextVars {
  constructor() {
    this.set = false;
  }

  apply(context) {
    const env = process.env;
    if (context === null || context === undefined) {
      if (this.set) {
        for (const [name] of CONTEXT_VARS) delete env[name];
        this.set = false;
      }
      return;
    }
    this.set = true;
    for (const [name, key] of CONTEXT_VARS) env[name] = String(context[key]);
  }
}

async function invoke(handler, capture, contextVars, request) {
  const backpack =
    request.backpack !== null && typeof request.backpack === 'object' ? request.backpack : {};
  let outcome = null;
  let output;
  let captured;
  capture.start();
  try {
    contextVars.apply(request.context);
    output = await handler(request.input ?? null, backpack);
  } catch (err) {
    outcome = errorOf(err);
  } finally {
    captured = capture.stop();
  }
  const { logs, truncated } = captured;
  let body = null;
  if (outcome === null) {
    let what = 'the output';
    try {
      const outputJson = JSON.stringify(output) ?? 'null';
      what = 'the backpack';
      const backpackJson = JSON.stringify(backpack) ?? '{}';
      const outputDepth = jsonDepth(outputJson);
      const backpackDepth = jsonDepth(backpackJson);
      if (outputDepth > MAX_JSON_DEPTH) {
        outcome = tooDeepError('the output', outputDepth);
      } else if (backpackDepth > MAX_JSON_DEPTH) {
        outcome = tooDeepError('the backpack', backpackDepth);
      } else {
        body = `{"type":"result","output":${outputJson},"backpack":${backpackJson}`;
      }
    } catch (err) {
      if (err instanceof RangeError) {
        // Too deep for V8's stack, far past the limit: the same error as a measured one.
        outcome = tooDeepError(what);
      } else {
        outcome = {
          type: 'TypeError',
          message:
            what === 'the backpack'
              ? `the backpack is not JSON-serialisable: ${err.message}`
              : `main returned a value that is not JSON-serialisable: ${err.message}`,
          traceback: null,
        };
      }
    }
  }
  const tail = encodeTail(request.id, logs, truncated);
  if (body !== null) {
    const text = body + tail;
    if (Buffer.byteLength(text, 'utf8') <= MAX_FRAME_BYTES) return text;
    outcome = {
      type: 'OutputTooLarge',
      message: `output and backpack together exceed ${MAX_FRAME_BYTES} bytes`,
      traceback: null,
    };
  }
  return `{"type":"error","error":${JSON.stringify(outcome)}${tail}`;
}

/**
 * Standby mode (`node node_shim.cjs --standby`): the sandbox was started before any block
 * was assigned to it, with this shim loaded and no code. It tells the host it is waiting,
 * then the host's one adoption frame says what it now is: the complete environment,
 * replacing this one, and the shim's arguments. Returns those arguments, or null if the host
 * closed the pipe first.
 */
function adopt() {
  writeFrame(JSON.stringify({ type: 'standby' }));
  const frame = readMessage();
  if (frame === null) return null;
  if (
    frame?.type !== 'adopt' ||
    !Array.isArray(frame.env) ||
    !Array.isArray(frame.args) ||
    !frame.args.every((a) => typeof a === 'string')
  ) {
    throw new Error('expected an adopt frame');
  }
  for (const key of Object.keys(process.env)) delete process.env[key];
  for (const [key, value] of frame.env) process.env[key] = value;
  process.argv = [process.argv[0], __filename, ...frame.args];
  return frame.args;
}

async function main() {
  let args = process.argv.slice(2);
  if (args.length === 1 && args[0] === '--standby') {
    args = adopt();
    if (args === null) return 0;
  }
  if (args.length !== 1 && args.length !== 3) {
    process.stderr.write('usage: node node_shim.cjs /code/<source> [FUNCTION CODE_DIR] | --standby\n');
    return 2;
  }
  return serve(args[0], args.length === 3 ? args[1] : 'main');
}

async function serve(file, fn) {
  const started = performance.now();
  const resolved = path.resolve(file);
  let handler;
  try {
    handler = await load(resolved, fn);
  } catch (err) {
    writeFrame(JSON.stringify({ type: 'init_error', error: initErrorOf(err, resolved) }));
    return 1;
  }
  const initMs = performance.now() - started;
  writeFrame(JSON.stringify({ type: 'ready', init_ms: initMs }));

  const capture = new Capture();
  const contextVars = new RunContextVars();
  for (;;) {
    let request;
    try {
      request = readMessage();
    } catch (err) {
      process.stderr.write(`refinery node shim: ${err.message}\n`);
      return 1;
    }
    if (request === null) return 0;
    if (typeof request !== 'object' || request.type !== 'invoke') {
      process.stderr.write('refinery node shim: expected an invoke frame\n');
      return 1;
    }
    const reply = await invoke(handler, capture, contextVars, request);
    killStragglers();
    writeFrame(reply);
  }
}

// Exit explicitly: timers or sockets the block left open must not keep a finished
// instance alive, and the host's closing of the pipe is the signal to stop.
main().then(
  (code) => process.exit(code),
  (err) => {
    process.stderr.write(`refinery node shim: ${err?.stack ?? err}\n`);
    process.exit(1);
  },
);
