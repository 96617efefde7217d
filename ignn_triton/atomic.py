"""Atomic file writes: `atomic_write(path, write)` lets write(tmp) fill a temporary file
beside path and then renames it into place, so path is either untouched or complete. The
temporary is a hidden file (`.<name>.<random><suffix>`), which `ignn-triton upscale` skips
when it lists a folder: all a killed run can leave behind.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write) -> None:
    """Call write(tmp) on a temporary file beside path, then rename it into place: path is
    either untouched or complete. The file gets the usual permissions (0666 & ~umask)."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    except OSError as e:
        raise OSError(f"{path}: cannot write ({e.strerror or e})") from None
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as e:  # a full disk, a vanished folder: one line naming the file
        raise OSError(f"{path}: cannot write ({e.strerror or e})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
