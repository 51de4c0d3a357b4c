"""The REST API: an ASGI app (FastAPI) over the same `Client` calls as the CLI.

    POST /v1/jobs                     a job spec (JSON, YAML, or multipart with its code as a zip);
                                      ?submission_id= makes it idempotent
    GET  /v1/jobs                     every job: id, state, step, loss...
    GET  /v1/jobs/{id}                one job's status (?spec=true adds the spec, secrets masked)
    POST /v1/jobs/{id}/cancel
    GET  /v1/jobs/{id}/events?since=  events after sequence number `since`
    GET  /v1/jobs/{id}/logs?offset=   log text from byte `offset`; &follow=true streams until the job ends
    GET  /v1/jobs/{id}/metrics
    GET  /v1/jobs/{id}/checkpoints
    GET  /v1/version
    GET  /healthz                     the only route without the bearer token
    GET  /openapi.json                this API's description (with the token)

Every error is JSON, {"detail": "...", "problems": [{"path", "message"}]}: 401 (no or wrong token), 404
(no such job), 409 (a submission id reused for another spec), 413 (a body over 1 MB, a code package over
its limit), 415 (a body type other than JSON, YAML or multipart), 422 (a bad spec, id or parameter:
it names the field, or the line of a YAML or JSON body), 502 (checkpoint storage failed), 503 (the
controller did not answer). A request that is refused changes nothing.
"""


import hmac
import json
import math
from typing import Annotated, Any, Callable, Literal

import yaml
from fastapi import APIRouter, FastAPI, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

import stalwart
from stalwart import spec as spec_module
from stalwart.api import protocol
from stalwart.errors import ClusterError, JobNotFound, SpecError, StalwartError, StorageError, SubmissionConflict
from stalwart.orchestrator.states import TERMINAL_STATES
from stalwart.spec import JobSpec

API_VERSION = "v1"
# A job id is `<spec name>-<6 hex digits>`; names are lower-case letters, digits, '.', '_' and '-', starting
# with a letter or digit. So no id holds a '/', starts with a '.', or holds a NUL: refused before any lookup.
JOB_ID_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,79}$"
SUBMISSION_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
MAX_INT = 2**53  # offsets and sequence numbers, as far as JSON numbers stay exact
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")
FOLLOW_POLL_S = 0.5


# ---- what the routes answer (for the OpenAPI description; the handlers build their JSON themselves) ----
class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class Problem(BaseModel):
    path: str = Field(description="the field, e.g. resources.workers ('' for the body as a whole)")
    message: str


class ErrorBody(BaseModel):
    detail: str
    problems: list[Problem] = Field(default_factory=list)
    job_id: str | None = None
    submission_id: str | None = None


class Health(BaseModel):
    status: Literal["ok"]


class Version(BaseModel):
    version: str = Field(description="stalwart's version")
    api: Literal["v1"]
    ray: str
    metrics_endpoint: str | None = Field(description="the controller's Prometheus endpoint (on the head node)")


class Submitted(BaseModel):
    id: str
    submission_id: str | None


class JobSummary(_Open):
    id: str
    name: str
    state: str
    created: float
    updated: float


class Attempt(_Open):
    attempt: int
    world_size: int | None
    started: float | None
    ended: float | None
    cause: str | None
    error: str | None


class JobStatus(_Open):
    id: str
    name: str
    state: str
    created: float
    updated: float
    attempts: list[Attempt]
    log_path: str
    checkpoint_uri: str | None
    spec: dict[str, Any] | None = Field(None, description="with ?spec=true: the spec the job runs, secrets masked")


class Event(BaseModel):
    seq: int
    ts: float
    kind: str
    attempt: int | None
    message: str
    data: dict[str, Any]


class LogChunk(BaseModel):
    text: str
    offset: int = Field(description="the byte offset after `text`: pass it back for what follows")


class CancelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field("cancelled by request", max_length=500)


class Cancelled(BaseModel):
    id: str
    state: str = Field(description="CANCELLING, or the state of a job that had already ended")


class CheckpointRow(_Open):
    step: int
    uri: str
    committed: bool


