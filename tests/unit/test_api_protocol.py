"""What the REST API's two ends share, without a server: the code package, the token file, and the
store's submission ids (a store written before they existed gains the column)."""

import io
import os
import sqlite3
import stat
import zipfile

import pytest

from stalwart.api import protocol
from stalwart.orchestrator.store import Store


def test_a_folder_packs_to_the_same_bytes_without_caches_or_hidden_folders(tmp_path):
    (tmp_path / "train.py").write_text("def main(ctx, config):\n    pass\n")
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "model.py").write_text("x = 1\n")
    for junk in ("__pycache__/train.cpython-311.pyc", ".git/config", ".venv/bin/python", "lib/model.pyc"):
        (tmp_path / junk).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / junk).write_text("junk")
    first = protocol.pack(tmp_path)
    assert protocol.pack(tmp_path) == first  # one folder, one content address
    assert sorted(zipfile.ZipFile(io.BytesIO(first)).namelist()) == ["lib/model.py", "train.py"]
    protocol.check_package(first, limit=1 << 20)
    assert protocol.package_uri(first).startswith(protocol.PACKAGE_URI_PREFIX)
    (tmp_path / "train.py").write_text("changed\n")
    assert protocol.package_uri(protocol.pack(tmp_path)) != protocol.package_uri(first)


def test_a_folder_over_the_limit_is_refused_before_it_is_sent(tmp_path):
    (tmp_path / "data.bin").write_bytes(os.urandom(256 << 10))  # does not compress
    with pytest.raises(protocol.TooLarge) as exc:
        protocol.pack(tmp_path, limit=64 << 10)
    assert exc.value.problems[0][0] == "workdir" and protocol.PACKAGE_LIMIT_ENV in str(exc.value)
    with pytest.raises(Exception, match="not a folder"):
        protocol.pack(tmp_path / "missing")


def test_the_token_is_made_once_readable_by_its_owner_only(tmp_path, monkeypatch):
    monkeypatch.delenv(protocol.TOKEN_ENV, raising=False)
    token, path = protocol.ensure_token(tmp_path)
    assert path == tmp_path / "api-token" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(token) >= 40 and protocol.ensure_token(tmp_path) == (token, path)
    assert protocol.read_token(tmp_path) == token
    monkeypatch.setenv(protocol.TOKEN_ENV, "from-the-environment")
    assert protocol.ensure_token(tmp_path) == ("from-the-environment", None)
    assert protocol.read_token(tmp_path) == "from-the-environment"
    assert protocol.token_digest("a") != protocol.token_digest("b") and len(protocol.token_digest("a")) == 32


def test_loopback_is_told_apart(monkeypatch):
    assert protocol.is_loopback("127.0.0.1") and protocol.is_loopback("::1") and protocol.is_loopback("localhost")
    assert not protocol.is_loopback("0.0.0.0") and not protocol.is_loopback("10.0.0.1")
    assert not protocol.is_loopback("head.example.com")
    monkeypatch.setenv(protocol.PORT_ENV, "not-a-port")
    with pytest.raises(Exception, match=protocol.PORT_ENV):
        protocol.default_port()


def test_a_store_from_before_submission_ids_gains_them(tmp_path):
    old = sqlite3.connect(tmp_path / "controller.db")
    old.executescript("""
        CREATE TABLE jobs (id TEXT PRIMARY KEY, name TEXT NOT NULL, spec TEXT NOT NULL, state TEXT NOT NULL,
                           detail TEXT NOT NULL DEFAULT '{}', created REAL NOT NULL, updated REAL NOT NULL);
        INSERT INTO jobs VALUES ('old-000001', 'old', '{}', 'SUCCEEDED', '{}', 1.0, 1.0);
    """)
    old.close()
    store = Store(tmp_path)
    assert store.job("old-000001")["state"] == "SUCCEEDED"
    store.add_job("new-000001", "new", {"name": "new"}, "PENDING", {}, submission_id="sub-1")
    assert store.job_by_submission("sub-1")["id"] == "new-000001"
    assert store.job_by_submission("sub-2") is None
    with pytest.raises(sqlite3.IntegrityError):  # one submission id, one job
        store.add_job("new-000002", "new", {"name": "new"}, "PENDING", {}, submission_id="sub-1")
    assert [j["id"] for j in store.jobs()] == ["old-000001", "new-000001"]
