"""A run's directory (`train --out`) and a command's output paths, checked before any work is done.

    check_run_dir(out, resume, overwrite)   writable; holds a run only if told to continue or replace it
    check_resumable(out, cfg, data)         the checkpoint there continues this config on this data
    hold_run_dir(out)                       one run per directory, for as long as it runs
    check_out_file(path), check_writable(dir)

Why up front: a result computed for minutes (or a day on 8 GPUs) must not be lost at the end to a
read-only directory, and two runs writing one directory mix their logs and keep one checkpoint.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import tempfile
from pathlib import Path

from . import config as C
from .errors import UserError
from .checkpoint import check_resume, load_checkpoint


def check_writable(directory: Path, what: str) -> None:
    """Before any work: a file can be made in `directory`, or in the nearest one above it that exists (where
    `directory` will be made), so that no result is lost at the end to a place we may not write."""
    d = directory
    while not d.exists() and d != d.parent:
        d = d.parent
    if not d.is_dir():
        raise UserError(f"{what}: {d} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=d):
            pass
    except OSError as e:
        raise UserError(f"{what}: cannot write in {d} ({e.strerror})") from None


def check_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Before any work: --out must be a directory we may write a run into."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: a file, not a directory")
    check_writable(out, f"--out {out}")
    has_run = (out / "checkpoint.pt").exists()
    if resume and not has_run:
        raise UserError(f"--resume: {out} holds no checkpoint.pt to continue")
    if has_run and not resume and not overwrite:
        raise UserError(f"{out} already holds a run (checkpoint.pt): continue it with --resume, choose another "
                        f"--out, or replace it with --overwrite")


def check_resumable(out: Path, cfg: C.Config, data: dict) -> None:
    """Before anything is built: the checkpoint in `out` continues this config on this data, and has steps left."""
    path = out / "checkpoint.pt"
    ckpt = load_checkpoint(path)
    check_resume(ckpt, cfg, path, data, log=lambda *a: None)        # its notes come once, from train()
    if ckpt["epoch"] >= cfg.train.epochs:
        raise UserError(f"--resume: {out} holds a finished run (step {ckpt['step']}, epoch {cfg.train.epochs}/"
                        f"{cfg.train.epochs}): nothing to continue; evaluate it with python lsrm.py eval --ckpt {path}")


_held: set[int] = set()                          # the lock descriptors this process holds


def _close_held_in_child() -> None:
    for fd in _held:
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


@contextlib.contextmanager
def hold_run_dir(out: Path, log=print):
    """One run per directory: OUT/lock names the process writing there while it runs (an flock, which the
    kernel drops when the process dies, however it dies). A second run into OUT is refused in one line; a
    lock left by a run that is gone is taken over with a note. Under torchrun only rank 0 holds it."""
    made, locked = not out.exists(), True
    path = out / "lock"
    while True:
        try:
            out.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"--out {out}: cannot write there ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "a process starting"
            os.close(fd)
            raise UserError(f"{out} is in use by another run ({holder}): wait for it to end, "
                            f"or choose another --out") from None
        except OSError as e:               # a filesystem without locks (some network mounts): unguarded, said once
            log(f"note: {path} cannot be locked here ({e.strerror}): a second run into {out} would not be refused")
            locked = False
            break
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break                 # still the file at `path`, not one its last holder removed as we opened it
        os.close(fd)
    gone = os.read(fd, 200).decode(errors="replace").strip()
    if gone and locked:
        log(f"note: {path}: taking over the lock of a run that is gone ({gone})")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    # A forked child (a DataLoader worker) shares the lock through its copy of fd and would hold it for a while
    # after this process is killed: each child closes its copy at once (closing, not unlocking, keeps ours).
    _held.add(fd)
    try:
        yield
    finally:
        _held.discard(fd)
        path.unlink(missing_ok=True)
        os.close(fd)
        if made and not any(out.iterdir()):
            out.rmdir()                       # a run that failed before writing anything leaves nothing


def check_out_file(out: Path) -> None:
    """Before any work: a file --out must be writable where it is named."""
    if out.is_dir():
        raise UserError(f"--out {out}: a directory; give a file name (e.g. {out / 'metrics.json'})")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: the directory {out.parent} does not exist")
    check_writable(out.parent, f"--out {out}")


