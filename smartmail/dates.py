"""The Date header's value (RFC 5322 section 3.3), written without `email.utils`.

`email.utils` loads socket, random, datetime and email.charset (~5 ms) only for `formatdate`,
which every message needs: a dry run paid that at start-up. This is the same function for
UTC, its only use here. The day and month names are fixed English ones as the RFC requires
(`time.strftime`'s %a and %b follow the locale).
"""

from __future__ import annotations

import time

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def formatdate(timeval: float | None = None, localtime: bool = False, usegmt: bool = False) -> str:
    """As `email.utils.formatdate` for UTC: "Fri, 09 Nov 2001 01:08:47 -0000" (-0000: UTC,
    as the RFC writes a time whose local zone is not given; "GMT" with `usegmt`)."""
    if localtime:
        raise ValueError("smartmail writes every Date in UTC")
    t = time.gmtime(time.time() if timeval is None else timeval)
    return (
        f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year:04d} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} {'GMT' if usegmt else '-0000'}"
    )