# ---- the token --------------------------------------------------------------------------------
class TokenGuard:
    """Every request but /healthz carries `Authorization: Bearer <token>`, or gets 401 before anything
    else: before routing (an unknown path tells a stranger nothing either) and before its body is read.

    A pure ASGI layer rather than a FastAPI dependency: the dependency machinery cost about a third
    of a status request's time here. The routes' OpenAPI description says the same (`_describe`)."""

    def __init__(self, app, token_digest: bytes, open_paths: tuple[str, ...] = ("/healthz",)):
        self.app = app
        self.digest = token_digest
        self.open_paths = open_paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths or self._presents_token(scope):
            await self.app(scope, receive, send)
            return
        await _error(401, "missing or wrong API token")(scope, receive, send)

    def _presents_token(self, scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                # Digests of equal length, compared in constant time: the time taken tells nothing of the token.
                return scheme.lower() == "bearer" and hmac.compare_digest(protocol.token_digest(token.strip()),
                                                                          self.digest)
        return False


# ---- query parameters -------------------------------------------------------------------------
class StrictQueryRoute(APIRoute):
    """A route that refuses a query parameter it does not take: a misspelt `sinse=` silently ignored would
    answer another question than the one asked (as the spec refuses unknown fields). Checked here, once
    per request with a set computed once per route, rather than as a dependency: FastAPI's dependency
    machinery costs a status request more than its own work does."""

    def get_route_handler(self):
        handler = super().get_route_handler()
        known = _query_names(self.dependant)

        async def strict(request: Request):
            params = request.query_params
            unknown = set(params.keys()) - known
            if unknown:
                raise UnknownQuery(sorted(unknown), known)
            if len(params.multi_items()) != len(params):  # every parameter here takes one value
                repeated = sorted({name for name, _ in params.multi_items() if len(params.getlist(name)) > 1})
                raise UnknownQuery([], known, repeated)
            return await handler(request)

        return strict


class UnknownQuery(Exception):
    """A query parameter the route does not take, or one given more than once (each takes one value)."""

    def __init__(self, unknown: list[str], known: set[str], repeated: list[str] = ()):
        expected = f"expected {', '.join(sorted(known))}" if known else "this route takes none"
        self.problems = [(name, f"unknown query parameter; {expected}") for name in unknown] + \
                        [(name, "given more than once; it takes one value") for name in repeated]
        if unknown:
            message = f"unknown query parameter(s) {', '.join(map(repr, unknown))}: {expected}"
        else:
            message = f"query parameter(s) {', '.join(map(repr, repeated))} given more than once; each takes one value"
        super().__init__(message)


def _query_names(dependant) -> set[str]:
    names = {param.alias for param in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


# ---- errors -----------------------------------------------------------------------------------
class UnsupportedBody(Exception):
    def __init__(self, content_type: str):
        self.content_type = content_type


def _error(status: int, detail: str, problems: list[tuple[str, str]] = (), **extra: Any) -> JSONResponse:
    body = {"detail": detail, "problems": [{"path": p, "message": m} for p, m in problems], **extra}
    return JSONResponse(body, status_code=status,
                        headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)


def _install_error_handlers(app: FastAPI) -> None:
    # Starlette picks the handler of the most derived class, so TooLarge (a SpecError) gets 413.
    app.add_exception_handler(UnsupportedBody, lambda r, e: _error(
        415, f"cannot read a {e.content_type or 'typeless'} body: send application/json, application/yaml or "
             f"multipart/form-data (a `spec` part and a `package` zip)"))
    app.add_exception_handler(UnknownQuery, lambda r, e: _error(422, str(e), e.problems))
    app.add_exception_handler(protocol.TooLarge, lambda r, e: _error(413, str(e), e.problems))
    app.add_exception_handler(SpecError, lambda r, e: _error(422, str(e), e.problems))
    app.add_exception_handler(JobNotFound, lambda r, e: _error(404, str(e), job_id=e.job_id))
    app.add_exception_handler(SubmissionConflict, lambda r, e: _error(
        409, str(e), job_id=e.job_id, submission_id=e.submission_id))
    app.add_exception_handler(StorageError, lambda r, e: _error(502, str(e)))
    app.add_exception_handler(ClusterError, lambda r, e: _error(503, str(e)))
    app.add_exception_handler(StalwartError, lambda r, e: _error(400, str(e)))

    def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [(".".join(str(p) for p in err["loc"][1:]) or str(err["loc"][0]), err["msg"]) for err in exc.errors()]
        return _error(422, "; ".join(f"{p}: {m}" for p, m in problems), problems)

    app.add_exception_handler(RequestValidationError, invalid)
    # Starlette's own (an unknown path: 404, a wrong method: 405, a body FastAPI cannot decode: 400), in
    # the same shape as the others.
    app.add_exception_handler(StarletteHTTPException, lambda r, e: JSONResponse(
        {"detail": str(e.detail), "problems": []}, status_code=e.status_code, headers=e.headers))


ERRORS = {code: {"model": ErrorBody} for code in (401, 404, 422, 503)}


# ---- JSON out ----------------------------------------------------------------------------------
def _finite(value: Any) -> Any:
    """JSON has no NaN or Infinity; a diverged loss is sent as the string "nan" (as the store keeps it)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _json(value: Any, status: int = 200) -> Response:
    try:  # almost always: no NaN to replace, and the C encoder alone does the work
        body = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError:
        body = json.dumps(_finite(value), separators=(",", ":"), ensure_ascii=False)
    return Response(body, status_code=status, media_type="application/json")


# ---- JSON and YAML in --------------------------------------------------------------------------
class _SpecLoader(yaml.SafeLoader):
    """YAML without anchors and aliases: an alias can make a small body expand into an enormous spec."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not accepted here", event.start_mark)
        return super().compose_node(parent, index)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_spec_text(raw: bytes, kind: str) -> Any:
    """The document in a JSON or YAML body. Raises SpecError naming the line and column of a syntax error."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError([("", f"the body is not UTF-8 text (byte {exc.start})")], "request body") from None
    try:
        if kind == "json":
            try:
                return json.loads(text, parse_constant=_reject_constant)
            except json.JSONDecodeError as exc:
                raise SpecError([("", f"not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}")],
                                "request body") from None
            except ValueError as exc:
                raise SpecError([("", f"not valid JSON: {exc}")], "request body") from None
        try:
            return yaml.load(text, Loader=_SpecLoader)  # noqa: S506 - a SafeLoader, without aliases
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise SpecError([("", f"not valid YAML{where}: {getattr(exc, 'problem', None) or exc}")],
                            "request body") from None
    except RecursionError:
        raise SpecError([("", "the document is nested too deeply")], "request body") from None


async def _capped(stream, limit: int, what: str):
    size = 0
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            raise protocol.TooLarge([("", f"{what} is over {limit / (1 << 20):.1f} MB")], "request body")
        yield chunk


async def read_submission(request: Request, package_limit: int) -> tuple[bytes, str, bytes | None]:
    """The spec's text, its kind ("json" or "yaml") and the code package (or None) of a POST /v1/jobs
    body, read within the limits (before any of it is parsed). Raises TooLarge, SpecError, UnsupportedBody."""
    from starlette.formparsers import MultiPartException, MultiPartParser

    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    multipart = media == "multipart/form-data"
    if not multipart and media != "application/json" and media not in YAML_TYPES:
        raise UnsupportedBody(media)
    limit = protocol.MAX_BODY_BYTES + (package_limit if multipart else 0)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise protocol.TooLarge([("", f"the body is {int(declared) / (1 << 20):.1f} MB, over the limit of "
                                      f"{limit / (1 << 20):.1f} MB")], "request body")
    stream = _capped(request.stream(), limit, "the body")
    if not multipart:
        return b"".join([chunk async for chunk in stream]), "json" if media == "application/json" else "yaml", None
    try:
        form = await MultiPartParser(request.headers, stream, max_files=2, max_fields=2, max_part_size=limit).parse()
    except MultiPartException as exc:
        raise SpecError([("", f"not a valid multipart body: {exc.message}")], "request body") from None
    try:
        unknown = sorted(set(form.keys()) - {"spec", "package"})
        if unknown:
            raise SpecError([(name, "unknown part; send `spec` and, for code, `package`") for name in unknown])
        twice = sorted(name for name in set(form.keys()) if len(form.getlist(name)) > 1)
        if twice:
            raise SpecError([(name, "sent more than once") for name in twice])
        spec = form.get("spec")
        if spec is None:
            raise SpecError([("spec", "missing: the job spec, as YAML or JSON")])
        raw = await spec.read() if isinstance(spec, UploadFile) else spec.encode()
        if len(raw) > protocol.MAX_BODY_BYTES:
            raise protocol.TooLarge([("spec", f"over {protocol.MAX_BODY_BYTES / (1 << 20):.0f} MB")])
        package = form.get("package")
        if package is not None and not isinstance(package, UploadFile):
            raise SpecError([("package", "must be a file part (a zip of the job's folder)")])
        data = await package.read() if package is not None else None
        return raw, "yaml", data  # YAML reads JSON too
    finally:
        await form.close()


def build_spec(document: Any, package: bytes | None, package_limit: int) -> tuple[JobSpec, str | None]:
    """The JobSpec of a submission, and its package's URI. With a package, the ranks run from its
    contents (runtime_env working_dir), and the client's own `workdir` (a path on its machine) is dropped.
    Raises SpecError, TooLarge."""
    if not isinstance(document, dict):
        raise SpecError([("", f"expected a mapping of fields, got {type(document).__name__}")], "request body")
    uri = None
    if package is not None:
        protocol.check_package(package, package_limit)
        uri = protocol.package_uri(package)
        env = document.get("runtime_env")
        if isinstance(env, dict) and env.get("working_dir"):
            raise SpecError([("runtime_env.working_dir", "give either a code package or a working_dir, not both")])
        if env is None or isinstance(env, dict):  # anything else is left for the spec's own check to refuse
            document = {**document, "workdir": None, "runtime_env": {**(env or {}), "working_dir": uri}}
    return JobSpec.from_dict(document, source="request body"), uri


# ---- the app ------------------------------------------------------------------------------------
def create_app(client: Any, *, token_digest: bytes, packages: Any = None, package_limit: int | None = None) -> FastAPI:
    """The API over `client` (a `stalwart.Client`, or anything with its methods), accepting the token
    whose SHA-256 is `token_digest`. `packages` (a PackageStore) takes code packages; without one, a
    submission that carries code is refused. `client` may be None to describe the API (OpenAPI) only."""
    package_limit = protocol.package_limit() if package_limit is None else package_limit
    app = FastAPI(title="stalwart", version=stalwart.__version__, docs_url=None, redoc_url=None, openapi_url=None,
                  description="Run sharded PyTorch training jobs on Ray and keep them alive.")
    _install_error_handlers(app)
    app.add_middleware(TokenGuard, token_digest=token_digest)

    JobId = Annotated[str, Path(pattern=JOB_ID_PATTERN, description="a job id, as submit returned it")]
    aio = getattr(client, "aio", None)

    async def call(name: str, *args: Any) -> Any:
        # Awaited on the event loop where the client can (a `Client` over Ray): no thread held per request.
        if aio is not None:
            return await getattr(aio, name)(*args)
        return await run_in_threadpool(getattr(client, name), *args)

    app.router.route_class = StrictQueryRoute
    v1 = APIRouter(prefix="/v1", responses=ERRORS, route_class=StrictQueryRoute)

    @app.get("/healthz", response_model=Health, tags=["server"], responses={422: {"model": ErrorBody}})
    def healthz() -> Response:
        """Whether the server answers (no token needed; says nothing else)."""
        return _json({"status": "ok"})

    @app.get("/openapi.json", include_in_schema=False)
    def openapi_json() -> JSONResponse:
        return JSONResponse(app.openapi())

    @v1.get("/version", response_model=Version, tags=["server"])
    async def version() -> Response:
        import ray

        return _json({"version": stalwart.__version__, "api": API_VERSION, "ray": ray.__version__,
                      "metrics_endpoint": await call("metrics_endpoint")})

    @v1.post("/jobs", status_code=201, response_model=Submitted, tags=["jobs"],
             responses={409: {"model": ErrorBody}, 413: {"model": ErrorBody}, 415: {"model": ErrorBody}},
             openapi_extra={"requestBody": SUBMIT_BODY})
    async def submit(request: Request, submission_id: Annotated[str | None, Query(
            pattern=SUBMISSION_ID_PATTERN, description="the client's id for this submission: the same id gives the "
            "same job, never a second one (a retry is safe)")] = None) -> Response:
        """Validate a job spec and queue the job; 201 with its id."""
        raw, kind, package = await read_submission(request, package_limit)
        if package is not None and packages is None:
            raise SpecError([("package", "this server takes no code packages")])

        def queue() -> str:  # one trip to the thread pool: parsing a large document takes a while too
            spec, uri = build_spec(parse_spec_text(raw, kind), package, package_limit)
            if uri is not None:
                packages.put(package)
            return client.submit(spec, submission_id).id

        return _json({"id": await run_in_threadpool(queue), "submission_id": submission_id}, status=201)

    @v1.get("/jobs", response_model=list[JobSummary], tags=["jobs"])
    async def list_jobs() -> Response:
        """Every job the controller knows, oldest first."""
        return _json(await call("jobs"))

    @v1.get("/jobs/{job_id}", response_model=JobStatus, tags=["jobs"])
    async def job_status(job_id: JobId,
                         spec: Annotated[bool, Query(description="add the job's spec")] = False) -> Response:
        """One job's state, progress, attempts and (if it failed) the failing rank's traceback."""
        status = await call("status", job_id)
        if spec:
            status["spec"] = await call("job_spec", job_id)
        return _json(status)

    @v1.post("/jobs/{job_id}/cancel", response_model=Cancelled, tags=["jobs"], responses={400: {"model": ErrorBody}})
    async def cancel(job_id: JobId, body: CancelRequest | None = None) -> Response:
        """Cancel a job: its workers stop and its resources are released (this returns at once)."""
        return _json({"id": job_id, "state": await call("cancel", job_id, (body or CancelRequest()).reason)})

    @v1.get("/jobs/{job_id}/events", response_model=list[Event], tags=["jobs"])
    async def events(job_id: JobId, since: Annotated[int, Query(ge=0, le=MAX_INT, description="the last `seq` "
                                                                "already seen")] = 0) -> Response:
        """The job's events (state changes, attempts, faults, checkpoints) after `since`, oldest first."""
        return _json(await call("events", job_id, since))

    @v1.get("/jobs/{job_id}/logs", response_model=LogChunk, tags=["jobs"], responses={200: {
        "content": {"text/plain": {"schema": {"type": "string"}}},
        "description": "a chunk of the log as JSON; with follow=true, the log as text, streamed until the job ends"}})
    async def logs(job_id: JobId, offset: Annotated[int, Query(ge=0, le=MAX_INT)] = 0,
                   follow: Annotated[bool, Query(description="stream the log until the job ends")] = False):
        """What the job's ranks printed, from byte `offset` on."""
        text, after = await call("read_logs", job_id, offset)  # raises JobNotFound first
        if not follow:
            return _json({"text": text, "offset": after})
        return StreamingResponse(_follow(call, job_id, text, after), media_type="text/plain; charset=utf-8")

    @v1.get("/jobs/{job_id}/metrics", response_model=list[dict[str, Any]], tags=["jobs"])
    async def metrics(job_id: JobId) -> Response:
        """The reports the ranks sent: step, loss, grad norm, tokens/s..."""
        return _json(await call("metrics", job_id))

    @v1.get("/jobs/{job_id}/checkpoints", response_model=list[CheckpointRow], tags=["jobs"],
            responses={502: {"model": ErrorBody}})
    def checkpoints(job_id: JobId) -> Response:
        """The job's saved checkpoints, newest first; only committed ones can be loaded."""
        return _json(client.checkpoints(job_id))

    app.include_router(v1)
    app.openapi = lambda: _describe(app)
    return app


async def _follow(call: Callable, job_id: str, first: str, offset: int):
    """The log from `offset` as it grows, until the job ends; a client that goes away ends it."""
    import asyncio

    if first:
        yield first.encode()
    while True:
        text, offset = await call("read_logs", job_id, offset)
        if text:
            yield text.encode()
            continue
        status = await call("status", job_id)
        if status["state"] in TERMINAL_STATES:
            text, offset = await call("read_logs", job_id, offset)
            if text:
                yield text.encode()
            return
        await asyncio.sleep(FOLLOW_POLL_S)


SUBMIT_BODY = {
    "required": True,
    "description": "a job spec as in a job.yaml file; with its code, as multipart: the spec and a zip of the job's "
                   "folder, which the ranks run from (Ray's runtime_env working_dir)",
    "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/JobSpec"}},
        "application/yaml": {"schema": {"type": "string", "description": "the spec as YAML"}},
        "multipart/form-data": {"schema": {
            "type": "object", "required": ["spec"],
            "properties": {"spec": {"type": "string", "description": "the spec, as YAML or JSON"},
                           "package": {"type": "string", "format": "binary",
                                       "description": "a zip of the job's folder (at most STALWART_MAX_PACKAGE_MB)"}}}},
    },
}


