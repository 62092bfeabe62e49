"""One run per workdir: the lead process holds an exclusive lock on WORKDIR/run.lock for the
life of the run, so a second run on the same workdir (a job a scheduler resubmitted, a command
typed twice) stops before it writes anything, naming the holder.

The lock is `fcntl.flock` on an open file: the kernel releases it when the holding process
exits in any way, kill -9 included, so a run that died leaves nothing that blocks its restart.
On NFS, Linux turns flock into a POSIX byte-range lock that the server arbitrates (NFSv4, or
NFSv3 with its lock manager): it holds between hosts where the mount has locking; with
`nolock` each host only sees its own locks.
"""

import contextlib
import fcntl
import json
import os
import socket
import time

LOCK_FILE = "run.lock"


class WorkdirBusy(ValueError):
    """Another live run holds the workdir."""


@contextlib.contextmanager
def held_in_turn(path):
    """Holds an exclusive flock on the file at path (made if missing) for the with-block, waiting
    while another process holds it: for short sections that processes must take one at a time."""
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield  # closing the file lets the lock go


class WorkdirLock:
    """The exclusive lock of one workdir; `acquire` takes it or raises WorkdirBusy."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        self.fd: int | None = None

    def acquire(self):
        """Creates the workdir if needed and takes its lock; writes who holds it (host, PID, start time).

        Raises:
          WorkdirBusy: a live process holds it; the message names the holder.
        """
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise WorkdirBusy(
                f"--workdir={os.path.dirname(self.path)} is in use by another run ({holder}); "
                "wait for it to end or stop it, or use another --workdir."
            ) from None
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self.fd = fd

    def release(self):
        """Lets the lock go (the file stays; it names the last holder)."""
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _read_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode())
        return f"host {holder['host']}, PID {holder['pid']}, started {holder['started']}"
    except (ValueError, KeyError, UnicodeDecodeError):
        return "holder unknown: it has not written its name yet"
