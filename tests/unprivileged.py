"""Run a test's body without root's power over permission bits, so those tests count as root.

Root reads and writes files whatever their mode, and CI runs the suite as root: a test of an
unreadable file or a read-only folder would only ever be skipped there. `unprivileged(body)`
calls `body(folder)` in a forked child that has dropped the two capabilities that let root
ignore permission bits (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), and fails the test with the
child's traceback if the body failed. The child stays uid 0, so it still reads the Python
installation (under /root here); it is simply bound by the mode bits of the files it owns,
as any user is. Run by anyone else, the body is called in-process.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import tempfile
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

WAIT = 60  # seconds the child may take: then SIGALRM ends it
_CAPABILITY_VERSION_3 = 0x20080522
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _drop_permission_override() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    header = _Header(_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    mask = ~((1 << _CAP_DAC_OVERRIDE) | (1 << _CAP_DAC_READ_SEARCH)) & 0xFFFFFFFF
    data[0].effective &= mask
    data[0].permitted &= mask
    data[0].inheritable &= mask
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def unprivileged(body: Callable[[Path], None]) -> None:
    folder = Path(tempfile.mkdtemp(prefix="smartmail-test-"))
    try:
        if os.geteuid() != 0:
            body(folder)
            return
        read, write = os.pipe()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
            pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                os.close(read)
                signal.alarm(WAIT)
                _drop_permission_override()
                body(folder)
                code = 0
            except BaseException:
                os.write(write, traceback.format_exc().encode(errors="replace"))
            finally:
                os._exit(code)
        os.close(write)
        with os.fdopen(read, "rb") as pipe:
            report = pipe.read().decode(errors="replace")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, f"without CAP_DAC_OVERRIDE:\n{report}"
    finally:
        for path in (folder, *folder.rglob("*")):
            path.chmod(0o700)  # what the body locked, so that it can be removed
        shutil.rmtree(folder, ignore_errors=True)
