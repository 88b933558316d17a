"""Writing outputs so that nothing is lost and nothing half-written survives.

Every writer goes through `atomic_output` (convert.py's checkpoints and GGUFs, the default model's cache,
chat.py's /save): the output is built under a temporary name beside its destination and published at the end
by a link or rename that does not replace anything there, so a crash, a full disk or a signal leaves either
the whole output or none of it. `handle_signals` turns SIGTERM and SIGHUP into an exception like Ctrl-C's
KeyboardInterrupt, so that the cleanup (`finally`) runs for them too.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def check_destination(dst: Path, overwrite: bool = False) -> None:
    """An error if dst cannot be written: its directory is missing, or it exists (and may not be replaced)."""
    if not dst.parent.is_dir():
        raise FileNotFoundError(f"{dst}: the directory {dst.parent} does not exist (create it first)")
    if dst.is_dir() and overwrite:
        raise IsADirectoryError(f"{dst} is a directory: not replaced")
    if (dst.exists() or dst.is_symlink()) and not overwrite:
        raise FileExistsError(f"{dst} already exists: not replaced (remove it or choose another name)")


def cache_dir() -> Path:
    """Where what we make once and reuse is kept: the default model's conversion, GGUF conversions, chat history,
    the W4A8 op's build record."""
    return Path(os.environ.get("GEMMA3_INT4_CACHE", Path.home() / ".cache" / "gemma3-int4"))


@contextmanager
def atomic_output(dst: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """with atomic_output(dst) as tmp: write the file or directory `tmp` (a sibling of dst); when the block ends
    without an error it becomes dst, else it is removed. dst may not exist, neither before nor when it is
    published: a file is published by a hard link, which fails if anything took the name meanwhile; a directory
    by a rename, which fails onto a file or a non-empty directory. overwrite=True replaces an existing file."""
    dst = Path(dst)
    check_destination(dst, overwrite)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    remove(tmp)  # left by a killed run of a process with our pid
    try:
        try:
            yield tmp
        except OSError as e:  # a full disk, a quota, a read-only directory: name the output, not the temporary
            raise OSError(f"writing {dst} failed: {e.strerror or e}") from None
        if not tmp.exists():
            raise FileNotFoundError(f"{dst}: nothing was written")
        check_destination(dst, overwrite)  # it may have appeared while we wrote
        if tmp.is_dir():
            tmp.rename(dst)
        elif overwrite:
            tmp.replace(dst)
        else:
            try:
                os.link(tmp, dst)
            except FileExistsError:
                raise FileExistsError(f"{dst} appeared while it was being written: not replaced") from None
    finally:
        remove(tmp)


def remove_abandoned(dst: Path) -> None:
    """Remove dst's temporaries whose processes are gone: killed (SIGKILL, a power cut) before they could clean
    up. A running writer's temporary stays."""
    for tmp in dst.parent.glob(f".{glob.escape(dst.name)}.tmp-*"):
        pid = tmp.name.rpartition("-")[2]
        if pid.isdigit() and not running(int(pid)):
            remove(tmp)


def running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived (see handle_signals); like KeyboardInterrupt, not an Exception."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum  # the shell's convention: 143 for SIGTERM, 129 for SIGHUP


def exit_code(interruption: BaseException) -> int:
    """The shell's exit code for a KeyboardInterrupt (Ctrl-C: 130) or a Terminated (128 + the signal)."""
    return interruption.exit_code if isinstance(interruption, Terminated) else 130


def handle_signals() -> None:
    """Make SIGTERM and SIGHUP raise Terminated in the main thread, so that `finally` blocks clean up."""

    def raise_terminated(signum, frame):
        raise Terminated(signum)

    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, raise_terminated)
