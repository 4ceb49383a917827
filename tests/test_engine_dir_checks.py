"""An engine directory is a closed world with a valid manifest: inspect, run and build refuse the rest.

Every refusal is one line and comes before any engine loads. ``inspect`` refuses everything ``run``
would refuse, and more (it also parses every graph).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import run_cli
from sdexport.errors import EngineDirError
from sdexport.manifest import load_manifest, sha256_file
from sdexport.runtime.loading import _load_engines as REAL_LOAD_ENGINES


@pytest.fixture(autouse=True)
def no_engines(monkeypatch):
    """Every refusal here comes before any engine loads."""
    from sdexport.runtime import loading

    monkeypatch.setattr(loading, "_load_engines", lambda *a, **k: pytest.fail("engines were loaded"))


def _edit(directory: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = directory / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _refused_everywhere(directory: Path, message: str, capsys) -> None:
    """inspect and run both exit 2 with ``message`` on one line and no traceback."""
    for args in (["inspect", directory], ["run", directory, "-p", "x", "--steps", "2", "-o", directory.parent / "x.png"]):
        assert run_cli(*args) == 2, args
        err = capsys.readouterr().err
        assert message in " ".join(err.split()), (args, err)
        assert "Traceback" not in err and err.count("error:") == 1
    assert not (directory.parent / "x.png").exists()


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    secret = tmp_path / "outside" / "secret.onnx"
    secret.parent.mkdir()
    secret.write_bytes(b"not yours")
    return secret


@pytest.mark.parametrize("rel", ["../outside/secret.onnx", "/etc/passwd", "unet/../../outside/secret.onnx",
                                 "unet//model.onnx", "./unet/model.onnx", "C:/x.onnx"])
def test_manifest_paths_leaving_the_directory_are_refused(engine_copy: Path, outside: Path, rel: str, capsys):
    def point_outside(data: dict[str, Any]) -> None:
        data["components"]["unet"]["onnx"] = rel
        data["files"][rel] = sha256_file(outside)

    _edit(engine_copy, point_outside)
    _refused_everywhere(engine_copy, "not a plain path inside the engine directory", capsys)


def test_a_symlink_leaving_the_directory_is_refused(engine_copy: Path, tmp_path: Path, capsys):
    copy = tmp_path / "elsewhere.onnx"
    shutil.copy(engine_copy / "unet" / "model.onnx", copy)  # same bytes: the hash would match
    (engine_copy / "unet" / "model.onnx").unlink()
    (engine_copy / "unet" / "model.onnx").symlink_to(copy)
    _refused_everywhere(engine_copy, "unet/model.onnx leads outside the engine directory", capsys)


def test_a_vae_scaling_factor_unlike_the_vae_configs_is_refused(engine_copy: Path, capsys):
    """An edited manifest decoded with its own factor, unsaid: diffusers and optimum read the hashed
    config.json and draw another image from the same directory."""
    _edit(engine_copy, lambda data: data.update(vae_scaling_factor=0.13025))
    _refused_everywhere(engine_copy, "invalid manifest: vae_scaling_factor 0.13025, but vae_decoder/config.json's "
                                     "scaling_factor is 0.18215; the manifest does not describe this VAE", capsys)


def test_run_reads_no_weight_file_the_manifest_does_not_list(engine_copy: Path, capsys):
    """A shared directory's graph, listed with its hash, naming external weights the manifest does
    not list ('../../elsewhere' in the audit: ONNX Runtime 1.19 and onnx 1.14 read them wherever they
    were): inspect refused it, run read them."""
    import onnx

    path = engine_copy / "unet" / "model.onnx"
    onnx.save_model(onnx.load(str(path)), str(path), save_as_external_data=True, location="unlisted.bin",
                    size_threshold=1024)
    _edit(engine_copy, lambda data: data["files"].update({"unet/model.onnx": sha256_file(path)}))
    message = "unet/model.onnx: weight"
    for args in (["inspect", engine_copy], ["run", engine_copy, "-p", "x", "--steps", "2", "-o", engine_copy.parent / "x.png"]):
        assert run_cli(*args) == 2, args
        err = " ".join(capsys.readouterr().err.split())
        assert message in err and "refers to 'unlisted.bin', which is not a file the manifest lists beside the graph" in err


def test_a_pipe_at_the_vae_config_is_not_read(engine_copy: Path, capsys):
    """The VAE scaling check read the listed config before the file checks named it: a FIFO there
    hung every command (a link to /dev/zero filled memory)."""
    import os
    import signal

    config = engine_copy / "vae_decoder" / "config.json"
    config.unlink()
    os.mkfifo(config)
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("it waited on the pipe"))
    signal.alarm(60)
    try:
        assert run_cli("inspect", engine_copy) == 2
    finally:
        signal.alarm(0)
    assert "vae_decoder/config.json" in capsys.readouterr().err


def test_the_run_time_weight_file_check_parses_only_graphs_that_can_name_files_and_sees_an_edit(
        engine_copy: Path, monkeypatch):
    """A graph without external weights (sdexport's own under 2 GB) is not parsed (twice its size in
    memory); a graph edited in place after a pass, by a caller that did not hash it, is checked again."""
    import onnx

    from sdexport import manifest as manifest_module
    from sdexport.errors import EngineDirError
    from sdexport.manifest import check_weight_files_once

    manifest = load_manifest(engine_copy, verify_files=False)
    parsed = []
    real = manifest_module._weightless_graph
    monkeypatch.setattr(manifest_module, "_weightless_graph", lambda d, rel: parsed.append(rel) or real(d, rel))
    check_weight_files_once(engine_copy, manifest, ["unet/model.onnx"])
    assert parsed == []
    path = engine_copy / "unet" / "model.onnx"
    onnx.save_model(onnx.load(str(path)), str(path), save_as_external_data=True, location="unlisted.bin",
                    size_threshold=1024)
    with pytest.raises(EngineDirError, match="refers to 'unlisted.bin', which is not a file the manifest lists"):
        check_weight_files_once(engine_copy, manifest, ["unet/model.onnx"])


def test_inspect_prints_a_manifests_words_as_words_not_markup(engine_copy: Path, capsys):
    """A parity status or opset with rich's markup in it ("[/]") was a MarkupError traceback."""
    def change(data):
        data["components"]["unet"]["parity"]["status"] = "ok [/]"
        data["tools"]["opset"] = "[/]"

    _edit(engine_copy, change)
    assert run_cli("inspect", engine_copy, "--no-check") == 0
    said = capsys.readouterr().out
    assert "ok [/]" in said and "opset [/]" in said


