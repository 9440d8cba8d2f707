"""Atomic file writes: a reader (or a resumed run) sees the old file or the
new one, never half of either.

Shared by every checkpoint the package writes (the deployment server's
`save`, `tf-dpsparse run`/`bench` resume and their outputs). The data goes
to a temporary file in the same directory (same file system, so the rename
is atomic), which is flushed and fsynced, renamed over the target, and the
directory fsynced so the rename itself survives a power cut (POSIX).
"""

from __future__ import annotations

import os
import secrets
from typing import BinaryIO, Callable


def write_atomically(path: str, write: Callable[[BinaryIO], None]) -> None:
  """Calls `write(file)` on a temporary binary file beside `path`, then
  renames it to `path`. The file gets the umask's mode, as `open` gives."""
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  temporary = os.path.join(
      folder, f'.{os.path.basename(path)}.{secrets.token_hex(4)}.partial')
  try:
    with open(temporary, 'xb') as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(temporary, path)
  except BaseException:
    if os.path.exists(temporary):
      os.remove(temporary)
    raise
  _fsync_directory(folder)


def write_text_atomically(path: str, text: str) -> None:
  """`write_atomically` of UTF-8 text."""
  write_atomically(path, lambda f: f.write(text.encode('utf-8')))


def _fsync_directory(directory: str) -> None:
  """Makes the rename itself durable (POSIX); a no-op where unsupported."""
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)
