"""Refinery's Python runtime shim.

Runs inside a sandboxed instance as
    python3 -I -B python_shim.py /code/<source>
(or forked from the zygote with that sys.argv), or, started ahead of time in a standby
sandbox, as `python3 -I -B python_shim.py --standby` (see adopt() below).
Loads the block's module once, then serves invocations one at a time over the framed
protocol: requests on fd 3, responses on fd 4, each frame a 4-byte big-endian length
followed by UTF-8 JSON. After an init_error it exits.

Installed by refinery-runtimes; the bounds below are filled in at install time.
"""

import importlib.util
import io
import json
import os
import struct
import sys
import time
import traceback

REQUESTS_FD = 3
RESPONSES_FD = 4
MAX_FRAME_BYTES = __MAX_FRAME_BYTES__
LOG_CAP_BYTES = __LOG_CAP_BYTES__
MAX_JSON_DEPTH = __MAX_JSON_DEPTH__

SHIM_FILE = os.path.abspath(__file__)
# asyncio is imported only when a handler is async: it costs ~10 ms and ~1 MiB per instance.
ASYNCIO_DIR = os.path.join(os.path.dirname(os.path.abspath(os.__file__)), "asyncio") + os.sep


class ProtocolError(Exception):
    pass


class LazyLoop:
    """One event loop for the instance's life, created by the first async handler call."""

    def __init__(self):
        self.loop = None

    def run_until_complete(self, awaitable):
        if self.loop is None:
            import asyncio

            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
        return self.loop.run_until_complete(awaitable)


# ---------------------------------------------------------------- framing


