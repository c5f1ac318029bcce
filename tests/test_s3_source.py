"""Recipients in S3: read through the streaming body, never whole, and the same object twice."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from smartmail import RecipientSource, SourceSpec
from smartmail.errors import SourceError

from .conftest import free_port

CREDS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in CREDS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


def test_s3_rows_match_a_local_read(aws_env: None, tmp_path: Path) -> None:
    text = "email,name\nann@x.org,Ann\nbjorn@x.org,Björn\n"
    with mock_aws():
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="lists")
        s3.put_object(Bucket="lists", Key="june/r.csv", Body=text.encode())
        source = RecipientSource(SourceSpec("s3://lists/june/r.csv"), s3_client=s3)
        got = [row.values for row, _ in source.rows()]
        # A second pass (pre-flight, then send) reads the same object again.
        assert [row.values for row, _ in source.rows()] == got
    assert got == [{"email": "ann@x.org", "name": "Ann"}, {"email": "bjorn@x.org", "name": "Björn"}]


def test_missing_object_is_a_one_line_error(aws_env: None) -> None:
    with mock_aws():
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="lists")
        source = RecipientSource(SourceSpec("s3://lists/nope.csv"), s3_client=s3)
        with pytest.raises(SourceError) as err:
            list(source.rows())
    assert str(err.value).startswith("s3://lists/nope.csv: cannot read from S3: NoSuchKey")


def test_object_changed_between_passes_is_refused(aws_env: None) -> None:
    with mock_aws():
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="lists")
        s3.put_object(Bucket="lists", Key="r.csv", Body=b"email\na@x.org\n")
        source = RecipientSource(SourceSpec("s3://lists/r.csv"), s3_client=s3)
        list(source.rows())
        s3.put_object(Bucket="lists", Key="r.csv", Body=b"email\nb@x.org\n")
        with pytest.raises(SourceError, match="PreconditionFailed"):
            list(source.rows())


@pytest.fixture
def moto_process() -> Iterator[str]:
    """A moto server in its own process, so this process's memory counts only the client."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                import urllib.request

                urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("moto server did not start within 30 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.slow
def test_large_object_is_streamed_not_read_whole(aws_env: None, moto_process: str) -> None:
    s3 = boto3.client("s3", endpoint_url=moto_process)
    s3.create_bucket(Bucket="big")
    line = "someone{:07d}@example.org,Some Body {:07d},C{:07d}\n"
    body = ("email,name,code\n" + "".join(line.format(i, i, i) for i in range(200_000))).encode()
    assert len(body) > 10_000_000
    s3.put_object(Bucket="big", Key="r.csv", Body=body)
    del body
    source = RecipientSource(SourceSpec("s3://big/r.csv"), s3_client=s3)
    count = 0
    tracemalloc.start()
    try:
        for row, _ in source.rows():
            count += 1
            assert row.values["email"]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 200_000
    # A whole read of the 10 MB object would show at least 10 MB here.
    assert peak < 2_000_000, f"peak {peak / 1e6:.1f} MB while reading a 10 MB object"


def test_environment_is_clean_of_real_credentials() -> None:
    # Guard: tests must never talk to real AWS; moto fixtures set fake keys themselves.
    assert os.environ.get("AWS_ACCESS_KEY_ID") in (None, "testing")
