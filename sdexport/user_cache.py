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


def user_cache() -> Path | None:
    from sdexport.output_dir import refuse_inside_engine_dir

    own, xdg = os.environ.get(ENVIRONMENT), os.environ.get("XDG_CACHE_HOME")
    if own:
        root, said = Path(own).absolute(), f"{ENVIRONMENT}={own}"
    elif xdg and os.path.isabs(xdg):
        root, said = Path(xdg) / "sdexport", f"XDG_CACHE_HOME={xdg} (sdexport's cache: {Path(xdg) / 'sdexport'})"
    else:
        try:
            root, said = Path.home() / ".cache" / "sdexport", "the cache folder ~/.cache/sdexport"
        except RuntimeError:  # no HOME and no passwd entry
            return None
    refuse_inside_engine_dir(root, said, itself=True)
    return root