def test_inspect_of_a_directory_an_export_is_writing_says_so(tmp_path: Path, capsys):
    """It said "no such engine directory" while an export held the lock beside it."""
    import fcntl
    import os

    lock = tmp_path / ".new.sdexport-lock"
    lock.write_text("sdexport pid 4242\n")
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert run_cli("inspect", tmp_path / "new") == 2
        assert capsys.readouterr().err.strip() == (
            f"error: {tmp_path / 'new'}: not there yet: another sdexport process (pid 4242) is writing it; wait for "
            "it to finish")
    finally:
        os.close(fd)
    assert run_cli("inspect", tmp_path / "new") == 2  # (a lock no one holds: a killed export's)
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'new'}: no such engine directory"


def test_a_hugging_face_snapshot_of_links_is_told_how_to_become_a_folder(tmp_path: Path):
    """snapshot_download's folders are links into the cache's blobs/: refused with no way out before."""
    from sdexport.manifest import _require_inside

    snapshot = tmp_path / "models--x--y" / "snapshots" / "abc"
    blobs = tmp_path / "models--x--y" / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    (blobs / "d554").write_text("{}")
    (snapshot / "model_index.json").symlink_to(blobs / "d554")
    with pytest.raises(EngineDirError, match=r"leads outside the engine directory .*; copy it with its links followed "
                                             rf"\(cp -rL {snapshot} DIR, or snapshot_download\(\.\.\., local_dir=DIR\)\) "
                                             "and use the copy$"):
        _require_inside(snapshot, "model_index.json")


def test_a_graph_that_is_not_hashed_is_refused(engine_copy: Path, capsys):
    _edit(engine_copy, lambda d: d["files"].pop("unet/model.onnx"))
    _refused_everywhere(engine_copy, "components.unet.onnx 'unet/model.onnx' is not among the hashed files", capsys)


def test_a_tensorrt_plan_outside_the_directory_is_refused(engine_copy: Path, outside: Path, capsys):
    def add_plan(data: dict[str, Any]) -> None:
        data["components"]["unet"]["engines"]["k"] = {"path": "../outside/secret.onnx", "key": {}}

    _edit(engine_copy, add_plan)
    _refused_everywhere(engine_copy, "'../outside/secret.onnx', which is not a plain path", capsys)


