"""Output storage: the local folder and S3 (moto) behind one interface."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from moto import mock_aws

from pipeline.errors import ConfigError, InvalidKeyError, StorageError, StorageNotFound
from pipeline.io import local_storage as storage_mod
from pipeline.io.storage import HEX_SHARDS, LocalStorage, S3Storage, open_storage
from tests.conftest import served_moto

REPO = Path(__file__).resolve().parents[1]
# Built from parts so the source holds nothing shaped like a real key id.
FAKE_KEY_ID = "AKIA" + "FAKEKEYID1234567"
FAKE_SECRET = "fake/secret+key/do-not-print-0123456789"
BUCKET = "out"

BAD_KEYS = [
    "",
    "/etc/passwd",
    "../escape.txt",
    "a/../../escape.txt",
    "a/./b",
    "a//b",
    "a/",
    "a\\..\\b",
    "nul\x00byte",
    ".tmp-looks-like-a-temp-file",
]


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def s3(aws_env: None) -> Iterator[Any]:
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield client


@pytest.fixture
def local(tmp_path: Path) -> LocalStorage:
    st = open_storage(str(tmp_path / "out"))
    assert isinstance(st, LocalStorage)
    return st


@pytest.fixture(params=["local", "s3"])
def any_storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    if request.param == "local":
        yield open_storage(str(tmp_path / "out"))
    else:
        request.getfixturevalue("s3")
        yield open_storage(f"s3://{BUCKET}/run-1")


def _count_calls(st: S3Storage, operation: str) -> list[int]:
    calls: list[int] = []
    st.client.meta.events.register(
        f"before-call.s3.{operation}", lambda **_: calls.append(1), unique_id=f"count-{operation}"
    )
    return calls


# --- both implementations ------------------------------------------------------------------


def test_put_get_exists_list_delete(any_storage: Any) -> None:
    st = any_storage
    uri = st.put_bytes("jobs/ab/job-1.json", b'{"ok": true}', "application/json")
    assert uri == st.uri_for("jobs/ab/job-1.json")
    assert uri.startswith(st.root_uri + "/")
    st.put_bytes("jobs/cd/job-2.json", b"2")
    st.put_bytes("images/job-1/0.png", b"png")
    st.put_bytes("results.parquet", b"pq")

    assert st.get_bytes("jobs/ab/job-1.json") == b'{"ok": true}'
    assert st.exists("jobs/ab/job-1.json")
    assert not st.exists("jobs/ab/job-9.json")
    assert not st.exists("jobs")  # a "directory" is not a key
    assert sorted(st.list_keys("jobs/")) == ["jobs/ab/job-1.json", "jobs/cd/job-2.json"]
    assert sorted(st.list_keys("jobs/a")) == ["jobs/ab/job-1.json"]
    assert sorted(st.list_keys("")) == [
        "images/job-1/0.png",
        "jobs/ab/job-1.json",
        "jobs/cd/job-2.json",
        "results.parquet",
    ]
    assert list(st.list_keys("nothing/here/")) == []

    st.put_bytes("jobs/ab/job-1.json", b"overwritten")
    assert st.get_bytes("jobs/ab/job-1.json") == b"overwritten"

    st.delete("jobs/ab/job-1.json")
    assert not st.exists("jobs/ab/job-1.json")
    st.delete("jobs/ab/job-1.json")  # deleting an absent key is not an error
    with pytest.raises(StorageNotFound, match="not found"):
        st.get_bytes("jobs/ab/job-1.json")
    assert issubclass(StorageNotFound, StorageError)


def test_put_file(any_storage: Any, tmp_path: Path) -> None:
    src = tmp_path / "results.parquet"
    src.write_bytes(os.urandom(300_000))
    uri = any_storage.put_file("tables/results.parquet", src, "application/vnd.apache.parquet")
    assert uri == any_storage.uri_for("tables/results.parquet")
    assert any_storage.get_bytes("tables/results.parquet") == src.read_bytes()
    with pytest.raises(StorageError, match="cannot read"):
        any_storage.put_file("tables/missing.parquet", tmp_path / "missing.parquet")
    assert not any_storage.exists("tables/missing.parquet")


def test_keys_that_escape_the_root_are_refused(any_storage: Any, tmp_path: Path) -> None:
    st = any_storage
    for key in BAD_KEYS:
        for method, args in (
            (st.put_bytes, (key, b"x")),
            (st.get_bytes, (key,)),
            (st.exists, (key,)),
            (st.delete, (key,)),
            (st.uri_for, (key,)),
        ):
            with pytest.raises(InvalidKeyError):
                method(*args)
    assert list(any_storage.list_keys("")) == []
    assert not (tmp_path / "escape.txt").exists()


def test_bad_listing_prefixes_are_refused(any_storage: Any) -> None:
    for prefix in ("/abs", "../up", "a/../b", "a\\b", "a\x00"):
        with pytest.raises(ValueError):  # InvalidKeyError is a ValueError and a StorageError
            list(any_storage.list_keys(prefix))


def test_sharded_listing_returns_every_key_once(any_storage: Any) -> None:
    expected = set()
    for i in range(600):
        key = f"jobs/{HEX_SHARDS[i % 256]}/job-{i}.json"
        any_storage.put_bytes(key, b"{}")
        expected.add(key)
    any_storage.put_bytes("images/job-1.png", b"not a job")

    listed = list(any_storage.list_keys_sharded("jobs/"))
    assert len(listed) == len(expected)
    assert set(listed) == expected

    some = list(any_storage.list_keys_sharded("jobs/", shards=["00", "ff"], workers=2))
    assert sorted(some) == sorted(k for k in expected if k[5:7] in ("00", "ff"))


def test_sharded_listing_refuses_overlapping_shards(local: LocalStorage) -> None:
    with pytest.raises(InvalidKeyError, match="prefix of shard"):
        list(local.list_keys_sharded("jobs/", shards=["a", "ab"]))


def test_sharded_listing_can_stop_early(local: LocalStorage) -> None:
    for i in range(50):
        local.put_bytes(f"jobs/{HEX_SHARDS[i]}/x.json", b"{}")
    it = local.list_keys_sharded("jobs/", workers=4)
    first = next(it)
    assert first.startswith("jobs/")
    it.close()  # shuts the pool down; nothing left running


# --- local folder --------------------------------------------------------------------------


def test_local_roots_from_paths_and_file_uris(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    rel = open_storage("out")
    assert isinstance(rel, LocalStorage)
    assert rel.root_uri == str(tmp_path / "out")
    rel.put_bytes("a/b.txt", b"hello")
    via_uri = open_storage((tmp_path / "out").as_uri())
    assert via_uri.root_uri == str(tmp_path / "out")
    assert via_uri.get_bytes("a/b.txt") == b"hello"
    assert (tmp_path / "out" / "a" / "b.txt").read_bytes() == b"hello"
    assert open_storage("out:v1").root_uri == str(tmp_path / "out:v1")  # a colon is no scheme


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("", "empty output URI"),
        ("gs://bucket/x", "unsupported output URI scheme 'gs'"),
        ("https://example.invalid/out", "unsupported output URI scheme 'https'"),
        ("file://otherhost/x", "another host"),
    ],
)
def test_unusable_output_uris(uri: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        open_storage(uri)


def test_local_temp_files_are_never_listed(local: LocalStorage) -> None:
    local.put_bytes("jobs/ab/done.json", b"{}")
    (local.root / "jobs" / "ab" / ".tmp-abandoned").write_bytes(b"partial")
    assert list(local.list_keys("")) == ["jobs/ab/done.json"]
    assert list(local.list_keys_sharded("jobs/")) == ["jobs/ab/done.json"]


def test_local_written_files_get_normal_permissions(local: LocalStorage) -> None:
    local.put_bytes("a.txt", b"x")
    umask = os.umask(0o022)
    os.umask(umask)
    assert (local.root / "a.txt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_local_failed_write_leaves_nothing_and_keeps_the_old_value(
    local: LocalStorage, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    local.put_bytes("jobs/ab/x.json", b"old")

    def failing_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage_mod.os, "replace", failing_replace)
    with pytest.raises(StorageError, match="No space left on device"):
        local.put_bytes("jobs/ab/x.json", b"new")
    with pytest.raises(StorageError):
        local.put_bytes("jobs/ab/y.json", b"new")
    monkeypatch.undo()

    assert local.get_bytes("jobs/ab/x.json") == b"old"
    assert not local.exists("jobs/ab/y.json")
    assert sorted(p.name for p in (local.root / "jobs" / "ab").iterdir()) == ["x.json"]


def test_local_failure_mid_copy_leaves_no_file(
    local: LocalStorage, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    src = tmp_path / "big.bin"
    src.write_bytes(b"x" * 100_000)

    def half_copy(fsrc: Any, fdst: Any, length: int = 0) -> None:
        fdst.write(fsrc.read(50_000))
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(shutil, "copyfileobj", half_copy)
    with pytest.raises(StorageError, match="Input/output error"):
        local.put_file("tables/big.bin", src)
    assert not local.exists("tables/big.bin")
    assert list((local.root / "tables").iterdir()) == []


def test_local_sigkill_mid_write_never_shows_a_partial_file(local: LocalStorage) -> None:
    # The child stops just before the rename (as a SIGKILL at the worst moment would).
    child = textwrap.dedent(
        """
        import sys, time
        from pipeline.io import local_storage, storage

        def stuck(src, dst):
            print("written", flush=True)
            time.sleep(60)

        local_storage.os.replace = stuck
        storage.open_storage(sys.argv[1]).put_bytes("jobs/ab/x.json", b"y" * 100_000)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", child, local.root_uri],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "written"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
    leftovers = list((local.root / "jobs" / "ab").iterdir())
    assert [p.name[:5] for p in leftovers] == [".tmp-"]  # the partial write is only a temp
    assert not local.exists("jobs/ab/x.json")
    assert list(local.list_keys("")) == []
    with pytest.raises(StorageNotFound):
        local.get_bytes("jobs/ab/x.json")


