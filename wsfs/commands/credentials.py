"""Where boto3 finds the store's keys: a shared-credentials file wsfs checks first, a profile.

Keys never go on a command line (where `ps` shows them): the options name a file or a profile,
and reach boto3 through the environment, which the daemon inherits.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import UsageError


def use_credentials_file(path: Path) -> None:
    """Point boto3 at a shared-credentials file after checking nobody else can read it."""
    try:
        st = path.stat()
    except OSError as e:
        raise UsageError(f"cannot read the credentials file {path} ({e.strerror}); "
                         "check the path") from None
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"the credentials file {path} is not a regular file")
    if st.st_mode & 0o077:
        raise UsageError(f"the credentials file {path} is readable by others (mode "
                         f"{stat.S_IMODE(st.st_mode):04o}); run `chmod 600 {path}`")
    if st.st_uid not in (0, os.geteuid()):
        raise UsageError(f"the credentials file {path} belongs to uid {st.st_uid}; "
                         "it must belong to root or to the user running wsfs")
    os.environ["AWS_SHARED_CREDENTIALS_FILE"] = str(path.absolute())


def use_credentials(credentials_file: Path | None, profile: str | None) -> None:
    """Apply the credentials_file and profile options (each None when not given)."""
    if credentials_file is not None:
        use_credentials_file(credentials_file)
    if profile is not None:
        os.environ["AWS_PROFILE"] = profile
