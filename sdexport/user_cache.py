"""The user's cache folder for sdexport: hash records, TensorRT timing caches.

``$SDEXPORT_CACHE_DIR`` when set; else ``$XDG_CACHE_HOME/sdexport`` (an absolute path only, as the XDG
spec says: a relative one is ignored); else ``~/.cache/sdexport``. None when there is no home to put
it in (a service account without one): callers then do without a cache. A cache folder inside an
sdexport engine directory is refused: its records would be files the manifest does not list (and
``export --force`` then refuses the directory as no longer provably sdexport's).
"""

from __future__ import annotations

import os
from pathlib import Path

ENVIRONMENT = "SDEXPORT_CACHE_DIR"


def _setting() -> tuple[Path, str] | None:
    """``_where``'s, refused in one line where it lies inside an sdexport engine directory."""
    from sdexport.output_dir import refuse_inside_engine_dir

    setting = _where()
    if setting is not None:
        refuse_inside_engine_dir(*setting, itself=True)
    return setting


def _where() -> tuple[Path, str] | None:
    """The cache folder and how the user set it (for refusals); None without a home."""
    own, xdg = os.environ.get(ENVIRONMENT), os.environ.get("XDG_CACHE_HOME")
    if own:
        return Path(own).absolute(), f"{ENVIRONMENT}={own}"
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "sdexport", f"XDG_CACHE_HOME={xdg} (sdexport's cache: {Path(xdg) / 'sdexport'})"
    try:
        return Path.home() / ".cache" / "sdexport", "the cache folder ~/.cache/sdexport"
    except RuntimeError:  # no HOME and no passwd entry
        return None


def user_cache() -> Path | None:
    setting = _setting()
    return None if setting is None else setting[0]


def check_cache_outside(target: Path) -> None:
    """Before a job that writes the engine directory ``target`` and then records in the cache:
    refuse a cache inside an engine directory, or inside ``target``, now (an export refused it after
    its work, with the directory already in place, and exited 2)."""
    from sdexport.errors import SdexportError

    setting = _setting()
    if setting is not None and setting[0].resolve().is_relative_to(target.absolute().resolve()):
        raise SdexportError(f"{setting[1]}: inside {target}, the engine directory this writes, whose manifest lists "
                            "every file in it; point the cache elsewhere")
