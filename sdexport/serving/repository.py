"""Writing a Triton model repository that serves an engine directory.

The repository is the stock layout ``tritonserver --model-repository`` reads::

    <repo>/sdexport/config.pbtxt     Python backend, the tensors of ``protocol``, dynamic batching,
                                     and the engine directory and backend as parameters
    <repo>/sdexport/1/model.py       a few lines that hand Triton's calls to ``triton_model``
    <repo>/sdexport-repository.json  what sdexport wrote here (so it can replace it, and only it)

The model code stays in the sdexport package rather than being copied into model.py: the Python that
runs the model (the container's, or PyTriton's stub over this environment) needs sdexport installed
anyway for the runtime, and one copy of the code cannot drift from the one the tests run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sdexport.atomic import read_regular, write_atomic
from sdexport.output_dir import MARKER, OutputKind
from sdexport.serving.protocol import INPUTS, MODEL_NAME, OUTPUTS, TensorSpec
from sdexport.serving.triton_model import ServeSettings

RECORD = "sdexport-repository.json"

MODEL_PY = '''"""Triton Python-backend model written by `sdexport triton-repo`: the sdexport runtime over the
engine directory that config.pbtxt names. The Python running it needs sdexport (and its backend's
packages) installed; the code lives in sdexport.serving.triton_model."""

import os

import triton_python_backend_utils as pb_utils

# sdexport's notes as plain text, not escape codes: the server's log is no terminal (rich 14 reads
# TTY_COMPATIBLE; older rich at least drops the colours for NO_COLOR)
os.environ.setdefault("TTY_COMPATIBLE", "0")
os.environ.setdefault("NO_COLOR", "1")

from sdexport.serving.triton_model import TritonAdapter  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        self.adapter = TritonAdapter(pb_utils)
        self.adapter.initialize(args)

    def execute(self, requests):
        return self.adapter.execute(requests)

    def finalize(self):
        self.adapter.finalize()
'''


@dataclass(frozen=True)
class Batching:
    """Triton's dynamic batcher: how long a request may wait for others to join its batch, and how
    many may wait at all (0: no bound; over it, a request is refused at once instead of queueing)."""

    max_queue_delay_us: int = 100_000
    max_queue_size: int = 0


def _string(value: str) -> str:
    """A protobuf text-format string literal."""
    return json.dumps(value, ensure_ascii=False)


def _tensor(spec: TensorSpec) -> str:
    dims = ", ".join(str(d) for d in spec.dims)
    optional = " optional: true" if spec.optional else ""
    return f'  {{ name: {_string(spec.name)} data_type: {spec.config_type} dims: [ {dims} ]{optional} }}'


def config_pbtxt(settings: ServeSettings, max_batch_size: int, batching: Batching, model_name: str = MODEL_NAME) -> str:
    """The model's config.pbtxt: its tensors from ``protocol``, its parameters from ``settings``."""
    queue = (f"\n  default_queue_policy {{ max_queue_size: {batching.max_queue_size} }}"
             if batching.max_queue_size else "")
    inputs = ",\n".join(_tensor(spec) for spec in INPUTS)
    outputs = ",\n".join(_tensor(spec) for spec in OUTPUTS)
    parameters = "\n".join(f"parameters {{ key: {_string(k)} value: {{ string_value: {_string(v)} }} }}"
                           for k, v in settings.to_parameters().items())
    return f"""# Written by `sdexport triton-repo` (or `sdexport serve`); the tensors are sdexport.serving.protocol's.
name: {_string(model_name)}
backend: "python"
max_batch_size: {max_batch_size}
dynamic_batching {{
  max_queue_delay_microseconds: {batching.max_queue_delay_us}{queue}
}}
input [
{inputs}
]
output [
{outputs}
]
# One instance, on the current GPU (CUDA_VISIBLE_DEVICES picks it). For one per GPU of the machine,
# each on its own: kind: KIND_GPU (each instance is a process holding the whole pipeline).
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
{parameters}
"""


def write_repository(directory: Path, settings: ServeSettings, max_batch_size: int, batching: Batching,
                     model_name: str = MODEL_NAME) -> list[Path]:
    """Write the repository's files into ``directory`` (an empty staging folder, or a temporary one)."""
    model = directory / model_name
    (model / "1").mkdir(parents=True, exist_ok=True)
    files = {
        f"{model_name}/config.pbtxt": config_pbtxt(settings, max_batch_size, batching, model_name),
        f"{model_name}/1/model.py": MODEL_PY,
    }
    for relative, text in files.items():
        write_atomic(directory / relative, text)
    record = {"format": 1, "model": model_name, "engine_dir": settings.engine_dir, "files": sorted(files),
              "sha256": {relative: _sha256(text.encode()) for relative, text in files.items()}}
    write_atomic(directory / RECORD, json.dumps(record, indent=2) + "\n")
    return [directory / relative for relative in files]


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def not_a_repository(path: Path) -> str | None:
    """Why ``path`` is not a repository sdexport wrote (None: it is, so it may be replaced).

    Ours: the files its record lists, each as sdexport wrote it. A ``config.pbtxt`` tuned by hand
    (instance groups, batching) is the user's work, which a ``--force`` would have lost. Records
    written before their hashes were kept (no ``sha256``) prove the names alone."""
    try:
        record = json.loads(read_regular(path / RECORD).decode("utf-8"))
        listed = set(record["files"]) | {RECORD, MARKER}  # (the marker: a kill right after the job's rename)
        written = dict(record.get("sha256") or {})
    except (OSError, ValueError, KeyError, TypeError):
        return f"it has no readable {RECORD}"
    for rel, digest in sorted(written.items()):
        try:
            now = _sha256(read_regular(path / rel))
        except FileNotFoundError:
            continue  # nothing there to lose
        except OSError:
            return f"its {rel} is not the file sdexport wrote"
        if now != digest:
            return f"its {rel} was changed since sdexport wrote it (edited by hand?)"
    needed = {parent.as_posix() for rel in listed for parent in Path(rel).parents}
    extra = sorted(rel for rel, p in ((p.relative_to(path).as_posix(), p) for p in path.rglob("*"))
                   if not (rel in listed or (rel in needed and p.is_dir() and not p.is_symlink())
                           or _bytecode_of_listed(Path(rel), p, listed)))
    if extra:
        return f"it holds files sdexport did not write: {', '.join(extra[:3])}"
    return None


def _bytecode_of_listed(rel: Path, path: Path, listed: set[str]) -> bool:
    """Whether ``rel`` is the ``__pycache__`` folder beside a listed ``model.py``, or a ``.pyc`` file
    in it: Triton's Python backend writes them when it imports the model; nothing else is ours."""
    folder = rel if rel.name == "__pycache__" else rel.parent
    if path.is_symlink() or folder.name != "__pycache__" or (folder.parent / "model.py").as_posix() not in listed:
        return False
    return path.is_dir() if rel == folder else (rel.suffix == ".pyc" and rel.parent == folder and path.is_file())


REPOSITORY = OutputKind("Triton model repository", not_a_repository, example="triton-repo", holds_engines=True)
