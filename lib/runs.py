"""The run folder: its layout, its checks, and writes that never leave a half-written file behind.

    runs/<run_name>/
        run_config.json    the settings the run started with (a rerun must match them to resume)
        checkpoints/       resumable trainer checkpoints
        adapter/           the finished adapter + tokenizer + run_record.json (appears complete or not at all)
        run_record.json    config, metrics, loss history, timings, versions
        metrics.json       base vs adapter evaluation
        *.png              loss curve and metric chart
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from lib.config import ConfigError, RunConfig

ADAPTER, CHECKPOINTS = "adapter", "checkpoints"
RUN_CONFIG, RUN_RECORD, METRICS = "run_config.json", "run_record.json", "metrics.json"
STAGING_PREFIX = ".staging-"
LOCK_NAME_MAX_BYTES = 240  # longer run names get a hashed lock file name
# Settings that may differ between an interrupted run and the rerun that resumes it.
RESUMABLE_CHANGES = ("overwrite", "tracking")


# Write failures that more space (or another folder) cures, rather than a bug: disk full, quota,
# a file over the size limit, a file system gone read-only, an I/O error.
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO)


class StorageError(RuntimeError):
    """Writing the run's files failed for want of space (or a writable disk); names the folder, the space
    the run needs and the space there is. Partial files were removed; complete checkpoints are kept."""

    def __init__(self, folder: Path, cause: OSError, needed_bytes: int):
        self.folder, self.needed_bytes = Path(folder), needed_bytes
        free = free_bytes(self.folder)
        what = {errno.EFBIG: "a file grew past this system's file-size limit (ulimit -f); raise the limit or",
                errno.EROFS: "the file system became read-only; remount it or",
                errno.EIO: "the disk reported an I/O error; check it or"}.get(cause.errno, "free space or")
        super().__init__(f"writing into {self.folder} failed: {cause.strerror or cause}"
                         f"{f' ({cause.filename})' if cause.filename else ''}. This run needs about "
                         f"{needed_bytes / 2**20:,.1f} MiB there for a checkpoint and the adapter; "
                         f"{free / 2**20:,.1f} MiB are free now. {what[0].upper() + what[1:]} set output_dir to "
                         "another folder, then run the same command again: it resumes from the last complete "
                         "checkpoint, if any; partial files were removed")


def storage_failure(error: BaseException) -> OSError | None:
    """The write failure for want of space behind `error`, or None: an OSError with one of STORAGE_ERRNOS,
    or a library's own error that quotes one (safetensors' writer reports "I/O error: ... (os error 28)")."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in STORAGE_ERRNOS:
            return seen
        quoted = re.search(r"\(os error (\d+)\)", str(seen))
        if quoted and int(quoted.group(1)) in STORAGE_ERRNOS:
            code = int(quoted.group(1))
            return OSError(code, os.strerror(code))
        seen = seen.__cause__ or seen.__context__
    return None


def free_bytes(folder: Path) -> int:
    """Free bytes on the file system that holds `folder` (or its nearest existing parent)."""
    existing = Path(folder)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return shutil.disk_usage(existing).free


def remove_partial_writes(run_dir: Path) -> list[Path]:
    """Remove what an interrupted write left: checkpoints without their trainer state (written last)
    and staging folders; the removed paths."""
    partial = [path for path in (run_dir / CHECKPOINTS).glob("checkpoint-*")
               if path.is_dir() and not _complete_checkpoint(path)]
    partial += [path for path in run_dir.glob(f"{STAGING_PREFIX}*") if "retired" not in path.name]
    for path in partial:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return partial


def _complete_checkpoint(path: Path) -> bool:
    try:
        json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        return True
    except (OSError, ValueError):
        return False


def write_json_atomic(path: Path, content) -> None:
    """Write JSON to a temporary file beside `path`, flush it to disk, then rename it into place."""
    path = Path(path)
    staging = path.with_name(f"{STAGING_PREFIX}{os.getpid()}-{path.name}")
    with staging.open("w", encoding="utf-8") as handle:
        json.dump(content, handle, indent=2, default=str)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, path)


