"""The REST API over a real controller (the in-process Ray): the token, every route, bad input that
changes nothing, the OpenAPI file, a fuzz from the API's own description, and the HTTP client and the
CLI over a real uvicorn giving what the Ray client gives.

A placement group holds every CPU while these tests run, so the jobs they submit queue and start nothing.
"""

import io
import json
import os
import secrets
import threading
import time
import warnings
import zipfile

import pytest
import ray
import yaml
from hypothesis import HealthCheck, settings
from ray.experimental import internal_kv
from ray.util.placement_group import placement_group, remove_placement_group

from jobspecs import JOBS, REPO, job_spec, wait_for
from stalwart.api import protocol
from stalwart.api.app import create_app
from stalwart.api.packages import PackageStore
from stalwart.errors import JobNotFound, SpecError, SubmissionConflict

schemathesis = pytest.importorskip("schemathesis")
with warnings.catch_warnings():  # Starlette 1.x would rather its test client ran on httpx2; httpx serves
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

TOKEN = secrets.token_urlsafe(16)
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PACKAGE_LIMIT = 256 << 10
JOB_ROUTES = ["", "/events", "/logs", "/metrics", "/checkpoints"]


@pytest.fixture(scope="module")
def plug(client):
    """Every CPU of the cluster reserved: submitted jobs queue. Afterwards their leftovers are cancelled."""
    pg = placement_group([{"CPU": ray.cluster_resources()["CPU"]}])
    ray.get(pg.ready(), timeout=120)
    before = {j["id"] for j in client.jobs()}
    yield pg
    for job in client.jobs():
        if job["id"] not in before and job["state"] not in ("SUCCEEDED", "FAILED", "CANCELLED"):
            client.cancel(job["id"], "test over")
    remove_placement_group(pg)


@pytest.fixture(scope="module")
def app(client, ray_local, plug):
    return create_app(client, token_digest=protocol.token_digest(TOKEN), packages=PackageStore(ray_local),
                      package_limit=PACKAGE_LIMIT)


@pytest.fixture(scope="module")
def api(app):
    with TestClient(app) as test_client:
        yield test_client


def queued_spec(**sections) -> dict:
    return job_spec("testjobs:linear", {"steps": 3}, workers=1, **sections)


def snapshot(client) -> dict:
    return {j["id"]: j["state"] for j in client.jobs()}


