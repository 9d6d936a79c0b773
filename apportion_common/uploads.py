"""Files a client uploads for tasks to import (client.upload_file): what is accepted."""

from __future__ import annotations

#: What Python imports from: a module, or an archive of packages.
SUFFIXES = (".py", ".zip", ".egg")
#: Larger files belong in a package the workers install, not in a message.
MAX_UPLOAD_BYTES = 64 * 1024 * 1024


class UploadError(ValueError):
    """A file that cannot be uploaded or imported, and why."""


def check_upload(filename: str, nbytes: int) -> str:
    """``filename`` if it is a bare name with a suffix Python imports from."""
    if not filename or "/" in filename or "\\" in filename or filename.startswith("."):
        raise UploadError(f"{filename!r} is not a bare file name")
    if not filename.endswith(SUFFIXES):
        raise UploadError(f"{filename!r}: only {', '.join(SUFFIXES)} files can be uploaded")
    if nbytes > MAX_UPLOAD_BYTES:
        raise UploadError(
            f"{filename!r} is {nbytes} bytes, over the {MAX_UPLOAD_BYTES} an upload may be"
        )
    return filename