@pytest.mark.parametrize("change, message", [
    # what a newer sdexport may write is said so (a new family, key or component: read as damage, re-exported)
    (lambda d: d.update(family="sd3"), ("invalid manifest: family: 'sd3' is not one of ['sd', 'sdxl', 'sdxl-refiner'] "
                                        "(a field of a newer sdexport? upgrade sdexport, or export the model again")),
    (lambda d: d["profile"].update(batch=[2, 1, 4]), "profile.batch [2, 1, 4] is not min <= opt <= max"),
    (lambda d: d["profile"].update(height=[64, 128]), "profile.height: [64, 128]"),
    (lambda d: d["profile"].update(width=[0, 64, 64]), "profile.width.0: 0 is less than the minimum of 1"),
    (lambda d: d["dims"].update(S="77"), "dims.S: '77' is not of type 'integer'"),
    (lambda d: d.update(vae_scaling_factor=-1), "vae_scaling_factor: -1 is less than or equal to the minimum of 0"),
    (lambda d: d["files"].update({"unet/model.onnx": "abc"}), "files.unet/model.onnx: 'abc' does not match"),
    (lambda d: d.update(extra=1), ("Additional properties are not allowed ('extra' was unexpected) (a field of a "
                                   "newer sdexport? upgrade sdexport")),
    (lambda d: d.pop("dims"), "'dims' is a required property"),
    (lambda d: d["components"].update(refiner=d["components"]["unet"]), "component(s) refiner do not exist"),
    (lambda d: d["components"].update(transformer=d["components"]["unet"]), "(a field of a newer sdexport?"),
    (lambda d: d["components"].update(adapter=d["components"]["unet"]), "a T2I-Adapter needs both dims.adapter_features"),
    (lambda d: d["dims"].update(adapter_features=[[32, 1]]), "a T2I-Adapter needs both dims.adapter_features"),
    (lambda d: d["dims"].update(adapter_features=[[32, 1]], A=2), "dims.A: 2 is not one of [1, 3]"),
    (lambda d: d["dims"].update(adapter_features=[[32, 1]], A=3, residuals=[[32, 1], [32, 1]]),
     "dims.residuals and dims.adapter_features"),
    (lambda d: d["components"].update(controlnet_2=d["components"]["unet"]), "component(s) controlnet_2 do not exist"),
    (lambda d: d["components"].update(controlnet=d["components"]["unet"]), "ControlNet components but no dims.residuals"),
    (lambda d: d["dims"].update(residuals=[[32, 3], [32, 1]]), "dims.residuals.0.1: 3 is not one of"),
    (lambda d: d.update(format_version=4), ("manifest format 4, written by a newer sdexport than this one (which "
                                           "reads 2 or 3); upgrade sdexport to use it")),
    (lambda d: d.update(format_version="3"), "manifest format '3' is not supported by this sdexport"),
    (lambda d: d.update(format_version=True), "manifest format True is not supported by this sdexport"),
    # what inspect formats as numbers (hand-edited: a traceback in inspect's table before)
    (lambda d: d["components"]["unet"]["parity"].update(tolerance="x"),
     "components.unet.parity.tolerance: 'x' is not of type 'number'"),
    (lambda d: d["components"]["unet"]["parity"]["points"][0]["outputs"].update(out_sample={"max_abs": "big", "rel_l2": 0}),
     "components.unet.parity.points.0.outputs.out_sample.max_abs: 'big' is not of type 'number'"),
    (lambda d: d["components"]["unet"]["parity"].update(points=[1]), "components.unet.parity.points.0: 1 is not of type"),
    (lambda d: d["tools"].update(export_memory={"stages": [{"stage": "load", "peak_rss_mb": "x"}]}),
     "tools.export_memory.stages.0.peak_rss_mb: 'x' is not of type 'number'"),
    (lambda d: d["profile"].update(batch=1), "profile.batch: 1 is not of type 'array'"),  # (no newer hint: a value)
    (lambda d: d["tools"].update(export_memory={"machine_memory_mb": "24 GB", "stages": []}),
     "tools.export_memory.machine_memory_mb: '24 GB' is not of type 'number'"),
    (lambda d: d["model"].update(random_weights="yes"), "model.random_weights: 'yes' is not of type 'boolean'"),
    (lambda d: d["dims"].update(S=10**30), "dims.S: 1000000000000000000000000000000 is greater than the maximum"),
    (lambda d: d["dims"].update(unet_downsample=3), "profile height min 64 is not a multiple of 24"),
    (lambda d: d["profile"].update(batch=[1, 1, 10**9]), "is greater than the maximum of 1048576"),
])
def test_schema_violations_are_refused(engine_copy: Path, change, message, capsys):
    _edit(engine_copy, change)
    _refused_everywhere(engine_copy, message, capsys)