def test_every_route_but_healthz_needs_the_token(api, client):
    job_id = api.post("/v1/jobs", json=queued_spec(), headers=AUTH).json()["id"]
    before = snapshot(client)
    requests = [("GET", "/v1/version"), ("GET", "/v1/jobs"), ("POST", f"/v1/jobs/{job_id}/cancel"),
                ("GET", "/openapi.json")] + [("GET", f"/v1/jobs/{job_id}{tail}") for tail in JOB_ROUTES]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": f"Bearer {TOKEN}x"}):
        for method, path in requests:
            response = api.request(method, path, headers=headers)
            assert response.status_code == 401, (method, path, headers, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
            assert TOKEN not in response.text
        refused = api.post("/v1/jobs", json=queued_spec(), headers=headers)
        assert refused.status_code == 401
    assert snapshot(client) == before  # not one submit nor cancel went through
    assert api.get("/healthz").json() == {"status": "ok"}
    assert api.get("/v1/version", headers=AUTH).json()["version"] == __import__("stalwart").__version__


def test_submit_as_json_yaml_or_with_code_and_every_route(api, client, ray_local):
    spec = queued_spec()
    first = api.post("/v1/jobs", params={"submission_id": "sub-1"}, json=spec, headers=AUTH)
    assert first.status_code == 201, first.text
    job_id = first.json()["id"]
    # The same submission id: the same job, never a second one; with another spec, a conflict.
    again = api.post("/v1/jobs", params={"submission_id": "sub-1"}, json=spec, headers=AUTH)
    assert again.status_code == 201 and again.json()["id"] == job_id
    before = snapshot(client)
    conflict = api.post("/v1/jobs", params={"submission_id": "sub-1"}, json={**spec, "priority": 5}, headers=AUTH)
    assert conflict.status_code == 409 and conflict.json()["job_id"] == job_id
    assert snapshot(client) == before

    as_yaml = api.post("/v1/jobs", content=yaml.safe_dump(spec), headers={**AUTH, "Content-Type": "application/yaml"})
    assert as_yaml.status_code == 201, as_yaml.text

    # With its code: the ranks would run from the package, not from a folder of the client's.
    package = protocol.pack(JOBS)
    with_code = api.post("/v1/jobs", data={"spec": json.dumps({**spec, "workdir": "/nowhere/on/the/cluster"})},
                         files={"package": ("code.zip", package, "application/zip")}, headers=AUTH)
    assert with_code.status_code == 201, with_code.text
    code_job = with_code.json()["id"]
    stored = api.get(f"/v1/jobs/{code_job}", params={"spec": "true"}, headers=AUTH).json()["spec"]
    uri = protocol.package_uri(package)
    assert stored["runtime_env"] == {"working_dir": uri} and stored["workdir"] is None
    assert internal_kv._internal_kv_get(uri) == package  # where Ray's nodes fetch it from
    assert (ray_local / "packages" / uri.rsplit("/", 1)[1]).read_bytes() == package  # and the durable copy

    listed = {j["id"]: j for j in api.get("/v1/jobs", headers=AUTH).json()}
    assert {job_id, as_yaml.json()["id"], code_job} <= set(listed)
    status = api.get(f"/v1/jobs/{job_id}", headers=AUTH).json()
    assert status["state"] == "PENDING" and status["id"] == job_id and "spec" not in status
    events = api.get(f"/v1/jobs/{job_id}/events", headers=AUTH).json()
    assert events[0]["kind"] == "submitted"
    assert api.get(f"/v1/jobs/{job_id}/events", params={"since": events[-1]["seq"]}, headers=AUTH).json() == []
    assert api.get(f"/v1/jobs/{job_id}/logs", headers=AUTH).json() == {"text": "", "offset": 0}
    assert api.get(f"/v1/jobs/{job_id}/metrics", headers=AUTH).json() == []
    assert api.get(f"/v1/jobs/{job_id}/checkpoints", headers=AUTH).json() == []
    cancelled = api.post(f"/v1/jobs/{job_id}/cancel", json={"reason": "enough"}, headers=AUTH)
    assert cancelled.json() == {"id": job_id, "state": "CANCELLING"}
    wait_for(lambda: client.status(job_id)["state"] == "CANCELLED", timeout=30)
    assert api.post(f"/v1/jobs/{job_id}/cancel", headers=AUTH).json()["state"] == "CANCELLED"
    # A finished job's log streams to its end and the response closes.
    assert api.get(f"/v1/jobs/{job_id}/logs", params={"follow": "true"}, headers=AUTH).text == ""


def zip_of(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def test_bad_input_is_refused_and_changes_nothing(api, client):
    job_id = api.post("/v1/jobs", json=queued_spec(), headers=AUTH).json()["id"]
    before = snapshot(client)
    # Ids that try to leave the jobs' folder, or carry a NUL: refused before any lookup.
    for bad in ("..%2F..%2Fetc%2Fpasswd", "%2e%2e", "..", "%2Fetc%2Fpasswd", "a%00b", "%00", f"{job_id}%00",
                "%2e%2e%2f%2e%2e", "..%5C..%5Cwindows", "UPPER-case"):
        for tail in JOB_ROUTES:
            response = api.get(f"/v1/jobs/{bad}{tail}", headers=AUTH)
            assert response.status_code in (404, 422), (bad, tail, response.status_code, response.text)
        assert api.post(f"/v1/jobs/{bad}/cancel", headers=AUTH).status_code in (404, 405, 422)
    for path in ("/v1/jobs/../v1/jobs", "/v1/jobs//etc/passwd"):
        assert api.get(path, headers=AUTH).status_code in (404, 422)
    for bad_id in ("../x", "%2e%2e", "/abs", "a\x00b", ""):
        response = api.post("/v1/jobs", params={"submission_id": bad_id}, json=queued_spec(), headers=AUTH)
        assert response.status_code == 422, (bad_id, response.text)
    names = api.post("/v1/jobs", json=queued_spec(name="../../etc"), headers=AUTH)
    assert names.status_code == 422 and names.json()["problems"][0]["path"] == "name"

    # Bodies over their limits: 413, whatever they hold.
    big = json.dumps({**queued_spec(), "config": {"pad": "x" * (protocol.MAX_BODY_BYTES + 1)}})
    assert api.post("/v1/jobs", content=big, headers={**AUTH, "Content-Type": "application/json"}).status_code == 413
    too_big = zip_of({"blob.bin": secrets.token_bytes(PACKAGE_LIMIT + 1024)})
    response = api.post("/v1/jobs", data={"spec": json.dumps(queued_spec())},
                        files={"package": ("code.zip", too_big, "application/zip")}, headers=AUTH)
    assert response.status_code == 413 and "STALWART_MAX_PACKAGE_MB" in response.json()["detail"], response.text
    bomb = zip_of({"zeros.bin": bytes(protocol.UNPACKED_FACTOR * PACKAGE_LIMIT + 1)})
    response = api.post("/v1/jobs", data={"spec": json.dumps(queued_spec())},
                        files={"package": ("code.zip", bomb, "application/zip")}, headers=AUTH)
    assert response.status_code == 413, response.text
    with pytest.raises(protocol.TooLarge):
        protocol.pack(REPO / "examples", limit=1024)  # refused on the client, before anything is sent

    # A package whose entries would land outside the job's folder, or that is no zip. (Python's zipfile
    # cuts a name at a NUL when it reads it, so a NUL cannot smuggle a path through.)
    for package in (zip_of({"../escape.py": b"x"}), zip_of({"/etc/cron.d/x": b"x"}),
                    zip_of({"sub\\..\\..\\escape.py": b"x"}), zip_of({"C:/x.py": b"x"}), b"not a zip"):
        response = api.post("/v1/jobs", data={"spec": json.dumps(queued_spec())},
                            files={"package": ("code.zip", package, "application/zip")}, headers=AUTH)
        assert response.status_code == 422 and response.json()["problems"][0]["path"] == "package", response.text

    # Malformed documents: 422, naming the line.
    yaml_body = "name: t\nentrypoint: testjobs:linear\nresources: {workers: 1\nconfig: {}\n"
    response = api.post("/v1/jobs", content=yaml_body, headers={**AUTH, "Content-Type": "application/yaml"})
    assert response.status_code == 422 and "line 4" in response.json()["detail"], response.text
    response = api.post("/v1/jobs", content='{"name": "t",\n "entrypoint": }',
                        headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 422 and "line 2" in response.json()["detail"], response.text
    for body, media in (("a: &x [1]\nb: *x\n", "application/yaml"), ("[" * 100_000, "application/yaml"),
                        ("[" * 100_000 + "]" * 100_000, "application/json"), ('{"name": NaN}', "application/json"),
                        ("- just\n- a list\n", "text/yaml"), (b"\xff\xfe", "application/json")):
        response = api.post("/v1/jobs", content=body, headers={**AUTH, "Content-Type": media})
        assert response.status_code == 422, (body[:20], response.text)
    assert api.post("/v1/jobs", content="x", headers={**AUTH, "Content-Type": "text/plain"}).status_code == 415
    assert api.post("/v1/jobs", data={"other": "x"}, files={"package": ("c.zip", b"x")},
                    headers=AUTH).status_code == 422
    assert api.get("/v1/jobs/x-000000/events", params={"since": -1}, headers=AUTH).status_code == 422
    assert api.get("/v1/jobs/x-000000/logs", params={"offset": 2**70}, headers=AUTH).status_code == 422
    # A parameter given twice is refused rather than one of its values taken.
    twice = api.post("/v1/jobs?submission_id=a&submission_id=b", json={"entrypoint": "m:f"}, headers=AUTH)
    assert twice.status_code == 422 and "more than once" in twice.text, twice.text
    assert api.get("/v1/jobs/x-000000", headers=AUTH).status_code == 404

    assert snapshot(client) == before


def test_served_openapi_is_the_checked_in_one(api):
    served = api.get("/openapi.json", headers=AUTH).json()
    checked_in = json.loads((REPO / "docs" / "openapi.json").read_text())
    assert served == checked_in, "docs/openapi.json is stale: python -m stalwart.api --openapi > docs/openapi.json"


# ---- a fuzz from the API's own description -------------------------------------------------------
# Cases per operation (valid ones and ones that break the description): about 300 in all, the same ones
# every run, so that the suite is repeatable. STALWART_FUZZ_EXAMPLES=N STALWART_FUZZ_RANDOM=1 explores more.
FUZZ_EXAMPLES = int(os.environ.get("STALWART_FUZZ_EXAMPLES", "30"))
FUZZ_RANDOM = bool(os.environ.get("STALWART_FUZZ_RANDOM"))
OPERATIONS = [(method.upper(), path) for path, ops in json.loads((REPO / "docs" / "openapi.json").read_text())["paths"].items()
              for method in ops]


@pytest.fixture(scope="module")
def api_schema(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app, headers=AUTH)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def _valid_tracker(name: str, value) -> bool:
    from pydantic import ValidationError

    from stalwart.spec import Monitoring

    try:
        Monitoring.model_validate({name: value})
        return True
    except ValidationError:
        return False


@pytest.mark.parametrize("method,path", OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_fuzz_no_5xx_and_refusals_change_nothing(api_schema, client, fuzz_dir, method, path):
    from hypothesis import given
    from hypothesis import strategies as st
    from schemathesis.generation.modes import GenerationMode
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    operation = api_schema[path][method]
    cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE))

    @given(case=cases)
    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None,
              derandomize=not FUZZ_RANDOM)
    def one(case):
        if path == "/v1/jobs" and method == "POST" and isinstance(case.body, dict):
            # A spec that passes may be queued, and its checkpoint location is checked at submit: keep that
            # in a temp folder rather than wherever the fuzzer points (or an S3 endpoint that never answers).
            # (What the schema refuses stays as the fuzzer made it, to be refused.)
            checkpoint = case.body.get("checkpoint")
            if isinstance(checkpoint, dict):
                if checkpoint.get("uri") is None or isinstance(checkpoint.get("uri"), str):
                    checkpoint["uri"] = str(fuzz_dir / "ckpt")
                if isinstance(checkpoint.get("resume_from"), str):
                    checkpoint.pop("resume_from")
            # Likewise trackers: they would write wherever the fuzzer points, or wait on a server that never
            # answers. Only those the spec accepts go: an invalid one stays, to be refused (popping it would
            # make a case the fuzzer meant to be refused valid, and its acceptance a failure).
            monitoring = case.body.get("monitoring")
            if isinstance(monitoring, dict):
                for tracker in ("tensorboard", "mlflow", "wandb"):
                    if tracker in monitoring and _valid_tracker(tracker, monitoring[tracker]):
                        monitoring.pop(tracker)
        before = snapshot(client)
        response = case.call(headers=AUTH)
        assert response.status_code < 500, (response.status_code, response.text[:500])
        if response.status_code >= 400:
            assert snapshot(client) == before, f"a refused {method} {case.formatted_path} changed the jobs"
        # A spec that fits the schema is still refused when this cluster cannot hold it, or when its
        # parts disagree (min_workers over workers, say): no schema says that, so that check is left out.
        submit = path == "/v1/jobs" and method == "POST"
        case.validate_response(response, headers=AUTH, excluded_checks=[positive_data_acceptance] if submit else None)

    one()


# ---- the HTTP client and the CLI over a real server ---------------------------------------------
@pytest.fixture(scope="module")
def server_url(app):
    import uvicorn

    from stalwart._net import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, log_level="warning",
                                           access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, timeout=30)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_http_client_has_the_ray_clients_answers(server_url, client, tmp_path):
    import stalwart

    http = stalwart.Client(server=server_url, token=TOKEN)
    assert type(http).__name__ == "HttpClient"
    # The job's folder travels with it: a module of its own, in a folder that is gone once submitted.
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / "mine.py").write_text("def main(ctx, config):\n    print('from the package')\n")
    (folder / "job.yaml").write_text(yaml.safe_dump({"name": "mine", "entrypoint": "mine:main",
                                                     "resources": {"workers": 1, "cpus_per_worker": 1}}))
    job = http.submit(folder / "job.yaml", submission_id="http-1")
    assert http.submit(folder / "job.yaml", submission_id="http-1").id == job.id
    assert http.job_spec(job.id)["runtime_env"]["working_dir"].startswith(protocol.PACKAGE_URI_PREFIX)
    with pytest.raises(SubmissionConflict):
        http.submit(job_spec("testjobs:linear", workers=1), submission_id="http-1")

    assert [(j["id"], j["state"]) for j in http.jobs()] == [(j["id"], j["state"]) for j in client.jobs()]
    ours, theirs = http.status(job.id), client.status(job.id)
    assert {k: ours[k] for k in ("id", "state", "attempts", "log_path", "checkpoint_uri")} == \
           {k: theirs[k] for k in ("id", "state", "attempts", "log_path", "checkpoint_uri")}
    assert http.events(job.id) == client.events(job.id)
    assert http.read_logs(job.id) == client.read_logs(job.id)
    assert http.metrics(job.id) == client.metrics(job.id) == []
    assert http.checkpoints(job.id) == client.checkpoints(job.id) == []
    assert http.metrics_endpoint() == client.metrics_endpoint()
    with pytest.raises(JobNotFound):
        http.status("nope-000000")
    with pytest.raises(SpecError):
        http.submit(job_spec("testjobs:linear", workers=1, resources={"workers": 0}))
    assert http.cancel(job.id) == "CANCELLING"
    assert job.wait(timeout=30, raise_on_failure=False)["state"] == "CANCELLED"
    assert list(job.follow_logs()) == []  # streamed, and over once the job is
    http.close()