def read_exact(n):
    chunks = []
    remaining = n
    while remaining:
        chunk = os.read(REQUESTS_FD, min(remaining, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def read_message():
    """The next request, or None when the host closed the pipe."""
    header = read_exact(4)
    if header is None:
        return None
    (length,) = struct.unpack(">I", header)
    if length > MAX_FRAME_BYTES:
        raise ProtocolError(f"request frame of {length} bytes exceeds {MAX_FRAME_BYTES}")
    body = read_exact(length)
    if body is None:
        return None
    return json.loads(body.decode("utf-8"))


def write_frame(body):
    data = struct.pack(">I", len(body)) + body
    view = memoryview(data)
    while view:
        written = os.write(RESPONSES_FD, view)
        view = view[written:]


def encode(value):
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


CONTAINERS = (dict, list, tuple)
# bytes.translate tables: brackets and quotes kept ({} as []), every other byte dropped.
BRACKETS = bytes.maketrans(b"{}", b"[]")
NOT_BRACKETS = bytes(c for c in range(256) if c not in b'[]{}"')


def depth_of(value):
    """How deeply a JSON-encodable value nests arrays and objects (0 for a scalar): what
    json.dumps writes for it, since only dicts, lists and tuples become arrays/objects."""
    level = [value] if isinstance(value, CONTAINERS) else []
    depth = 0
    while level:
        depth += 1
        level = [
            child
            for node in level
            for child in (node.values() if isinstance(node, dict) else node)
            if isinstance(child, CONTAINERS)
        ]
    return depth


def text_depth(text):
    """The nesting depth of JSON text `text` from its brackets alone, at C speed, or None
    when a string in it holds a bracket (then only depth_of() can tell)."""
    data = text.encode("utf-8")
    if b"\\" in data:
        # Escapes out of the way: every quote left delimits a string.
        data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    # Quotes and brackets only; a bracket-free string is an adjacent pair of quotes. Any
    # quote left means some string held a bracket.
    data = data.translate(BRACKETS, NOT_BRACKETS).replace(b'""', b"")
    if b'"' in data:
        return None
    depth = 0
    while data:
        # Each round removes the innermost arrays: as many rounds as levels.
        shorter = data.replace(b"[]", b"")
        if len(shorter) == len(data):
            return None
        data = shorter
        depth += 1
    return depth


def too_deep(value, text):
    """The depth of a value nested deeper than the host accepts, or None. A text with at
    most MAX_JSON_DEPTH brackets cannot be deeper, so most outputs cost two counts."""
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return None
    depth = text_depth(text)
    if depth is None:
        depth = depth_of(value)
    return depth if depth > MAX_JSON_DEPTH else None


def too_deep_error(what, depth=None):
    """depth None: too deep for the encoder itself to measure."""
    nested = "too deeply to encode" if depth is None else f"{depth} levels deep"
    return {
        "type": "OutputTooDeep",
        "message": f"{what} is nested {nested}; the limit is {MAX_JSON_DEPTH} "
        "levels of nested arrays and objects: return a flatter value",
        "traceback": None,
    }


# ---------------------------------------------------------------- errors


def is_internal(filename):
    return (
        filename == SHIM_FILE
        or filename.startswith("<frozen importlib")
        or filename.startswith(ASYNCIO_DIR)
    )


def strip_internal(te, seen):
    """Drops the shim's, importlib's and asyncio's frames from a TracebackException chain."""
    while te is not None and id(te) not in seen:
        seen.add(id(te))
        te.stack = traceback.StackSummary.from_list(
            [f for f in te.stack if not is_internal(f.filename)]
        )
        if te.__context__ is not None and te.__context__ is not te.__cause__:
            strip_internal(te.__context__, seen)
        te = te.__cause__


def error_of(exc):
    te = traceback.TracebackException(type(exc), exc, exc.__traceback__)
    strip_internal(te, set())
    try:
        message = str(exc)
    except BaseException:  # noqa: BLE001 - a broken __str__ must not kill the instance
        message = f"<unprintable {type(exc).__name__}>"
    return {
        "type": type(exc).__name__,
        "message": message,
        "traceback": "".join(te.format()),
    }


# ---------------------------------------------------------------- log capture


def unbuffered_stdio():
    """Like `python -u`: print() output reaches fd 1 at once, so it interleaves with
    stderr and subprocess output in the order it was produced."""
    for fd, name in ((1, "stdout"), (2, "stderr")):
        stream = io.TextIOWrapper(
            io.FileIO(fd, "w", closefd=False),
            encoding="utf-8",
            errors="backslashreplace",
            write_through=True,
        )
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)


class Capture:
    """Points fds 1 and 2 at one memfd for the duration of an invocation, so output from
    print(), C extensions and subprocesses is all captured, in order."""

    def __init__(self):
        self.saved_out = os.dup(1)
        self.saved_err = os.dup(2)

    @staticmethod
    def flush():
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                if stream is not None:
                    stream.flush()
            except Exception:  # noqa: BLE001 - a user-replaced stream may be broken
                pass

    def start(self):
        self.flush()
        self.fd = os.memfd_create("refinery-logs")
        os.dup2(self.fd, 1)
        os.dup2(self.fd, 2)

    def stop(self):
        """Restores fds 1 and 2; returns (logs, truncated)."""
        self.flush()
        os.dup2(self.saved_out, 1)
        os.dup2(self.saved_err, 2)
        try:
            size = os.fstat(self.fd).st_size
            keep = min(size, LOG_CAP_BYTES)
            data = os.pread(self.fd, keep, 0) if keep else b""
        finally:
            os.close(self.fd)
        text = data.decode("utf-8", errors="replace")
        truncated = size > LOG_CAP_BYTES
        if truncated:
            # Replacement characters can make the text longer than the bytes it came from.
            while len(text.encode("utf-8")) > LOG_CAP_BYTES:
                text = text[:-1]
        return text, truncated


# ---------------------------------------------------------------- loading


def module_name_for(path):
    stem = os.path.splitext(os.path.basename(path))[0]
    if (
        stem.isidentifier()
        and stem not in sys.modules
        and stem not in sys.stdlib_module_names
    ):
        return stem
    return "refinery_block"


SHARED_ROOT = "/shared"


def shared_dirs():
    """The project shared directories mounted for this block (`/shared/<name>`), by name;
    none when the block lists none."""
    try:
        names = sorted(os.listdir(SHARED_ROOT))
    except OSError:
        return []
    return [
        os.path.join(SHARED_ROOT, n)
        for n in names
        if os.path.isdir(os.path.join(SHARED_ROOT, n))
    ]


def add_deps(deps, at):
    """The block's dependency layer (read-only, pip's --target layout) goes on sys.path right
    after the block's own directories, before the standard library and the system's
    packages; its .pth files are processed as site-packages' are."""
    import site

    before = list(sys.path)
    site.addsitedir(deps)
    added = [p for p in sys.path if p not in before]
    for p in added:
        sys.path.remove(p)
    sys.path[at:at] = added


def load(path, function="main", root=None, deps=None):
    """Returns the handler, or raises an exception to report as init_error. `root` (the
    block's code dir, for a handler in a subdirectory) goes on sys.path too, so the block's
    top-level modules import from anywhere in it; `deps` (its dependency layer) after them."""
    code_dir = os.path.dirname(os.path.abspath(path))
    ahead = 1
    if root is not None and os.path.abspath(root) != code_dir:
        sys.path.insert(0, os.path.abspath(root))
        ahead = 2
    sys.path.insert(0, code_dir)
    # The project shared directories the block lists, right after its own code; then its
    # dependency layer.
    shared = shared_dirs()
    sys.path[ahead:ahead] = shared
    if deps is not None:
        add_deps(deps, ahead + len(shared))
    name = module_name_for(path)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}: not a Python source file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    handler = getattr(module, function, None)
    filename = os.path.basename(path)
    if handler is None:
        raise HandlerNotFound(
            f"{filename} must define {function}(block_input, backpack); no `{function}` was found"
        )
    if not callable(handler):
        raise HandlerNotFound(
            f"{filename} must define {function}(block_input, backpack); `{function}` is not callable"
        )
    return handler