def test_a_manifest_that_is_not_json_is_refused(engine_copy: Path, capsys):
    (engine_copy / "manifest.json").write_bytes(b"\xff\xfe{")
    _refused_everywhere(engine_copy, "damaged manifest, not valid JSON", capsys)


def test_missing_tokenizer_files_are_refused_up_front(engine_copy: Path, capsys):
    def drop_tokenizer(data: dict[str, Any]) -> None:
        for rel in [r for r in data["files"] if r.startswith("tokenizer/")]:
            data["files"].pop(rel)
            (engine_copy / rel).unlink()

    _edit(engine_copy, drop_tokenizer)
    _refused_everywhere(engine_copy, "tokenizer/ lacks its tokenizer files", capsys)


def test_a_scheduler_config_the_manifest_does_not_hash_is_refused(engine_copy: Path, capsys):
    """Its file is still there, but nothing proves it is the export's: not read."""
    _edit(engine_copy, lambda data: data["files"].pop("scheduler/scheduler_config.json"))
    _refused_everywhere(engine_copy, "scheduler/scheduler_config.json is not listed in the manifest", capsys)


@pytest.mark.parametrize("name, text", [("special_tokens_map.json", '{"pad_token": "a", "bos_token": "c"}'),
                                        ("added_tokens.json", '{"a cat": 5, "cat": 7}')])
def test_a_tokenizer_file_the_manifest_does_not_list_is_refused(engine_copy: Path, capsys, name, text):
    """transformers reads every tokenizer file it knows in the folder, listed or not: a special-token
    map copied in changed the ids (other images, every check passing), added tokens made ids past
    the text encoder's table (an ONNX Runtime traceback in the loop). A hidden file is not read."""
    (engine_copy / "tokenizer" / ".DS_Store").write_bytes(b"\0")
    (engine_copy / "tokenizer" / "empty").mkdir()  # (a folder is not read either)
    (engine_copy / "tokenizer" / name).write_text(text)
    _refused_everywhere(engine_copy, f"{name} not in the manifest: transformers reads the tokenizer files it knows",
                        capsys)


def test_a_tokenizer_without_vocabulary_is_refused(engine_copy: Path, capsys):
    path = engine_copy / "tokenizer" / "tokenizer.json"
    data = json.loads(path.read_text())
    data["model"]["vocab"] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    data["added_tokens"] = []
    path.write_text(json.dumps(data))
    _edit(engine_copy, lambda d: d["files"].update({"tokenizer/tokenizer.json": sha256_file(path)}))
    _refused_everywhere(engine_copy, "the tokenizer has no vocabulary", capsys)


@pytest.mark.parametrize("config, message", [
    (b"{not json", "not valid JSON"),
    (json.dumps({"_class_name": "os.system"}).encode(), "not a usable scheduler config: _class_name"),
    (json.dumps({"_class_name": "MagicScheduler"}).encode(), "names 'MagicScheduler', which is not a diffusers scheduler"),
    (json.dumps({"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": "many"}).encode(),
     "num_train_timesteps: 'many' is not of type 'integer'"),
])
def test_bad_scheduler_configs_are_refused_up_front(engine_copy: Path, config: bytes, message: str, capsys):
    path = engine_copy / "scheduler" / "scheduler_config.json"
    path.write_bytes(config)
    _edit(engine_copy, lambda d: d["files"].update({"scheduler/scheduler_config.json": sha256_file(path)}))
    _refused_everywhere(engine_copy, message, capsys)


def test_an_edited_scheduler_config_is_named_as_changed_before_it_is_judged(engine_copy: Path, capsys):
    """Its scheduler class judged first, the refusal said "pick one with --scheduler", which only led
    to the hash's refusal."""
    path = engine_copy / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({"_class_name": "NopeScheduler"}))
    _refused_everywhere(engine_copy, "scheduler/scheduler_config.json does not match its sha256", capsys)


def test_inspect_fails_for_a_directory_run_cannot_use(tmp_path: Path, capsys):
    target = tmp_path / "unet-only"
    assert run_cli("export", "tiny", "-o", target, "--components", "unet", "--verify", "none") == 0
    capsys.readouterr()
    _refused_everywhere(target, "has no text_encoder, vae_decoder", capsys)


