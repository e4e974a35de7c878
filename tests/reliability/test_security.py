"""Least privilege for readers, TLS that verifies the server, and no password in anything a run leaves behind."""

import logging
import shutil
import socket
import subprocess
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path
from urllib.parse import quote

import polars as pl
import prefect.settings
import pytest
import redis

from flows import inference_flow as inference_module
from inference import publish, serving
from recsys.stores import connect_redis
from tests.helpers import publish_recommendations
from tests.reliability.conftest import AS_OF, start_redis
from tests.reliability.services import dump_redis, free_port, redis_server_binary, wait_for

pytestmark = pytest.mark.reliability

PREFIX = "recs"
READER_ACL = ["reader", "on", ">reader-pw", "resetkeys", f"~{PREFIX}:*", "resetchannels", "-@all", "+get",
              "+hgetall", "+@connection"]  # fmt: skip


@pytest.fixture
def acl_redis(redis_servers, tmp_path):
    """A password-protected Redis holding one publication, with a `reader` ACL user for client apps."""
    server = start_redis(redis_servers, tmp_path, password="admin-pw")
    admin = server.client()
    admin.execute_command("ACL", "SETUSER", *READER_ACL)
    recs = pl.DataFrame({"user_id": [1, 2]}).with_columns(items=pl.lit([7, 8, 9]).cast(pl.List(pl.Int64)))
    metadata = {"model_version": "ranker:3", "generated_at": "2025-03-03T05:00:00", "n": 3, "fallback_user_count": 0}
    for as_of in (AS_OF - timedelta(weeks=1), AS_OF):  # a previous version too, so rollback has a target
        publish_recommendations(admin, PREFIX, as_of, recs, [4, 5], metadata)
    admin.set("billing:secret", "not for readers")
    return server


def test_reader_user_reads_recommendations_and_can_write_nothing(acl_redis):
    reader = connect_redis(acl_redis.url(user="reader", password="reader-pw"))
    before = dump_redis(acl_redis.url())

    known, unknown = serving.get_recommendations(reader, PREFIX, [2, 99])

    assert (known.items, known.is_fallback, unknown.items, unknown.is_fallback) == ([7, 8, 9], False, [4, 5], True)
    assert known.model_version == "ranker:3"
    recs = pl.DataFrame({"user_id": [1]}).with_columns(items=pl.lit([1]).cast(pl.List(pl.Int64)))
    metadata = {"model_version": "evil", "generated_at": "x", "n": 1, "fallback_user_count": 0}
    with pytest.raises(publish.PublishError, match="no permissions"):
        publish_recommendations(reader, PREFIX, date(2025, 3, 10), recs, [1], metadata)
    writes = [
        lambda: reader.set(serving.KeySpace(PREFIX).live, "20250310-000009"),
        lambda: reader.delete(f"{PREFIX}:{known.version}:u:2"),
        lambda: reader.hset(serving.KeySpace(PREFIX).meta(known.version), "status", "removing"),
        lambda: publish.rollback(reader, PREFIX),
        reader.flushdb,
        lambda: reader.config_set("maxmemory", 1),
        lambda: reader.get("billing:secret"),
        lambda: list(reader.scan_iter(match="*")),
    ]
    for attempt in writes:
        with pytest.raises(redis.exceptions.NoPermissionError, match="(?i)no permissions"):
            attempt()
    assert dump_redis(acl_redis.url()) == before
    with pytest.raises(redis.AuthenticationError, match="invalid username-password pair"):
        connect_redis(acl_redis.url(user="reader", password="guess")).ping()


def record_text(record: logging.LogRecord) -> str:
    """The message and any traceback, as a handler would write them."""
    trace = logging.Formatter().formatException(record.exc_info) if record.exc_info else ""
    return f"{record.getMessage()}\n{trace}"


def prefect_database_files() -> list[Path]:
    url = prefect.settings.PREFECT_SERVER_DATABASE_CONNECTION_URL.value()
    database = Path(url.split("///", 1)[1])
    return [path for path in database.parent.glob(database.name + "*") if path.is_file()]