def _describe(app: FastAPI) -> dict:
    """The OpenAPI description, with the JobSpec schema that the submit body refers to."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        spec_schema = JobSpec.model_json_schema(ref_template="#/components/schemas/{model}")
        # The spec checks these in code (for friendlier messages); the description says them as patterns.
        spec_schema["properties"]["name"]["pattern"] = spec_module._NAME.pattern
        for choice in spec_schema["properties"]["entrypoint"]["anyOf"]:
            if choice.get("type") == "string":
                choice["pattern"] = spec_module._ENTRYPOINT.pattern
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(spec_schema.pop("$defs", {}))
        components["JobSpec"] = spec_schema
        # What TokenGuard asks of every route but /healthz.
        schema["components"]["securitySchemes"] = {"bearer": {
            "type": "http", "scheme": "bearer",
            "description": "the API token: $STALWART_HOME/api-token on the head node, or STALWART_API_TOKEN where "
                           "the server was started"}}
        for path, operations in schema["paths"].items():
            if path != "/healthz":
                for operation in operations.values():
                    operation["security"] = [{"bearer": []}]
        app.openapi_schema = schema
    return app.openapi_schema


def openapi() -> dict:
    """The API's OpenAPI description, without a server (as `python -m stalwart.api --openapi` prints it)."""
    return create_app(None, token_digest=b"").openapi()