def _rehash(directory: Path, *rels: str) -> None:
    _edit(directory, lambda d: d["files"].update({rel: sha256_file(directory / rel) for rel in rels}))


def test_graph_referring_to_unlisted_weights_is_refused(engine_copy: Path, capsys):
    """ONNX Runtime refuses references leaving the folder itself; TensorRT's parser does not, so the
    graph's references are checked against the manifest (inspect, and build before parsing)."""
    import onnx

    from sdexport.manifest import check_graph

    graph = engine_copy / "unet" / "model.onnx"
    onnx.save(onnx.load(str(graph)), str(graph), save_as_external_data=True, location="weights.bin", size_threshold=0)
    _rehash(engine_copy, "unet/model.onnx")
    assert run_cli("inspect", engine_copy) == 2
    assert "refers to 'weights.bin', which is not a file the manifest lists" in capsys.readouterr().err
    _rehash(engine_copy, "unet/weights.bin")
    assert list(check_graph(engine_copy, load_manifest(engine_copy), "unet").inputs) == ["sample", "timestep", "encoder_hidden_states"]
    model = onnx.load(str(graph), load_external_data=False)  # onnx refuses to write "..": edit the proto
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../../outside.data"
    graph.write_bytes(model.SerializeToString())
    _rehash(engine_copy, "unet/model.onnx")
    with pytest.raises(EngineDirError, match="refers to '../../outside.data'"):
        check_graph(engine_copy, load_manifest(engine_copy), "unet")


def test_a_graph_of_another_component_is_refused(engine_copy: Path, monkeypatch, capsys):
    """inspect parses the graphs; run finds out when ONNX Runtime opens the graph (parsing every graph
    twice on each run would cost seconds for a 2 GB U-Net), and refuses with one line too."""
    from sdexport.runtime import loading

    shutil.copy(engine_copy / "vae_decoder" / "model.onnx", engine_copy / "unet" / "model.onnx")
    _rehash(engine_copy, "unet/model.onnx")
    monkeypatch.setattr(loading, "_load_engines", REAL_LOAD_ENGINES)
    _refused_everywhere(engine_copy, "unet/model.onnx takes ['latent_sample'] and returns ['sample'], but a unet graph takes", capsys)


def test_inspect_says_when_export_force_would_not_replace_the_directory(engine_copy: Path, capsys):
    """A file of the user's in an engine directory (an image saved there from the Python API): run
    ignores it, but export --force refuses the directory; inspect reported it clean."""
    assert run_cli("inspect", engine_copy) == 0
    assert "export --force" not in capsys.readouterr().err
    (engine_copy / "my picture.png").write_bytes(b"png")
    assert run_cli("inspect", engine_copy) == 0
    assert ("note: `export --force` will not replace this directory: it holds files its manifest does not list: "
            "my picture.png") in capsys.readouterr().err


def test_a_graph_that_is_not_onnx_is_refused_by_inspect(engine_copy: Path, capsys):
    (engine_copy / "vae_encoder" / "model.onnx").write_bytes(b"\x08random bytes")
    _rehash(engine_copy, "vae_encoder/model.onnx")
    assert run_cli("inspect", engine_copy) == 2
    assert "vae_encoder/model.onnx is not a readable ONNX graph" in capsys.readouterr().err


def test_dims_that_do_not_describe_the_graphs_are_refused_by_inspect(engine_copy: Path, capsys):
    _edit(engine_copy, lambda d: d["dims"].update(E=48))
    assert run_cli("inspect", engine_copy) == 2
    assert "where the manifest's dims give E = 48" in capsys.readouterr().err


def test_a_precision_that_does_not_describe_a_graph_is_refused_by_inspect(engine_copy: Path, capsys):
    """The builds act on a component's dtype (TensorRT's typing, the fusions' fp16): an fp32 graph
    called fp16 would be built as one."""
    _edit(engine_copy, lambda d: d["components"]["unet"].update(dtype="fp16"))
    assert run_cli("inspect", engine_copy) == 2
    assert "unet/model.onnx: its weights are fp32, but the manifest's components.unet.dtype is fp16" in \
        capsys.readouterr().err


def test_a_valid_directory_passes(tiny_engine_dir: Path):
    from sdexport.runtime.loading import check_runnable

    manifest = load_manifest(tiny_engine_dir)
    config, tokenizers = check_runnable(tiny_engine_dir, manifest)
    assert config["_class_name"] == "PNDMScheduler" and len(tokenizers["tokenizer"]) > 2
    with pytest.raises(EngineDirError):
        load_manifest(tiny_engine_dir / "nope")


