"""``masksam serve``: MLflow's own scoring server for the registered model, guarded.

``mlflow models serve`` reads the whole request body and parses it into Python lists before the
model sees it (a 600x512x512 volume as JSON left it at 5.6 GB resident), answers any exception
but an ``MlflowException`` as "unexpected error" with the full stack trace in the body, and has
no way to cap a request. This verb builds the very same app with MLflow's API
(``mlflow.pyfunc.scoring_server.init``: same ``/invocations``, ``/ping``, ``/health``,
``/version``, same JSON protocol) and puts one ASGI layer in front of ``/invocations``:

- the body is streamed and its commas counted as it arrives (a JSON body with N numbers has at
  least N - 1 commas, whatever its nesting), so a request over ``MASKSAM_MAX_VOXELS`` values is
  answered **413** before any of it is parsed, and the chunks received so far are dropped;
  a body over ``MASKSAM_MAX_REQUEST_BYTES`` is refused the same way, and a Content-Length
  announcing one is refused unread (at once for a client that sent ``Expect: 100-continue``,
  as curl does; any other client's body is read and dropped for up to 10 s first, so it can
  read the answer rather than a reset connection);
- only ``application/json`` is accepted (415 otherwise): CSV and Parquet bodies cannot carry a
  3D tensor and Parquet's compression would defeat the byte count;
- error bodies keep MLflow's JSON shape (``error_code``, ``message``) without ``stack_trace``
  (logged on the server instead), without the echo of the input MLflow puts in front of the
  model's message, and cut to a bounded length; the pyfunc's own size refusal is answered 413.

Models given as ``models:/`` URIs are first pulled and verified like ``masksam pull`` (every file
against the registry's record), into a temporary folder removed when the server stops.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import signal
import tempfile
from pathlib import Path
from typing import Any, Awaitable, Callable

from masksam.errors import UserError

log = logging.getLogger(__name__)

MAX_BYTES_ENV = "MASKSAM_MAX_REQUEST_BYTES"
# json.dumps writes a float32 value (as Python float) in at most 24 characters plus ", "
# ("-1.1754943508222875e-38, "), so no compact request within the voxel limit is refused for its
# bytes; the byte cap only bounds bodies of padding (whitespace, long strings) without commas.
BYTES_PER_VALUE = 26
# the params' numbers and the object's own commas (spacing 3, origin 3, direction 9, options)
PARAM_SLACK = 64
MAX_MESSAGE = 2000
# how long a refused body is still read (and dropped) so the client can read the answer
LINGER_S = 10.0
_MLFLOW_ECHO = re.compile(r"^Failed to predict data .*?\. \nError: ", re.S)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def _pyfunc():
    """masksam's pyfunc module, imported when first needed: it imports mlflow.pyfunc (seconds),
    which `masksam --help` should not wait for."""
    from masksam.components import _pyfunc as module

    return module


def max_request_bytes(max_values: int) -> int:
    """The largest body accepted: ``MASKSAM_MAX_REQUEST_BYTES`` or room for ``max_values``
    numbers as ``json.dumps`` writes them, plus 1 MiB."""
    raw = os.environ.get(MAX_BYTES_ENV, "").strip()
    if not raw:
        return max_values * BYTES_PER_VALUE + 2 ** 20
    if not raw.isdigit() or int(raw) < 1:
        raise UserError(f"{MAX_BYTES_ENV}={raw!r}: must be a positive number of bytes")
    return int(raw)


def clean_error(body: bytes) -> tuple[bytes, bool]:
    """An MLflow error body without its stack trace (logged here instead) or input echo, cut to
    :data:`MAX_MESSAGE` characters; returns (body, whether it is a size refusal)."""
    try:
        error = json.loads(body)
    except ValueError:
        return body[:MAX_MESSAGE], False
    if not isinstance(error, dict):
        return body[:MAX_MESSAGE], False
    message = _MLFLOW_ECHO.sub("", str(error.get("message", "")))
    trace = error.pop("stack_trace", None)
    if trace:
        log.warning("request failed:\n%s", trace)
        cause = next((line for line in reversed(str(trace).splitlines()) if line.strip()), "")
        message = f"{message} ({cause.strip()})" if cause else message
    if len(message) > MAX_MESSAGE:
        message = message[:MAX_MESSAGE] + " ... (cut)"
    error["message"] = message
    return json.dumps(error).encode(), error.get("error_class") == _pyfunc().TOO_LARGE


async def _respond(send: Send, status: int, message: str, error_code: str) -> None:
    """A JSON error answer in MLflow's shape; the connection is closed after it."""
    error = {"error_code": error_code, "message": message}
    if status == 413:
        error["error_class"] = _pyfunc().TOO_LARGE  # as the pyfunc's own size refusal
    body = json.dumps(error).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """ASGI middleware in front of MLflow's scoring app: size limits before parsing, JSON only,
    clean error bodies (see the module docstring)."""

    def __init__(self, app, max_values: int, max_bytes: int) -> None:
        self.app, self.max_values, self.max_bytes = app, max_values, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") != "/invocations" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        refusal = self._check_headers(headers)
        if refusal is not None:
            # a client that asked "Expect: 100-continue" (curl does for large bodies) gets the
            # answer before it sends the body; any other is sent it once its body is drained
            if headers.get(b"expect", b"").lower() != b"100-continue":
                await self._drain(receive)
            await _respond(send, *refusal)
            return
        body, reason = await self._read(receive)
        if reason is not None:
            await _respond(send, 413, reason, "INVALID_PARAMETER_VALUE")
        elif body is not None:
            await self.app(scope, _replay(body, receive), _clean_errors(send))

    def _check_headers(self, headers: dict[bytes, bytes]) -> tuple[int, str, str] | None:
        """(status, message, error_code) when the headers alone refuse the request."""
        content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if content_type != b"application/json":
            return (415, f"Content-Type {content_type.decode(errors='replace') or 'none'}: this server "
                    "takes application/json ({\"inputs\": ..., \"params\": ...})", "BAD_REQUEST")
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return (413, f"request body of {int(length):,} bytes is over this server's limit of "
                    f"{self.max_bytes:,} ({MAX_BYTES_ENV}); send a smaller scan", "INVALID_PARAMETER_VALUE")
        return None

    async def _drain(self, receive: Receive) -> tuple[int, int, bool]:
        """Read and drop the rest of a refused body (nginx's "lingering close": the client can
        then read the answer instead of a reset connection), for at most LINGER_S seconds;
        returns (bytes, commas, whether it was read to its end)."""
        size = commas = 0
        try:
            async with asyncio.timeout(LINGER_S):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return size, commas, False
                    chunk = message.get("body", b"")
                    size, commas = size + len(chunk), commas + chunk.count(b",")
                    if not message.get("more_body", False):
                        return size, commas, True
        except TimeoutError:
            return size, commas, False

    async def _read(self, receive: Receive) -> tuple[bytes | None, str | None]:
        """The whole body, or the reason it is refused (then nothing of it is kept and the rest
        is drained); (None, None) when the client left."""
        chunks: list[bytes] = []
        size = commas = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, None
            chunk = message.get("body", b"")
            size, commas = size + len(chunk), commas + chunk.count(b",")
            more = message.get("more_body", False)
            if commas + 1 > self.max_values + PARAM_SLACK or size > self.max_bytes:
                chunks.clear()
                _, rest_commas, whole = await self._drain(receive) if more else (0, 0, True)
                if size > self.max_bytes:
                    return None, (f"request body over {self.max_bytes:,} bytes, this server's limit "
                                  f"({MAX_BYTES_ENV}); send a smaller scan")
                about = "" if whole else "at least "
                return None, (f"request holds {about}{commas + rest_commas + 1:,} numbers, over this "
                              f"server's limit of {self.max_values:,} voxel values ({_pyfunc().MAX_VOXELS_ENV}); "
                              "refused before parsing: send a smaller or cropped scan")
            chunks.append(chunk)
            if not more:
                return b"".join(chunks), None


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _clean_errors(send: Send) -> Send:
    """Pass successful responses through; rewrite error bodies with :func:`clean_error`."""
    start: Message | None = None
    parts: list[bytes] = []

    async def wrapped(message: Message) -> None:
        nonlocal start
        if message["type"] == "http.response.start" and message["status"] >= 400:
            start = message
            return
        if start is None or message["type"] != "http.response.body":
            await send(message)
            return
        parts.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        body, too_large = clean_error(b"".join(parts))
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({**start, "status": 413 if too_large else start["status"], "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return wrapped


def build_app(model, max_values: int, max_bytes: int) -> RequestGuard:
    """MLflow's scoring app for a loaded pyfunc ``model``, behind :class:`RequestGuard`."""
    from mlflow.pyfunc import scoring_server

    return RequestGuard(scoring_server.init(model), max_values, max_bytes)


def _local_model(model_uri: str, tmp: Path) -> str:
    """A local folder holding the model: ``models:/`` and other MLflow URIs are pulled and
    verified first (as ``masksam pull``); a folder is used as it is."""
    from masksam.components._loading import is_mlflow_uri

    if is_mlflow_uri(model_uri):
        from masksam.components.pull import pull

        pull(model_uri, tmp / "model")
        return str(tmp / "model")
    if not Path(model_uri).is_dir():
        raise UserError(f"-m {model_uri}: neither an MLflow model URI (models:/NAME@ALIAS) nor a "
                        "model folder (one holding MLmodel)")
    return model_uri


def serve(model_uri: str, host: str = "127.0.0.1", port: int = 5001, max_voxels: int | None = None) -> None:
    """Serve ``model_uri`` until interrupted (see the module docstring)."""
    import uvicorn
    from mlflow.pyfunc import scoring_server

    if max_voxels is not None:
        os.environ[_pyfunc().MAX_VOXELS_ENV] = str(max_voxels)  # the pyfunc reads it when it loads
    max_values = _pyfunc().max_voxels_from_env()
    max_bytes = max_request_bytes(max_values)
    # uvicorn shuts down on SIGTERM, then raises it again; as SystemExit it removes the folder
    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        with tempfile.TemporaryDirectory(prefix="masksam-serve-") as tmp:
            model = scoring_server.load_model_with_mlflow_config(_local_model(model_uri, Path(tmp)))
            log.info("serving %s on http://%s:%d (at most %d voxel values, %d bytes per request)",
                     model_uri, host, port, max_values, max_bytes)
            uvicorn.run(build_app(model, max_values, max_bytes), host=host, port=port, log_level="info")
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a registered model over REST (MLflow's scoring server, with size limits)",
        description="Serve a MaskSAM pyfunc with MLflow's own scoring app (/invocations, /ping, "
        "/health, /version; the `mlflow models serve` JSON protocol), adding: a request limit in "
        "voxel values (MASKSAM_MAX_VOXELS, default 512**3) answered 413 before the body is parsed, "
        f"a byte limit ({MAX_BYTES_ENV}), JSON only, and error bodies without stack traces. "
        "models:/ URIs are pulled and verified first. The request timeout is MLflow's "
        "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.")
    p.add_argument("-m", "--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION or a "
                   "model folder (as written by masksam pull)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("-p", "--port", type=int, default=5001, help="port (default 5001)")
    p.add_argument("--max-voxels", type=int, help="largest input in voxel values (default "
                   "MASKSAM_MAX_VOXELS or 512**3 = 134217728)")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    if args.max_voxels is not None and args.max_voxels < 1:
        raise UserError(f"--max-voxels {args.max_voxels}: must be a positive number of voxels")
    serve(args.model, args.host, args.port, args.max_voxels)
    return 0