def read_json(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


class RunLock:
    """An exclusive lock on a run folder for a whole run, so two runs never write one folder at once.

    The lock is `<output_dir>/.<run_name>.lock` (beside the folder, which may not exist yet), held with
    flock: the operating system releases it when its process ends, however it ends, so a lock left by a
    killed run never blocks the rerun that resumes it; the file keeps the holder's process id for the
    error message and for the note about a stale file."""

    def __init__(self, config: RunConfig):
        name = config.run_name
        if len(name.encode("utf-8")) > LOCK_NAME_MAX_BYTES:  # ".<name>.lock" must stay a legal file name
            name = hashlib.sha256(name.encode("utf-8")).hexdigest()[:16]
        self.path = Path(config.output_dir) / f".{name}.lock"
        self.output_dir, self.run_dir, self.handle = Path(config.output_dir), config.run_dir, None

    def acquire(self) -> "RunLock":
        import fcntl
        import warnings

        _check_writable(self.output_dir)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = self.path.open("a+", encoding="utf-8")
        except OSError as error:
            raise ConfigError("output_dir", str(self.output_dir), f"a writable folder ({error.strerror})") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(handle)
            handle.close()
            raise ConfigError("run_name", self.run_dir.name, f"a run name no other run is using: process {holder} "
                                                             f"is training into {self.run_dir} now (lock {self.path})") from None
        stale = self._holder(handle)
        if stale and stale != str(os.getpid()):
            warnings.warn(f"{self.path}: the run of process {stale} ended without releasing its lock "
                          "(killed?); taking it over", stacklevel=3)
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self.handle = handle
        return self

    def release(self) -> None:
        if self.handle is not None:
            self.path.unlink(missing_ok=True)  # while still held: a waiting run then finds no stale id
            self.handle.close()  # closing releases the flock
            self.handle = None

    @staticmethod
    def _holder(handle) -> str:
        handle.seek(0)
        return handle.read().strip()


def check_run_dir(config: RunConfig) -> None:
    """Refuse before any work: an adapter that would be overwritten, or a folder holding another run."""
    run_dir = config.run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError("run_name", config.run_name, f"a folder name; {run_dir} is an existing file")
    has_adapter = (run_dir / ADAPTER).exists() or any(run_dir.glob(f"{STAGING_PREFIX}retired-*-{ADAPTER}"))
    if has_adapter and not config.overwrite:
        raise ConfigError("overwrite", config.overwrite,
                          f"True to replace the finished adapter in {run_dir / ADAPTER}, or another run_name")
    saved = run_dir / RUN_CONFIG
    if saved.is_file():
        differences = _differences(read_json(saved), config.to_dict())
        if differences:
            raise ConfigError("run_name", config.run_name,
                              f"a new run name: {run_dir} holds a run with other settings ({differences}); "
                              "rerun with the same settings to resume it")
    _check_writable(Path(config.output_dir))


def _differences(saved: dict, current: dict) -> str:
    changed = [f"{key}: {saved.get(key)!r} there, {current.get(key)!r} now" for key in sorted(current)
               if key not in RESUMABLE_CHANGES and saved.get(key) != current.get(key)]
    return "; ".join(changed)


def _check_writable(output_dir: Path) -> None:
    existing = output_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError("output_dir", str(output_dir), f"a writable folder ({existing} is not writable)")


def start_run_dir(config: RunConfig) -> Path:
    """Create the run folder and record its settings; clear staging left by a killed process."""
    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    _restore_retired_adapter(run_dir)
    for leftover in run_dir.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    write_json_atomic(run_dir / RUN_CONFIG, config.to_dict())
    return run_dir


def _restore_retired_adapter(run_dir: Path) -> None:
    """A process killed between the two renames of `publish_dir` left the old adapter retired: put it back."""
    retired = sorted(run_dir.glob(f"{STAGING_PREFIX}retired-*-{ADAPTER}"))
    if retired and not (run_dir / ADAPTER).exists():
        os.rename(retired[-1], run_dir / ADAPTER)


def last_checkpoint(run_dir: Path) -> str | None:
    """The newest complete trainer checkpoint of an interrupted run, or None."""
    checkpoints = [path for path in (run_dir / CHECKPOINTS).glob("checkpoint-*")
                   if path.name.split("-")[-1].isdigit() and _complete_checkpoint(path)]
    if not checkpoints:
        return None
    return str(max(checkpoints, key=lambda path: int(path.name.split("-")[-1])))


def publish_dir(staging: Path, target: Path) -> None:
    """Move a fully written folder into place; an existing one is replaced only after the new one is there."""
    _fsync_tree(staging)
    if not target.exists():
        os.rename(staging, target)
        return
    retired = target.with_name(f"{STAGING_PREFIX}retired-{os.getpid()}-{target.name}")
    os.rename(target, retired)
    os.rename(staging, target)
    shutil.rmtree(retired)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