def test_local_unwritable_root_is_a_storage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    st = open_storage(str(blocker / "out"))
    with pytest.raises(StorageError, match="cannot write"):
        st.put_bytes("a.txt", b"x")


# --- S3 --------------------------------------------------------------------------------------


def test_s3_content_type_and_layout(s3: Any) -> None:
    st = open_storage(f"s3://{BUCKET}/runs/r1/")
    assert isinstance(st, S3Storage)
    assert st.root_uri == f"s3://{BUCKET}/runs/r1"
    uri = st.put_bytes("images/a.png", b"\x89PNG", "image/png")
    assert uri == f"s3://{BUCKET}/runs/r1/images/a.png"
    head = s3.head_object(Bucket=BUCKET, Key="runs/r1/images/a.png")
    assert head["ContentType"] == "image/png"

    bare = open_storage(f"s3://{BUCKET}")
    assert bare.root_uri == f"s3://{BUCKET}"
    assert bare.uri_for("x/y") == f"s3://{BUCKET}/x/y"
    assert list(bare.list_keys("runs/")) == ["runs/r1/images/a.png"]


def test_s3_put_file_sets_content_type(s3: Any, tmp_path: Path) -> None:
    src = tmp_path / "t.parquet"
    src.write_bytes(b"PAR1" * 1000)
    st = open_storage(f"s3://{BUCKET}/p")
    st.put_file("results.parquet", src, "application/vnd.apache.parquet")
    head = s3.head_object(Bucket=BUCKET, Key="p/results.parquet")
    assert head["ContentType"] == "application/vnd.apache.parquet"
    assert head["ContentLength"] == 4000


