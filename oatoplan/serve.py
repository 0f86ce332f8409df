"""Serve a model with a plan's placement through llama-cpp-python's OpenAI-compatible server (`llama_cpp.server`).

Entry points: `make_app(model, plan)` (the ASGI app) and `serve(model, plan, host, port)` (runs it with uvicorn).

The hook: `llama_cpp.server.app.create_app` builds the FastAPI app (its routes, CORS, request ids, API key from the
API_KEY variable) and then makes its one `LlamaProxy`, whose constructor loads the default model with
`LlamaProxy.load_llama_from_model_settings`, a plain `llama_cpp.Llama(...)` that knows nothing of tensor overrides
or n_outputs_max. We load the model first with `oatoplan.load(model, plan)` and, for the duration of that one
`create_app` call, let `llama_cpp.server.app.LlamaProxy` name a subclass whose loader returns our `Llama`. Nothing
else of the server changes: its routes, locks and streaming run on the Llama that oatoplan loaded, so the plan's
placement (tensor overrides, n_outputs_max, mmap, threads, ubatch, KV types) is what serves; chat completions use the
GGUF's chat template as llama-cpp-python does (or `chat_format`, one of its named formats, for a GGUF without one).
`serve` reads and checks the plan, binds the port (a taken port is said before a long load, and nothing accepts
connections yet), loads the model, and only then accepts connections. The server's settings other than the model
(API_KEY, INTERRUPT_REQUESTS...) come from the environment, as in llama_cpp.server; it keeps its app state in
module globals: one app per process.

What the served context cannot do is refused up front with a 400 in OpenAI's error shape (llama_cpp.server would
answer 500 with a traceback, or break a stream after its 200): `logprobs`, which needs the logits of every token
(`logits_all`; a plan's n_outputs_max keeps one row per ubatch, and without it every row would be n_vocab floats of
memory the plan does not count), and `/v1/embeddings`, which needs a context made for embeddings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
from pathlib import Path
from typing import Callable

from .errors import OatoError, PlanMismatchError
from .inventory import read_inventory
from .load import load, load_plan
from .plan import DEFAULT_N_CTX, check_plan, cpu_only_plan, predict_memory
from .schema import Plan

try:   # the `server` extra: llama-cpp-python's server and what it runs on
    import uvicorn
    from llama_cpp.server import app as server_app
    from llama_cpp.server.model import LlamaProxy
    from llama_cpp.server.settings import ModelSettings, ServerSettings
    from starlette.middleware import Middleware
    from starlette.responses import JSONResponse
except ImportError as exc:        # serve() says what to install; the rest of oatoplan works without it
    _MISSING = exc.name or str(exc)
else:
    _MISSING = ""

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
COMPLETION_PATHS = ("/v1/completions", "/v1/engines/copilot-codex/completions")
CHAT_PATH = "/v1/chat/completions"
EMBEDDING_PATH = "/v1/embeddings"


def serving_plan(model: str | Path, plan: Plan | str | Path | None,
                 n_ctx: int | None = None) -> Plan | str | Path | None:
    """`plan` read and checked against `model`, its context set to `n_ctx` where the plan allows it: any size when
    nothing sits on a GPU (the KV cache then lives in host memory), at most the planned size otherwise (the VRAM
    budget was solved for it). None stays None (load's all-CPU default) unless `n_ctx` asks for a size."""
    if n_ctx is not None and n_ctx < 1:
        raise OatoError(f"--n-ctx {n_ctx}: a context holds at least 1 token")
    if plan is None and n_ctx is None:
        return None
    source = str(plan) if isinstance(plan, (str, Path)) else "plan"
    inventory = read_inventory(model)
    longest = max(inventory.hparams.n_ctx_train, DEFAULT_N_CTX)
    if n_ctx is not None and n_ctx > longest:
        raise OatoError(f"--n-ctx {n_ctx} is more than {inventory.identity.file_name} was trained for "
                        f"({inventory.hparams.n_ctx_train} tokens); serve at most {longest}, or plan a longer context "
                        f"with oatoplan plan --ctx-over-train and pass --plan")
    if plan is None:
        return cpu_only_plan(inventory, n_ctx=n_ctx)
    given, plan = plan, load_plan(plan) if isinstance(plan, (str, Path)) else plan
    check_plan(inventory, plan, source)
    if n_ctx is None or n_ctx == plan.n_ctx:
        return given                    # as given: load() then names the plan's file in what it says
    if plan.gpu_devices and n_ctx > plan.n_ctx:
        raise PlanMismatchError(f"{source} puts the KV cache of its GPU layers in a VRAM budget solved for a "
                                f"context of {plan.n_ctx} tokens; --n-ctx {n_ctx} would not fit it: plan again "
                                f"with --ctx {n_ctx}, or serve at most {plan.n_ctx}")
    plan = dataclasses.replace(plan, n_ctx=n_ctx)
    compute = plan.memory.compute_bytes if plan.memory else None
    memory = predict_memory(inventory, plan, compute)
    if plan.memory:                     # the staging ring does not depend on the context
        memory = dataclasses.replace(memory, stream_bytes=dict(plan.memory.stream_bytes))
    return dataclasses.replace(plan, memory=memory)


def make_app(model: str | Path, plan: Plan | str | Path | None = None, *, alias: str | None = None,
             n_ctx: int | None = None, chat_format: str | None = None):
    """llama_cpp.server's FastAPI app serving `model` loaded with `plan`'s placement (None: everything on the CPU)
    under the name `alias` (default: the file's stem). `chat_format` is one of llama-cpp-python's named formats
    (gemma, chatml, llama-3...); None: the GGUF's chat template. Loads the model; raises OatoError for a bad plan."""
    if _MISSING:
        raise OatoError(f"oatoplan serve needs llama-cpp-python's server packages ({_MISSING} is missing): "
                        f"pip install 'oatoplan[server]'")
    if os.environ.get("CONFIG_FILE"):
        raise OatoError("CONFIG_FILE is set: llama_cpp.server would load the models it lists instead of the "
                        "plan's; unset it for oatoplan serve")
    model = Path(model)
    alias = alias or model.stem
    llm = load(model, plan if n_ctx is None else serving_plan(model, plan, n_ctx), chat_format=chat_format)
    if chat_format is None and "tokenizer.chat_template" not in llm.metadata:
        log.warning("%s has no chat template: llama-cpp-python formats chats as %r, which few models understand; "
                    "choose the model's format with --chat-format (e.g. gemma, chatml, llama-3)", model.name,
                    llm.chat_format)

    class PlannedProxy(LlamaProxy):
        @staticmethod
        def load_llama_from_model_settings(settings):
            return llm

    with _swapped(server_app, "LlamaProxy", PlannedProxy):
        app = server_app.create_app(server_settings=ServerSettings(), model_settings=[
            ModelSettings(model=str(model), model_alias=alias)])
    # innermost, so that its answers get the CORS headers and request id of llama_cpp.server's middleware too
    app.user_middleware.append(Middleware(RefuseUnservable, reason=_logits_reason(llm.oatoplan_plan)))
    app.state.oatoplan_llm, app.state.oatoplan_alias = llm, alias
    log.info("serving %s as %r with n_gpu_layers %d, %d tensor overrides, n_ctx %d", model, alias,
             llm.oatoplan_plan.n_gpu_layers, len(llm.oatoplan_plan.tensor_overrides), llm.oatoplan_plan.n_ctx)
    return app


def listen(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> socket.socket:
    """A TCP socket bound to (host, port), not yet listening (uvicorn listens on it)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise OatoError(f"--host {host}: not an address of this machine ({exc.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise OatoError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port or --host") from None
    return sock


def serve(model: str | Path, plan: Plan | str | Path | None = None, host: str = DEFAULT_HOST,
          port: int = DEFAULT_PORT, *, alias: str | None = None, n_ctx: int | None = None,
          chat_format: str | None = None, on_listening: Callable[[str, str], None] | None = None) -> None:
    """Serve the OpenAI API at http://host:port/v1 with `model` loaded with `plan`, until interrupted. In order:
    the plan is read and checked, the port bound (so that a taken port is said before a long load; nothing accepts
    connections yet), the model loaded, `on_listening(url, alias)` called, and connections accepted."""
    plan = serving_plan(model, plan, n_ctx)
    sock = listen(host, port)
    try:
        app = make_app(model, plan, alias=alias, chat_format=chat_format)
    except BaseException:
        sock.close()
        raise
    bound_host, bound_port = sock.getsockname()[:2]
    url = f"http://{f'[{bound_host}]' if ':' in bound_host else bound_host}:{bound_port}"
    if on_listening:
        on_listening(url, app.state.oatoplan_alias)
    # log_config=None: uvicorn's loggers go through the caller's logging setup (quiet below INFO)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


@contextlib.contextmanager
def _swapped(module, name: str, value):
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


def _logits_reason(plan: Plan) -> str:
    if plan.n_outputs_max:
        return (f"the plan reserves logits for {plan.n_outputs_max} token per ubatch (n_outputs_max), the last "
                f"one, which is all that generation reads")
    return ("the server keeps the last token's logits only (logits_all off: a row for every token would take "
            "n_ctx x n_vocab floats that the plan does not count)")


def refusal(path: str, body: bytes, reason: str) -> tuple[str, str] | None:
    """(parameter, message) when the request cannot be answered by the served context, else None."""
    if path == EMBEDDING_PATH:
        return "input", ("embeddings are not served: oatoplan serve loads the model for generation (a context "
                         "without embedding=True)")
    try:
        request = json.loads(body or b"{}")
    except ValueError:
        return None                     # llama_cpp.server answers malformed JSON itself
    if not isinstance(request, dict):
        return None
    if path in COMPLETION_PATHS and request.get("logprobs") is not None or \
            path == CHAT_PATH and request.get("logprobs"):
        return "logprobs", f"logprobs needs the logits of every token, and {reason}; send the request without it"
    return None


class RefuseUnservable:
    """ASGI middleware: answers 400 (OpenAI's error shape) to requests that `refusal` turns down, before
    llama_cpp.server starts on them; passes every other request through unchanged, body included."""

    def __init__(self, app, reason: str):
        self.app, self.reason = app, reason

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or scope["method"] != "POST" or \
                path not in COMPLETION_PATHS + (CHAT_PATH, EMBEDDING_PATH):
            await self.app(scope, receive, send)
            return
        messages, body = [], b""
        while True:
            message = await receive()
            messages.append(message)
            body += message.get("body", b"")
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        refused = refusal(path, body, self.reason)
        if refused:
            param, text = refused
            log.info("refused %s: %s", path, text)
            response = JSONResponse({"error": {"message": text, "type": "invalid_request_error", "param": param,
                                               "code": "unsupported_parameter"}}, status_code=400)
            await response(scope, receive, send)
            return
        replay = iter(messages)

        async def replayed():
            return next(replay, None) or await receive()
        await self.app(scope, replayed, send)
