"""Tests for scripts/download_data.py.

Everything is served by a local ``http.server`` on 127.0.0.1; the internet is
never touched (an autouse fixture makes any non-local urlopen fail the test).
"""

from __future__ import annotations

import hashlib
import http.server
import importlib.util
import os
import socket
import subprocess
import sys
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "scripts" / "download_data.py"


def _load_script() -> ModuleType:
    """Import scripts/download_data.py as a module (it is not part of a package)."""
    spec = importlib.util.spec_from_file_location("download_data", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


dd = _load_script()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


class LocalServer:
    """A threaded HTTP server on 127.0.0.1 serving ``root``; records request paths."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[str] = []
        requests = self.requests

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, directory=str(root), **kwargs)

            def do_GET(self) -> None:  # noqa: N802 (http.server naming)
                requests.append(self.path)
                super().do_GET()

            def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> LocalServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LocalServer]:
    root = tmp_path / "served"
    root.mkdir()
    with LocalServer(root) as srv:
        yield srv


@pytest.fixture(autouse=True)
def _no_internet(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly if the code under test tries to reach anything but localhost."""
    real_urlopen = urllib.request.urlopen

    def guarded(request: Any, *args: Any, **kwargs: Any) -> Any:
        url = request.full_url if isinstance(request, urllib.request.Request) else str(request)
        host = urllib.parse.urlsplit(url).hostname
        assert host in ("127.0.0.1", "localhost"), f"test tried to reach the network: {url}"
        return real_urlopen(request, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", guarded)
    monkeypatch.delenv(dd.BASE_URL_ENV, raising=False)


def _serve_shakespeare(server: LocalServer, monkeypatch: pytest.MonkeyPatch, checksum: str | None = None) -> bytes:
    """Put a small input.txt on the server and make the checksum table expect it."""
    payload = b"First Citizen:\nBefore we proceed any further, hear me speak.\n" * 50
    (server.root / "input.txt").write_bytes(payload)
    monkeypatch.setitem(dd.SHA256["tinyshakespeare"], "input.txt", checksum or _sha256(payload))
    return payload


def _free_port() -> int:
    """A port on 127.0.0.1 that nothing is listening on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != dd.BASE_URL_ENV}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


# --------------------------------------------------------------------------- tables


def test_tables_are_consistent() -> None:
    assert set(dd.CORPORA) == set(dd.SHA256) == {"tinyshakespeare", "ptb", "ptb_char", "wikitext-2"}
    for name, files in dd.CORPORA.items():
        assert set(files) == set(dd.SHA256[name]), name
        for filename, urls in files.items():
            assert urls and all(u.startswith("https://") for u in urls), (name, filename)
            assert len(dd.SHA256[name][filename]) == 64
    assert set(dd.CORPORA["tinyshakespeare"]) == {"input.txt"}
    for name in ("ptb", "ptb_char", "wikitext-2"):
        assert set(dd.CORPORA[name]) == {"train.txt", "valid.txt", "test.txt"}


def test_upstream_basenames_do_not_collide() -> None:
    """--base-url maps URLs to BASE/<basename>, so two different files must not share a basename."""
    owner: dict[str, tuple[str, str]] = {}
    for name, files in dd.CORPORA.items():
        for filename, urls in files.items():
            for url in urls:
                base = url.rsplit("/", 1)[1]
                assert owner.setdefault(base, (name, filename)) == (name, filename), base


def test_resolve_urls() -> None:
    urls = ["https://a.example/x/ptb.train.txt", "https://b.example/y/ptb.train.txt"]
    assert dd.resolve_urls(urls, None) == urls
    assert dd.resolve_urls(urls, "http://127.0.0.1:9/mirror/") == ["http://127.0.0.1:9/mirror/ptb.train.txt"]


def test_default_dest_is_repo_data_dir() -> None:
    assert dd.DEFAULT_DEST == REPO_ROOT / "data"


# --------------------------------------------------------------------------- downloads


def test_download_success(tmp_path: Path, server: LocalServer, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = _serve_shakespeare(server, monkeypatch)
    dest = tmp_path / "data"

    corpus_dir = dd.download("tinyshakespeare", dest, base_url=server.url)

    assert corpus_dir == dest / "tinyshakespeare"
    assert (corpus_dir / "input.txt").read_bytes() == payload
    assert _files_under(dest) == [corpus_dir / "input.txt"]  # no temp files left over
    umask = os.umask(0)
    os.umask(umask)
    assert (corpus_dir / "input.txt").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    assert server.requests == ["/input.txt"]


def test_multi_file_corpus_is_renamed(tmp_path: Path, server: LocalServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """ptb's upstream ptb.<split>.txt files end up as <split>.txt."""
    for split in ("train", "valid", "test"):
        data = f"{split} sentence <unk> N\n".encode() * 10
        (server.root / f"ptb.{split}.txt").write_bytes(data)
        monkeypatch.setitem(dd.SHA256["ptb"], f"{split}.txt", _sha256(data))

    corpus_dir = dd.download("ptb", tmp_path, base_url=server.url)

    for split in ("train", "valid", "test"):
        assert (corpus_dir / f"{split}.txt").read_bytes() == f"{split} sentence <unk> N\n".encode() * 10
    # Both source URLs map to the same mirror URL, so each file is fetched once.
    assert sorted(server.requests) == ["/ptb.test.txt", "/ptb.train.txt", "/ptb.valid.txt"]


def test_checksum_mismatch_leaves_nothing(tmp_path: Path, server: LocalServer, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = _serve_shakespeare(server, monkeypatch, checksum="0" * 64)
    dest = tmp_path / "data"

    with pytest.raises(dd.ChecksumError) as info:
        dd.download("tinyshakespeare", dest, base_url=server.url)

    message = str(info.value)
    assert "input.txt" in message and "0" * 64 in message and _sha256(payload) in message
    assert server.requests == ["/input.txt"]
    assert _files_under(dest) == []  # neither the target nor a partial/temp file


def test_checksum_mismatch_cli_message(
    tmp_path: Path, server: LocalServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    payload = _serve_shakespeare(server, monkeypatch, checksum="f" * 64)

    rc = dd.main(["tinyshakespeare", "--dest", str(tmp_path / "d"), "--base-url", server.url])

    err = capsys.readouterr().err.strip()
    assert rc == 1
    assert len(err.splitlines()) == 1
    assert "input.txt" in err and "f" * 64 in err and _sha256(payload) in err
    assert _files_under(tmp_path / "d") == []


def test_existing_good_file_is_skipped(tmp_path: Path, server: LocalServer, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = _serve_shakespeare(server, monkeypatch)
    target = tmp_path / "tinyshakespeare" / "input.txt"
    target.parent.mkdir()
    target.write_bytes(payload)
    os.utime(target, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    before = target.stat().st_mtime_ns

    dd.download("tinyshakespeare", tmp_path, base_url=server.url)

    assert server.requests == []
    assert target.stat().st_mtime_ns == before


def test_force_downloads_again(tmp_path: Path, server: LocalServer, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = _serve_shakespeare(server, monkeypatch)
    target = tmp_path / "tinyshakespeare" / "input.txt"
    target.parent.mkdir()
    target.write_bytes(payload)

    dd.download("tinyshakespeare", tmp_path, base_url=server.url, force=True)

    assert server.requests == ["/input.txt"]
    assert target.read_bytes() == payload


def test_existing_bad_file_is_replaced(tmp_path: Path, server: LocalServer, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = _serve_shakespeare(server, monkeypatch)
    target = tmp_path / "tinyshakespeare" / "input.txt"
    target.parent.mkdir()
    target.write_bytes(b"truncated")

    dd.download("tinyshakespeare", tmp_path, base_url=server.url)

    assert server.requests == ["/input.txt"]
    assert target.read_bytes() == payload


def test_fallback_url_used_when_first_fails(tmp_path: Path, server: LocalServer) -> None:
    data = b"hello mirror\n"
    (server.root / "good.txt").write_bytes(data)
    target = tmp_path / "c" / "f.txt"

    assert dd.download_file(target, [f"{server.url}/missing.txt", f"{server.url}/good.txt"], _sha256(data))

    assert target.read_bytes() == data
    assert server.requests == ["/missing.txt", "/good.txt"]


def test_http_404_is_a_network_error(tmp_path: Path, server: LocalServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(dd.SHA256["tinyshakespeare"], "input.txt", "0" * 64)  # nothing is served at all

    with pytest.raises(dd.NetworkError, match="404"):
        dd.download("tinyshakespeare", tmp_path / "d", base_url=server.url)
    assert _files_under(tmp_path / "d") == []
    assert not (tmp_path / "d" / "tinyshakespeare").exists()  # the empty dir it created is removed


def test_cli_success_with_env_base_url(
    tmp_path: Path, server: LocalServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    payload = _serve_shakespeare(server, monkeypatch)
    monkeypatch.setenv(dd.BASE_URL_ENV, server.url)

    rc = dd.main(["tinyshakespeare", "--dest", str(tmp_path)])

    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "tinyshakespeare" / "input.txt").read_bytes() == payload
    assert "input.txt" in capsys.readouterr().out  # progress lines name the file


def test_unknown_name_exits_2(tmp_path: Path) -> None:
    result = _run_cli("tinyshakespeare", "no-such-corpus", "--dest", str(tmp_path / "d"), cwd=tmp_path)

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "no-such-corpus" in result.stderr
    for name in ("tinyshakespeare", "ptb", "ptb_char", "wikitext-2"):
        assert name in result.stderr
    assert not (tmp_path / "d").exists()  # validated before anything is downloaded


def test_network_error_exits_1_without_traceback(tmp_path: Path) -> None:
    port = _free_port()
    dest = tmp_path / "d"

    result = _run_cli(
        "tinyshakespeare", "--dest", str(dest), "--base-url", f"http://127.0.0.1:{port}", "--timeout", "5", cwd=tmp_path
    )

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
    assert f"127.0.0.1:{port}" in err[0] and "input.txt" in err[0]
    assert _files_under(dest) == []


# --------------------------------------------------------------------------- real checksums


def _shared_data_dir() -> Path | None:
    """An offline copy of the real corpora (laid out like data/), if this machine has one."""
    candidates = [os.environ.get("RNNLM_SHARED_DATA"), REPO_ROOT / "shared" / "data", REPO_ROOT.parent / "shared" / "data"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "tinyshakespeare" / "input.txt").is_file():
            return Path(candidate)
    return None


@pytest.mark.skipif(_shared_data_dir() is None, reason="no offline copy of the corpora (set RNNLM_SHARED_DATA)")
def test_real_checksums_end_to_end(tmp_path: Path, server: LocalServer) -> None:
    """Mirror the real files under their upstream names and download everything with the real checksums."""
    shared = _shared_data_dir()
    assert shared is not None
    for name, files in dd.CORPORA.items():
        for filename, urls in files.items():
            (server.root / urls[0].rsplit("/", 1)[1]).symlink_to(shared / name / filename)

    assert dd.main(["--dest", str(tmp_path / "data"), "--base-url", server.url]) == 0

    for name, files in dd.SHA256.items():
        for filename, expected in files.items():
            assert dd.sha256_of(tmp_path / "data" / name / filename) == expected, (name, filename)


def test_a_missing_downloadable_corpus_says_how_to_get_it(tmp_path, monkeypatch):
    """rnnlm's "not found" hint names exactly the corpora the download script knows."""
    from rnnlm import data as D
    from rnnlm.config import build_config
    from rnnlm.errors import UsageError
    assert list(D._DOWNLOADABLE) == list(dd.CORPORA)
    monkeypatch.chdir(tmp_path)
    cfg = build_config(REPO_ROOT / "configs" / "shakespeare-char.yaml")
    with pytest.raises(UsageError, match="python scripts/download_data.py tinyshakespeare"):
        D.load_corpus(cfg.data, cfg.resolved_eos())
    with pytest.raises(UsageError) as e:
        D.load_corpus(build_config(None, ["data.path=nowhere.txt"]).data, "line")
    assert "download_data" not in str(e.value)