def test_s3_listing_paginates(s3: Any) -> None:
    st = open_storage(f"s3://{BUCKET}/many")
    assert isinstance(st, S3Storage)
    for i in range(1005):
        s3.put_object(Bucket=BUCKET, Key=f"many/k/{i:05d}", Body=b"")
    calls = _count_calls(st, "ListObjectsV2")
    keys = list(st.list_keys("k/"))
    assert len(keys) == 1005
    assert len(set(keys)) == 1005
    assert keys[0] == "k/00000"
    assert len(calls) == 2  # 1000 + 5: pages, not a request per key


def test_s3_sharded_listing_is_one_call_when_small_else_one_per_shard(s3: Any) -> None:
    st = open_storage(f"s3://{BUCKET}/run")
    assert isinstance(st, S3Storage)
    for i in range(300):
        s3.put_object(Bucket=BUCKET, Key=f"run/jobs/{HEX_SHARDS[i % 256]}/{i}.json", Body=b"{}")
    s3.put_object(Bucket=BUCKET, Key="run/jobs/zz/outside-the-shards.json", Body=b"{}")
    calls = _count_calls(st, "ListObjectsV2")
    keys = list(st.list_keys_sharded("jobs/"))
    assert len(keys) == 300 == len(set(keys))
    assert len(calls) == 1  # one page held them all
    for i in range(300, 1100):
        s3.put_object(Bucket=BUCKET, Key=f"run/jobs/{HEX_SHARDS[i % 256]}/{i}.json", Body=b"{}")
    calls.clear()
    single_hex = sorted({h[0] for h in HEX_SHARDS})
    keys = list(st.list_keys_sharded("jobs/", shards=single_hex))
    assert len(keys) == 1100 == len(set(keys))
    assert "jobs/zz/outside-the-shards.json" not in keys
    assert len(calls) == 1 + len(single_hex)  # the probe, then the shards in parallel