class HandlerNotFound(Exception):
    pass


# ---------------------------------------------------------------- stragglers

SIGKILL = 9  # a literal: `import signal` pulls in enum at start-up for nothing
WNOHANG = 1
REAP_BUDGET_S = 0.05


def kill_stragglers():
    """No process the block started outlives its invocation (threads of this one do, frozen, into
    the next warm invocation, as on Lambda): SIGKILL every process this one may
    signal (in the sandbox: every process of the instance but this shim and pid 1, the
    sandbox's reaper, which collects the orphans), then reap our own killed children.

    Only inside the sandbox, where the shim is pid 2 under the reaper (or pid 1): on a host,
    pids 1 and 2 are init and kthreadd, so a shim run outside a sandbox never kills anything."""
    if os.getpid() > 2:
        return
    try:
        os.kill(-1, SIGKILL)
    except OSError:  # ESRCH: nothing to kill
        return
    deadline = time.monotonic() + REAP_BUDGET_S
    while True:
        try:
            pid, _ = os.waitpid(-1, WNOHANG)
        except ChildProcessError:
            return
        except InterruptedError:
            continue
        if pid == 0:
            # Killed children not dead yet: a short bounded wait (a thread of the block may
            # keep forking; its children are reaped after the next invocation).
            if time.monotonic() >= deadline:
                return
            time.sleep(0.001)


# ---------------------------------------------------------------- serving


# A step's run context as environment variables: (variable, key in the frame's context).
CONTEXT_VARS = (
    ("REFINERY_RUN_ID", "run_id"),
    ("REFINERY_STEP_ID", "step_id"),
    ("REFINERY_ATTEMPT", "attempt"),
)


class RunContextVars:
    """A step of a service run: its run id, step id and attempt in the environment for that
    invocation. An invocation without a context (a plain invoke) sees none of them left from
    an earlier invocation of this warm instance; while none was set since the last clearing
    that costs one attribute test. os.environ writes through to the process environment
    (putenv: no syscall), so subprocesses see the same."""

    def __init__(self):
        self.set = False

    def apply(self, context):
        environ = os.environ
        if context is None:
            if self.set:
                for name, _ in CONTEXT_VARS:
                    environ.pop(name, None)
                self.set = False
            return
        self.set = True
        for name, key in CONTEXT_VARS:
            environ[name] = str(context[key])


def invoke(handler, loop, context_vars, request):
    backpack = request.get("backpack")
    if backpack is None:
        backpack = {}
    context_vars.apply(request.get("context"))
    result = handler(request.get("input"), backpack)
    if hasattr(result, "__await__"):
        result = loop.run_until_complete(result)
    return result, backpack


