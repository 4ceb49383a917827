"""Whether the optimum environment can read sdexport's torch instead of installing its own copy.

Usage: python shared_torch.py SPEC (SDEXPORT_TORCH: ``torch==2.13.0`` by default). Prints, tab-separated,
the installed torch's version, the folder it is installed in and the entries of that folder it owns
(``torch``, ``torchgen``, ``functorch`` and its ``.dist-info``) when SPEC pins exactly the installed
version (a pin without a local label, ``+cpu``, takes any build of that version); prints nothing
otherwise (another version, a range, a URL, no torch), and interop-check.sh installs SPEC instead.
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, distribution


def shared_torch(spec: str) -> str:
    name, pinned, wanted = spec.strip().partition("==")
    if not pinned or name.strip().lower() != "torch" or any(c in wanted for c in ",;<>=!~* "):
        return ""
    try:
        torch = distribution("torch")
    except PackageNotFoundError:
        return ""
    installed = torch.version
    if installed != wanted and (installed.split("+")[0] != wanted or "+" in wanted):
        return ""
    # top-level folders and files of the distribution; scripts it put in bin/ (../../bin/torchrun) and
    # absolute paths stay out
    entries = sorted({f.parts[0] for f in torch.files or [] if f.parts and f.parts[0] != ".." and not f.is_absolute()})
    site = torch.locate_file("")
    if "torch" not in entries or not (site / "torch" / "__init__.py").is_file():  # type: ignore[operator]
        return ""  # an editable or source install: its own .pth would not be read through a link
    if not all((site / e).exists() for e in entries):  # type: ignore[operator]
        return ""
    return f"{installed}\t{site}\t{','.join(entries)}"


if __name__ == "__main__":
    print(shared_torch(sys.argv[1]) if len(sys.argv) == 2 else "")