def test_no_password_reaches_logs_artifacts_or_the_prefect_database(trained_template, publishing, job_secrets, caplog):
    """Every flow of the job ran with passwords in both URLs: the template's features and training,
    the fixture's publication, and here a publication and a run that fails on a dead Redis."""
    _, server, _, _ = publishing
    caplog.set_level(logging.DEBUG)

    inference_module.inference_flow(as_of=AS_OF)
    server.kill()
    failed = inference_module.inference_flow(as_of=AS_OF, return_state=True)

    assert failed.is_failed()
    assert job_secrets.found_in(trained_template.logs) == []
    logged = "\n".join(map(record_text, caplog.records))
    assert "connecting to 127.0.0.1" in logged, "the failed run's error should be in the logs"
    assert job_secrets.found_in(logged) == []
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts()
    assert artifacts and job_secrets.found_in("\n".join(str(a.data) for a in artifacts)) == []
    for path in prefect_database_files():
        data = path.read_bytes()
        leaked = [name for name, value in (("postgres", job_secrets.postgres), ("redis", job_secrets.redis))
                  if value.encode() in data]  # fmt: skip
        assert leaked == [], f"{path} holds the {leaked} password"


def make_certificates(folder: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1/localhost signed by it (openssl CLI)."""
    files = {name: folder / f"{name}.pem" for name in ("ca", "ca-key", "server", "server-key", "other-ca", "other-key")}
    san = folder / "san.cnf"
    san.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    for ca, key in (("ca", "ca-key"), ("other-ca", "other-key")):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN=test {ca}",
                "-keyout", str(files[key]), "-out", str(files[ca]))  # fmt: skip
    request = folder / "server.csr"
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
            "-keyout", str(files["server-key"]), "-out", str(request))  # fmt: skip
    openssl("x509", "-req", "-in", str(request), "-CA", str(files["ca"]), "-CAkey", str(files["ca-key"]),
            "-CAcreateserial", "-days", "2", "-extfile", str(san), "-out", str(files["server"]))  # fmt: skip
    return files


@pytest.fixture
def tls_redis(tmp_path: Path, job_secrets) -> Iterator[tuple[int, dict[str, Path]]]:
    """A redis-server speaking only TLS (password required) on a free port; its port and certificates."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not on PATH: cannot make test certificates")
    files = make_certificates(tmp_path)
    port = free_port()
    process = subprocess.Popen(
        [redis_server_binary("tls-port"), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(files["server"]), "--tls-key-file", str(files["server-key"]),
         "--tls-ca-cert-file", str(files["ca"]), "--tls-auth-clients", "no",
         "--requirepass", job_secrets.redis, "--save", "", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(lambda: _port_open(port), f"TLS redis-server on port {port}", timeout=20)
        yield port, files
    finally:
        process.kill()
        process.wait(timeout=10)


def _port_open(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_rediss_url_publishes_and_reads_over_verified_tls_and_refuses_an_unknown_ca(tls_redis, job_secrets):
    port, files = tls_redis
    password = quote(job_secrets.redis, safe="")
    url = f"rediss://:{password}@localhost:{port}/0?ssl_ca_certs={files['ca']}&ssl_cert_reqs=required"
    client = connect_redis(url)
    recs = pl.DataFrame({"user_id": [1, 2]}).with_columns(items=pl.lit([7, 8, 9]).cast(pl.List(pl.Int64)))
    metadata = {"model_version": "ranker:3", "generated_at": "2025-03-03T05:00:00", "n": 3, "fallback_user_count": 0}

    result = publish_recommendations(client, PREFIX, AS_OF, recs, [4, 5], metadata)

    known, unknown = serving.get_recommendations(client, PREFIX, [2, 99])
    assert (known.version, known.items, unknown.items, unknown.is_fallback) == (result.version, [7, 8, 9], [4, 5], True)
    assert client.connection_pool.connection_class is redis.SSLConnection
    untrusted = url.replace(str(files["ca"]), str(files["other-ca"]))
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        connect_redis(untrusted).ping()
    with pytest.raises(redis.ConnectionError):
        connect_redis(f"redis://:{password}@localhost:{port}/0").ping()  # plain text to a TLS-only port