def reply_for(handler, loop, context_vars, capture, request):
    capture.start()
    try:
        try:
            output, backpack = invoke(handler, loop, context_vars, request)
            outcome = None
        except BaseException as exc:  # noqa: BLE001 - SystemExit etc. are user errors too
            outcome = error_of(exc)
    finally:
        logs, truncated = capture.stop()

    if outcome is None:
        try:
            output_json = encode(output)
        except RecursionError:
            outcome = too_deep_error("the output")
        except (TypeError, ValueError) as exc:
            outcome = {
                "type": "TypeError",
                "message": f"main returned a value that is not JSON-serialisable: {exc}",
                "traceback": None,
            }
        else:
            try:
                backpack_json = encode(backpack)
            except RecursionError:
                outcome = too_deep_error("the backpack")
            except (TypeError, ValueError) as exc:
                outcome = {
                    "type": "TypeError",
                    "message": f"the backpack is not JSON-serialisable: {exc}",
                    "traceback": None,
                }
            else:
                for what, value, text in (
                    ("the output", output, output_json),
                    ("the backpack", backpack, backpack_json),
                ):
                    depth = too_deep(value, text)
                    if depth is not None:
                        outcome = too_deep_error(what, depth)
                        break
    tail = ',"id":' + encode(request.get("id")) + ',"logs":' + encode(logs) + ',"logs_truncated":' + encode(truncated) + "}"
    if outcome is None:
        body = '{"type":"result","output":' + output_json + ',"backpack":' + backpack_json + tail
        encoded = body.encode("utf-8")
        if len(encoded) <= MAX_FRAME_BYTES:
            return encoded
        outcome = {
            "type": "OutputTooLarge",
            "message": f"output and backpack together exceed {MAX_FRAME_BYTES} bytes",
            "traceback": None,
        }
    return ('{"type":"error","error":' + encode(outcome) + tail).encode("utf-8")


def adopt():
    """Standby mode: the sandbox was started before any block was assigned to it, with this
    shim loaded and no code. Tell the host it is waiting; its one adoption frame says what
    this instance now is: the complete environment, replacing this one, and the shim's
    arguments. False if the host closed the pipe first."""
    write_frame(encode({"type": "standby"}).encode("utf-8"))
    frame = read_message()
    if frame is None:
        return False
    if (
        not isinstance(frame, dict)
        or frame.get("type") != "adopt"
        or not isinstance(frame.get("env"), list)
        or not isinstance(frame.get("args"), list)
        or not all(isinstance(a, str) for a in frame["args"])
    ):
        raise ProtocolError("expected an adopt frame")
    os.environ.clear()
    os.environ.update({str(k): str(v) for k, v in frame["env"]})
    sys.argv = [sys.argv[0], *frame["args"]]
    return True


def main():
    if sys.argv[1:] == ["--standby"] and not adopt():
        return 0
    if len(sys.argv) not in (2, 4, 5):
        print(
            "usage: python_shim.py /code/<source> [FUNCTION CODE_DIR [DEPS_DIR]] | --standby",
            file=sys.stderr,
        )
        return 2
    path = sys.argv[1]
    function, root = (sys.argv[2], sys.argv[3]) if len(sys.argv) >= 4 else ("main", None)
    deps = sys.argv[4] if len(sys.argv) == 5 else None
    unbuffered_stdio()
    # The protocol pipes must not leak into subprocesses the block starts.
    for fd in (REQUESTS_FD, RESPONSES_FD):
        os.set_inheritable(fd, False)

    started = time.perf_counter()
    try:
        handler = load(path, function, root, deps)
    except BaseException as exc:  # noqa: BLE001 - any failure to load is the user's
        write_frame(encode({"type": "init_error", "error": error_of(exc)}).encode("utf-8"))
        return 1
    init_ms = (time.perf_counter() - started) * 1000.0
    write_frame(encode({"type": "ready", "init_ms": init_ms}).encode("utf-8"))

    loop = LazyLoop()
    context_vars = RunContextVars()
    capture = Capture()
    while True:
        try:
            request = read_message()
        except (ProtocolError, ValueError) as exc:
            print(f"refinery python shim: {exc}", file=sys.stderr)
            return 1
        if request is None:
            return 0
        if not isinstance(request, dict) or request.get("type") != "invoke":
            print("refinery python shim: expected an invoke frame", file=sys.stderr)
            return 1
        reply = reply_for(handler, loop, context_vars, capture, request)
        kill_stragglers()
        write_frame(reply)


if __name__ == "__main__":
    sys.exit(main())