def test_cli_over_http_prints_what_it_prints_over_ray(server_url, api, monkeypatch):
    from typer.testing import CliRunner

    from stalwart.cli import app

    job_id = api.post("/v1/jobs", json=queued_spec(), headers=AUTH).json()["id"]
    api.post(f"/v1/jobs/{job_id}/cancel", headers=AUTH)
    wait_for(lambda: api.get(f"/v1/jobs/{job_id}", headers=AUTH).json()["state"] == "CANCELLED", timeout=30)
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv(protocol.TOKEN_ENV, TOKEN)
    runner = CliRunner()
    for args in (["list", "--json"], ["status", job_id, "--json"], ["events", job_id], ["logs", job_id],
                 ["checkpoints", "list", job_id, "--json"]):
        over_ray = runner.invoke(app, args)
        over_http = runner.invoke(app, ["--server", server_url, *args])
        assert over_ray.exit_code == over_http.exit_code == 0, (args, over_ray.output, over_http.output)
        assert over_http.output == over_ray.output, args
    missing = runner.invoke(app, ["--server", server_url, "status", "nope-000000"])
    assert missing.exit_code == 1 and "nope-000000" in missing.output
    monkeypatch.setenv(protocol.TOKEN_ENV, "wrong")
    refused = runner.invoke(app, ["--server", server_url, "list"])
    assert refused.exit_code == 1 and "refused the token" in refused.output and TOKEN not in refused.output


