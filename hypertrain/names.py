"""Names that come from data (manifest fields, task names) made safe to use in file names."""

from __future__ import annotations

import re

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_filename(text: str, fallback: str = "unnamed") -> str:
    """``text`` as one path component: other characters become ``_``, no leading dot (so never ``.``, ``..`` or
    hidden), at most 100 characters. ``"../../etc/x"`` → ``"_.._etc_x"``."""
    name = _UNSAFE.sub("_", str(text)).lstrip(".")[:100]
    return name or fallback
