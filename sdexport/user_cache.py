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


def check_cache_outside(target: Path, what: str = "engine directory") -> None:
    """Before a job that writes the ``what`` ``target`` and may record in the cache while it works
    (hash records of the engine directories it reads or builds): refuse a cache inside an engine
    directory, or inside ``target``, now. After the work was too late: an export refused it with
    the directory already in place, and exited 2; a benchmark's records made its output folder
    appear while it was measuring, and the whole run was thrown away as another writer's
    (``output_dir.check_target`` calls this for every folder sdexport writes anew)."""
    from sdexport.errors import SdexportError

    setting = _setting()
    if setting is not None and setting[0].resolve().is_relative_to(target.absolute().resolve()):
        why = ", whose manifest lists every file in it" if what == "engine directory" else ", which it replaces whole"
        raise SdexportError(f"{setting[1]}: inside {target}, the {what} this writes{why}; point the cache elsewhere")