def test_s3_missing_bucket_is_a_readable_error_without_credentials(aws_env: None) -> None:
    with mock_aws():
        st = open_storage("s3://no-such-bucket/prefix")
        errors = []
        for call in (
            lambda: st.put_bytes("a.json", b"{}"),
            lambda: st.get_bytes("a.json"),
            lambda: list(st.list_keys("")),
            lambda: list(st.list_keys_sharded("jobs/", workers=4)),
            lambda: st.delete("a.json"),
        ):
            with pytest.raises(StorageError) as info:
                call()
            errors.append(info.value)
    for exc in errors:
        assert not isinstance(exc, StorageNotFound)
        assert "bucket 'no-such-bucket' does not exist" in str(exc)
        assert FAKE_KEY_ID not in str(exc) and FAKE_SECRET not in str(exc)
        assert FAKE_KEY_ID not in repr(exc)


def test_s3_missing_key(s3: Any) -> None:
    st = open_storage(f"s3://{BUCKET}/p")
    with pytest.raises(StorageNotFound, match=f"not found: s3://{BUCKET}/p/nope.json"):
        st.get_bytes("nope.json")
    assert not st.exists("nope.json")


def test_s3_unreachable_endpoint_is_a_storage_error(aws_env: None) -> None:
    # One attempt only: the production client's retries would only make this test slow.
    client = boto3.client(
        "s3",
        endpoint_url="http://127.0.0.1:9",
        config=Config(retries={"max_attempts": 1}, connect_timeout=2),
    )
    st = S3Storage(BUCKET, "p", client)
    with pytest.raises(StorageError, match="Could not connect") as info:
        st.put_bytes("a.json", b"{}")
    assert FAKE_KEY_ID not in str(info.value)


@pytest.fixture(scope="module")
def moto_server() -> Iterator[str]:
    with served_moto() as endpoint:
        yield endpoint


@pytest.mark.integration
def test_s3_endpoint_url_is_the_switch(
    aws_env: None, moto_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    boto3.client("s3", endpoint_url=moto_server).create_bucket(Bucket="served")
    st = open_storage("s3://served/run", endpoint_url=moto_server)
    st.put_bytes("jobs/ab/a.json", b"{}", "application/json")
    assert st.get_bytes("jobs/ab/a.json") == b"{}"
    assert list(st.list_keys_sharded("jobs/")) == ["jobs/ab/a.json"]

    # The same URI through AWS_ENDPOINT_URL_S3 reaches the same server.
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_server)
    via_env = open_storage("s3://served/run")
    assert via_env.exists("jobs/ab/a.json")
    via_env.delete("jobs/ab/a.json")
    assert not st.exists("jobs/ab/a.json")
