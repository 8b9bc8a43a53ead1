"""Guards for a long training run: one run per workdir (a lock file), a clean stop on
Ctrl-C / SIGTERM (a flag the loop checks), and one clear error for a full disk.

    with guards.WorkdirLock(workdir), guards.StopOnSignal() as stop, guards.no_space_errors(workdir):
        for step in ...:
            ...
            if stop.requested:
                save(); break

None of them imports jax or TensorFlow.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import shutil
import signal
import socket
import threading
import uuid
from collections.abc import Iterator
from typing import Any

LOCK_FILE = ".lock"


class WorkdirLockedError(RuntimeError):
    """Another live run holds the workdir."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class WorkdirLock:
    """``WORKDIR/.lock`` holding ``{"pid", "host", "started"}`` while a run uses the workdir.

    A second run is refused with a message naming the holder. A lock left by a run that died
    (its pid is gone on this host) is taken over with a note in ``taken_over``. A lock of
    another host cannot be checked: it is refused (delete the file if that run is over).
    Take it on one process of a multi-host run (process 0), on a shared filesystem.
    """

    def __init__(self, workdir: str):
        self.workdir = os.path.abspath(os.path.expanduser(workdir))
        self.path = os.path.join(self.workdir, LOCK_FILE)
        self.record = {"pid": os.getpid(), "host": socket.gethostname()}
        self.taken_over: dict[str, Any] | None = None
        self.held = False

    def _read(self) -> dict[str, Any] | None:
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable: written by something else

    def _create(self) -> bool:
        """Atomically create the lock with its whole content (link of a complete temp file)."""
        tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
        record = {**self.record, "started": datetime.datetime.now().isoformat(timespec="seconds")}
        with open(tmp, "w") as f:
            json.dump(record, f)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            os.remove(tmp)

    def acquire(self) -> WorkdirLock:
        os.makedirs(self.workdir, exist_ok=True)
        for _ in range(3):
            if self._create():
                self.held = True
                return self
            holder = self._read()
            if holder is None:  # released meanwhile
                continue
            pid, host = holder.get("pid"), holder.get("host")
            mine = host == self.record["host"]
            if mine and pid == os.getpid():
                raise WorkdirLockedError(f"{self.workdir} is already locked by this process.")
            if mine and isinstance(pid, int) and not _pid_alive(pid):
                stale = f"{self.path}.stale-{uuid.uuid4().hex}"
                try:
                    os.rename(self.path, stale)  # only one of several contenders moves it
                except FileNotFoundError:
                    continue
                os.remove(stale)
                self.taken_over = holder
                continue
            who = (f"pid {pid} on host {host} (started {holder.get('started', '?')})" if holder
                   else "an unreadable lock file")
            alive = "is still running" if mine else "may still be running (another host: cannot check)"
            raise WorkdirLockedError(
                f"{self.workdir} is in use: {who} {alive}. Two runs on one workdir would overwrite "
                f"each other's checkpoints. Wait for it to finish, use another --workdir, or, if that "
                f"run is really over, delete {self.path}.")
        raise WorkdirLockedError(f"Could not lock {self.workdir}: {self.path} keeps changing.")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        holder = self._read()
        if holder and holder.get("pid") == self.record["pid"] and holder.get("host") == self.record["host"]:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


class StopOnSignal:
    """While active, SIGINT and SIGTERM set ``requested`` instead of raising: the training loop
    checks it between steps, saves and stops. A second SIGINT raises KeyboardInterrupt at
    once. The previous handlers come back on exit. Outside the main thread it does nothing
    (Python handles signals there only)."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)):
        self.signals = signals
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


# ----------------------------------------------------------------------------- full disk

_NO_SPACE_TEXT = ("RESOURCE_EXHAUSTED", "No space left", "ENOSPC", "Disk quota exceeded")


class NoSpaceError(OSError):
    """A write to the workdir failed for lack of space."""


def is_no_space(error: BaseException) -> bool:
    """Whether ``error`` (or anything in its cause/context chain) is a full disk: an OSError with
    ENOSPC/EDQUOT, or an orbax/TensorFlow error whose text says RESOURCE_EXHAUSTED / No space left."""
    seen = set()
    stack = [error]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        low = text.lower()
        # RESOURCE_EXHAUSTED is also XLA's out-of-memory status: only writes count.
        if "RESOURCE_EXHAUSTED" in text and "memory" not in low and any(
                w in low for w in ("writ", "disk", "space")):
            return True
        if any(t in text for t in _NO_SPACE_TEXT[1:]):
            return True
        stack += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
    return False


def _free(path: str) -> str:
    probe = path
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    try:
        return f"{shutil.disk_usage(probe or '/').free / 2**30:.2f} GiB free there now"
    except OSError:
        return "free space unknown"


def no_space_error(workdir: str, error: BaseException, doing: str = "writing") -> NoSpaceError:
    """The one clear error for a full disk while ``doing`` something in ``workdir``."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    return NoSpaceError(
        errno.ENOSPC,
        f"no space left in WORKDIR {workdir} while {doing} ({_free(workdir)}; {type(error).__name__}: "
        f"{first}). Free space there or point --workdir at a bigger disk; checkpoints are written "
        "whole, so a rerun resumes from the last complete one.")


@contextlib.contextmanager
def no_space_errors(workdir: str, doing: str = "writing") -> Iterator[None]:
    """Turn a full-disk failure inside the block into :class:`NoSpaceError` (other errors pass)."""
    try:
        yield
    except NoSpaceError:
        raise
    except Exception as e:
        if is_no_space(e):
            raise no_space_error(workdir, e, doing) from e
        raise