def test_status_polls_that_come_together_go_together_and_each_gets_its_answer(api, client):
    import asyncio

    ids = [api.post("/v1/jobs", json=queued_spec(), headers=AUTH).json()["id"] for _ in range(3)]

    async def many():
        aio = client.aio
        sent = []
        real = aio._call

        async def counted(method, *args, **kwargs):
            sent.append(method)
            return await real(method, *args, **kwargs)

        aio._call = counted
        answers = await asyncio.gather(*[aio.status(job_id) for job_id in ids * 5], aio.status("nope-000000"),
                                       return_exceptions=True)
        return answers, sent

    answers, sent = asyncio.run(many())
    assert [a["id"] for a in answers[:-1]] == ids * 5
    assert isinstance(answers[-1], JobNotFound) and answers[-1].job_id == "nope-000000"
    assert sent == ["statuses"]  # 16 polls, one trip to the controller


def test_https_with_the_servers_certificate(app, tmp_path, monkeypatch):
    import shutil
    import subprocess

    import uvicorn

    from stalwart._net import free_port
    from stalwart.client import HttpClient

    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make a certificate with")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, ssl_certfile=str(cert), ssl_keyfile=str(key),
                                           log_config=None, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, timeout=30)
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the client trusts the server's own certificate
        http = HttpClient(f"https://127.0.0.1:{port}", token=TOKEN)
        assert http.controller_info["api"] == "v1" and isinstance(http.jobs(), list)
        http.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_package_keeper_pins_what_unfinished_jobs_use_and_forgets_the_rest(ray_local):
    store = PackageStore(ray_local)
    used, unused = zip_of({"a.py": b"a = 1\n"}), zip_of({"b.py": b"b = 2\n"})
    used_uri, unused_uri = store.put(used), store.put(unused)
    internal_kv._internal_kv_del(used_uri)  # as after a restart of the whole cluster
    now = time.time()
    store.keep({used_uri}, now=now)
    assert internal_kv._internal_kv_get(used_uri) == used  # put back from the durable copy
    assert (store.root / unused_uri.rsplit("/", 1)[1]).exists()  # used a moment ago: kept for now
    store.keep({used_uri}, now=now + 2 * 600)
    assert not (store.root / unused_uri.rsplit("/", 1)[1]).exists()
    assert (store.root / used_uri.rsplit("/", 1)[1]).exists()
