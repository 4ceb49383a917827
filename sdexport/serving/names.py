"""File names as Triton's Python model can read them.

Triton's Python backend stub embeds Python isolated (it reads no ``PYTHONUTF8``) under the C locale,
so the model's Python takes file names to be ASCII: an engine directory at ``/srv/modèles`` is "not
found", and the surrogates that would name its bytes (PEP 383) are refused by ONNX Runtime and
TensorRT. ``serve`` therefore hands the server a link with an ASCII name in its own temporary folder;
a repository for the stock server (``triton-repo``) must name an ASCII path.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from sdexport.errors import SdexportError

if TYPE_CHECKING:
    from sdexport.serving.triton_model import ServeSettings


def ascii_links(settings: ServeSettings, folder: Path) -> ServeSettings:
    """``settings`` with an engine (or refiner) directory whose path is not ASCII served through a
    link to it in ``folder`` (the server's temporary folder, removed with it), and named as given in
    the log and the images' records (bytes that are not UTF-8 written as ``\\xff``: the name goes in
    config.pbtxt, which is UTF-8 text)."""
    for field, name_field, link in (("engine_dir", "engine_name", "engines"), ("refiner", "refiner_name", "refiner")):
        path = getattr(settings, field)
        if path and not path.isascii():  # (``folder`` is: ``check_server_paths``)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / link).symlink_to(path, target_is_directory=True)
            shown = path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            settings = replace(settings, **{field: str(folder / link), name_field: shown})
    return settings


def check_server_paths() -> None:
    """Refuse in one line, before anything loads, where ``serve``'s server would run from a path
    that is not ASCII: the temporary folder (its model repository goes there) and the Python
    environment the stub imports sdexport from. The stub failed on them with a UnicodeEncodeError
    in its imports, which Triton logged as a stack (an audit: HOME or TMPDIR with an 'é'). PyTriton's
    home is left for a temporary one where it is not ASCII (``server.pytriton_workspace``)."""
    import os
    import sys
    import tempfile

    folder = tempfile.gettempdir()
    if not folder.isascii():
        raise SdexportError(f"the temporary folder {folder} is not an ASCII path, which Triton's Python model reads "
                            "(serve writes its model repository there): set TMPDIR to an ASCII path")
    import sdexport

    for where, what in ((sys.prefix, "this Python environment lies at"),
                        (str(Path(sdexport.__file__).parent), "sdexport is imported from")):
        if not where.isascii():  # (an editable checkout, PYTHONPATH: the stub imports it from there too)
            raise SdexportError(f"{what} {where}, not an ASCII path, which Triton's Python model imports sdexport "
                                "from: serve from an environment and a copy of sdexport at ASCII paths")
    home = os.environ.get("PYTRITON_HOME", "")
    if home and not home.isascii():
        raise SdexportError(f"PYTRITON_HOME {home}: not an ASCII path, which Triton's Python model runs from; "
                            "set it to one (or unset it)")


def check_ascii(path: str, option: str, given: bool) -> None:
    """A repository for the stock server names the engine directory as the server will see it
    (``option``, where ``given``; else its absolute path here): refused unless ASCII (``ascii_links``
    does for ``serve`` what the operator must do there)."""
    if not path.isascii():
        what = option if given else f"{'the refiner' if 'refiner' in option else 'the engine directory'}'s path"
        raise SdexportError(f"{what} {path}: Triton's Python model reads only ASCII file names; reach it through a "
                            f"link or mount with an ASCII name (as the server sees it: {option} /engines/NAME)")