@pytest.mark.parametrize("text, message", [
    ('{"a": ' * 100_000 + "1" + "}" * 100_000, "not valid JSON (nested too deeply)"),
    ("NaN", "NaN is not a JSON number"),
])
def test_manifests_python_would_misread_are_refused(engine_copy: Path, text: str, message: str, capsys):
    (engine_copy / "manifest.json").write_text(text)
    _refused_everywhere(engine_copy, message, capsys)


def test_a_nan_inside_the_manifest_is_refused(engine_copy: Path, capsys):
    path = engine_copy / "manifest.json"
    path.write_text(path.read_text().replace('"vae_scaling_factor": 0.18215', '"vae_scaling_factor": NaN'))
    _refused_everywhere(engine_copy, "NaN is not a JSON number", capsys)


@pytest.mark.parametrize("change, message", [
    ({"trained_betas": [0.5]}, "1 noise levels (trained_betas) for num_train_timesteps 1000"),
    ({"num_train_timesteps": 10**12}, "num_train_timesteps: 1000000000000 is greater than the maximum"),
    ({"beta_start": "high"}, "cannot build the PNDMScheduler scheduler"),
])
def test_inconsistent_scheduler_configs_are_refused(engine_copy: Path, change, message, capsys):
    path = engine_copy / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    _rehash(engine_copy, "scheduler/scheduler_config.json")
    _refused_everywhere(engine_copy, message, capsys)


# From mutation testing round 6


def test_a_windows_path_in_the_manifest_is_refused_as_not_plain(engine_copy: Path, outside: Path, capsys):
    """A backslash is a separator on Windows: ``unet\\..\\..\\x`` would leave the directory there,
    so it is refused on every system, as ``..`` is (a manifest travels with its directory)."""
    rel = "unet\\..\\..\\outside\\secret.onnx"

    def point_outside(data: dict[str, Any]) -> None:
        data["components"]["unet"]["onnx"] = rel
        data["files"][rel] = sha256_file(outside)

    _edit(engine_copy, point_outside)
    _refused_everywhere(engine_copy, "not a plain path inside the engine directory", capsys)


def test_a_component_the_directory_lacks_is_refused_by_name(tiny_engine_dir: Path):
    """``build --components unet,unte`` says which name it does not know, and builds nothing: left
    out silently, a typo would leave a part unbuilt and the run to find it missing."""
    from sdexport.errors import SdexportError
    from sdexport.manifest import select_specs

    manifest = load_manifest(tiny_engine_dir, verify_files=False)
    assert [s.name for s in select_specs(manifest, ["vae_decoder", "unet"])] == ["unet", "vae_decoder"]
    with pytest.raises(SdexportError, match="unknown or unexported component\\(s\\) unte, controlnet_0; this directory has"):
        select_specs(manifest, ["unet", "unte", "controlnet_0"])


def test_a_scheduler_config_may_hold_either_infinity_but_a_manifest_neither():
    """diffusers saves scheduler configs with Python's json, which writes an infinite float as
    ``Infinity`` or ``-Infinity``: both read as floats there (NaN never), and in no other file
    sdexport reads."""
    import math

    from sdexport.manifest import strict_json

    config = strict_json('{"upper": Infinity, "lambda_min_clipped": -Infinity}', infinity=True)
    assert config == {"upper": math.inf, "lambda_min_clipped": -math.inf}
    for text, infinity in (('{"a": NaN}', True), ('{"a": Infinity}', False), ('{"a": -Infinity}', False)):
        with pytest.raises(ValueError, match="is not a JSON number"):
            strict_json(text, infinity=infinity)


@pytest.mark.parametrize("damaged", ["unet/weights.json", "unet/model.onnx"])
def test_tensorrt_with_run_time_lora_hashes_the_portable_graph_it_reads(engine_copy: Path, damaged: str):
    """The TensorRT loader hashes only the plan it picks; run-time LoRA also reads the portable
    graph's weights (their names in weights.json, their values in the graph), which must be the
    export's, or the refit would write other weights into the plan."""
    from sdexport.runtime.loading import verify_for_backend

    manifest = load_manifest(engine_copy, verify_files=False)
    (engine_copy / damaged).write_bytes(b"damaged")
    verify_for_backend(engine_copy, manifest, "tensorrt")  # (without LoRA the plan alone is read)
    with pytest.raises(EngineDirError, match=damaged):
        verify_for_backend(engine_copy, manifest, "tensorrt", lora=True)
