"""Engine cache key: stable digests, every field counts, and readable reasons for a mismatch."""

from __future__ import annotations

import dataclasses
import json

import pytest

from sdexport.build.cache_key import EngineKey, onnx_sha256
from sdexport.build.profiles import input_ranges
from sdexport.shapes import ShapeProfile
from sdexport.specs import UNET, ModelDims

DIMS = ModelDims(S=77, E=32, P=32, C=4, vae_scale_factor=8, unet_downsample=2)
PROFILE = ShapeProfile(batch=(1, 1, 2), height=(64, 128, 256), width=(64, 128, 256))


def make_key(**changes) -> EngineKey:
    key = EngineKey.create(
        "unet",
        "a" * 64,
        input_ranges(UNET, PROFILE, DIMS),
        tensorrt_version="10.3.0.26",
        gpu_name="NVIDIA A100-SXM4-80GB",
        compute_capability="8.0",
    )
    return dataclasses.replace(key, **changes)


@pytest.mark.parametrize("inputs", [[], "x", {"sample": []}, {"sample": {"min": [1]}}])
def test_a_key_whose_shapes_are_edited_out_of_form_raises_what_its_readers_catch(inputs):
    """inspect, build and the runtime's plan choice catch KeyError, TypeError and ValueError: a list
    for ``inputs`` (a hand edit) was an AttributeError, a traceback in each of them."""
    with pytest.raises((KeyError, TypeError, ValueError)):
        EngineKey.from_dict({**make_key().to_dict(), "inputs": inputs})


def test_digest_is_stable_short_hex_and_survives_json():
    key = make_key()
    digest = key.digest()
    assert digest == make_key().digest()
    assert len(digest) == 16 and int(digest, 16) >= 0
    assert key.plan_name == f"{digest}.plan"
    restored = EngineKey.from_dict(json.loads(json.dumps(key.to_dict())))
    assert restored == key and restored.digest() == digest
    # A pinned value catches accidental changes of the canonical form, which would orphan every plan
    # already built (change it together with KEY_VERSION when the change is deliberate).
    assert digest == "678d8a7605ee506b"  # key format 3: tf32


def test_to_dict_is_readable():
    data = make_key().to_dict()
    assert data["inputs"]["sample"] == {"min": [1, 4, 8, 8], "opt": [2, 4, 16, 16], "max": [4, 4, 32, 32]}
    assert data["tensorrt_version"] == "10.3.0.26" and data["fp16"] is True


@pytest.mark.parametrize(
    "change",
    [
        {"component": "vae_decoder"},
        {"onnx_sha256": "b" * 64},
        {"tensorrt_version": "10.8.0.43"},
        {"gpu_name": "NVIDIA H100 PCIe"},
        {"compute_capability": "9.0"},
        {"fp16": False},
        {"strongly_typed": True},
        {"tf32": True},
        {"refittable": True},
        {"optimization_level": 5},
        {"static": True},
        {"key_version": 99},
    ],
)
def test_every_field_changes_the_digest_and_is_explained(change):
    base, other = make_key(), make_key(**change)
    assert base.digest() != other.digest()
    assert base.diff(other), change
    assert base.diff(base) == []


def test_every_shape_changes_the_digest():
    base = make_key()
    for index, (name, (lo, opt, hi)) in enumerate(base.inputs):
        if not lo:  # a scalar (the timestep) has no shape to change
            continue
        for corner in range(3):
            shapes = [list(lo), list(opt), list(hi)]
            shapes[corner] = [*shapes[corner][:-1], shapes[corner][-1] + 1]
            inputs = list(base.inputs)
            inputs[index] = (name, tuple(tuple(s) for s in shapes))
            changed = dataclasses.replace(base, inputs=tuple(inputs))
            assert changed.digest() != base.digest(), (name, corner)


def test_diff_reasons_read_well():
    cached = make_key()
    wanted = make_key(
        tensorrt_version="10.8.0.43",
        fp16=False,
        optimization_level=5,
        inputs=EngineKey.create(
            "unet", "a" * 64, input_ranges(UNET, ShapeProfile((1, 1, 4), (64, 128, 256), (64, 128, 256)), DIMS),
            tensorrt_version="x", gpu_name="x", compute_capability="x",
        ).inputs,
    )
    reasons = cached.diff(wanted)
    assert "TensorRT version 10.3.0.26 != 10.8.0.43" in reasons
    assert "fp16 builder flag on != off" in reasons
    assert "optimization level default != 5" in reasons
    assert "profile differs for sample max: [4, 4, 32, 32] != [8, 4, 32, 32]" in reasons
    assert "profile differs for encoder_hidden_states max: [4, 77, 32] != [8, 77, 32]" in reasons
    assert not any("timestep" in r for r in reasons)
    assert not any("min" in r or "opt" in r for r in reasons if r.startswith("profile"))


def test_platform_reasons():
    key = make_key()
    assert key.platform_reasons("10.3.0.26", "NVIDIA A100-SXM4-80GB", "8.0") == []
    assert key.platform_reasons("10.8.0.43", "NVIDIA H100 PCIe", "9.0") == [
        "TensorRT version 10.3.0.26 != 10.8.0.43",
        "GPU NVIDIA A100-SXM4-80GB != NVIDIA H100 PCIe",
        "compute capability 8.0 != 9.0",
    ]


def test_onnx_hash_covers_external_data_and_ignores_plans():
    files = {
        "unet/model.onnx": "1" * 64,
        "unet/model.onnx.data": "2" * 64,
        "unet/0123456789abcdef.plan": "3" * 64,
        "vae_decoder/model.onnx": "4" * 64,
        "tokenizer/vocab.json": "5" * 64,
    }
    combined = onnx_sha256(files, "unet/model.onnx")
    assert len(combined) == 64 and combined not in files.values()
    assert onnx_sha256({**files, "unet/1111.plan": "6" * 64}, "unet/model.onnx") == combined
    assert onnx_sha256({**files, "unet/model.onnx.data": "7" * 64}, "unet/model.onnx") != combined
    renamed = {**{k: v for k, v in files.items() if k != "unet/model.onnx.data"}, "unet/weights.bin": "2" * 64}
    assert onnx_sha256(renamed, "unet/model.onnx") != combined  # (the names count, not just the hashes)
    # The plans a build cached are found by this hash: a change of its format rebuilds every user's
    # engines, so it is pinned here and changed only on purpose.
    assert combined == "876a71d22621b3fdb612ff2e1fa3ec288f9d7d1dc4bedcfc7713aefb79c106df"
    assert onnx_sha256(files, "vae_decoder/model.onnx") == "4" * 64  # a lone graph: its own hash
    with pytest.raises(KeyError):
        onnx_sha256(files, "text_encoder/model.onnx")


# ---------------------------------------------------------------------------------------------
# The cache in use: build_engines with TensorRT itself replaced by a fake (the flow, not TensorRT).
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def fake_tensorrt(monkeypatch):
    import fake_tensorrt as fakes

    from sdexport.build import tensorrt_build

    state = {"version": "10.3.0.26", "gpu": ("Fake GPU", "8.0"), "builds": []}

    def fake_plan(onnx_path, key, *rest):  # (the timing cache, the graph's inputs)
        state["builds"].append(key.component)
        return memoryview(f"plan {key.digest()}".encode())

    monkeypatch.setattr(tensorrt_build, "require_tensorrt", lambda: fakes.make_tensorrt(state["version"]))
    monkeypatch.setattr(tensorrt_build, "require_polygraphy", lambda version: None)
    monkeypatch.setattr(tensorrt_build, "gpu_identity", lambda device=None: state["gpu"])
    monkeypatch.setattr(tensorrt_build, "_build_plan", fake_plan)
    return state


def test_second_build_is_cached_and_changes_rebuild(engine_copy, fake_tensorrt):
    from sdexport.build.tensorrt_build import build_engines
    from sdexport.manifest import load_manifest

    first = build_engines(engine_copy, components=["unet", "vae_decoder"])
    assert [(r.component, r.status, r.reasons) for r in first] == [
        ("unet", "built", ["no engine yet"]), ("vae_decoder", "built", ["no engine yet"]),
    ]
    manifest = load_manifest(engine_copy)  # plans are listed with their hashes: the directory verifies
    entry = manifest.components["unet"].engines[first[0].key.digest()]
    assert entry["path"] == f"unet/{first[0].key.digest()}.plan" and "built" in entry
    assert EngineKey.from_dict(entry["key"]) == first[0].key
    assert not list(engine_copy.glob("unet/.*"))  # no temporary files left

    second = build_engines(engine_copy, components=["unet", "vae_decoder"])
    assert [r.status for r in second] == ["cached", "cached"]
    assert fake_tensorrt["builds"] == ["unet", "vae_decoder"]

    forced = build_engines(engine_copy, components=["unet"], force=True)
    assert forced[0].status == "built" and forced[0].reasons == ["--force"]

    fake_tensorrt["version"] = "10.8.0.43"
    upgraded = build_engines(engine_copy, components=["unet"])
    assert upgraded[0].status == "built"
    assert upgraded[0].reasons == ["TensorRT version 10.3.0.26 != 10.8.0.43"]
    assert len(load_manifest(engine_copy).components["unet"].engines) == 2  # both platforms kept


def test_damaged_plan_is_rebuilt_not_reused(engine_copy, fake_tensorrt):
    from sdexport.build.tensorrt_build import build_engines

    (built,) = build_engines(engine_copy, components=["vae_decoder"])
    built.path.write_bytes(b"garbage")
    (again,) = build_engines(engine_copy, components=["vae_decoder"])
    assert again.status == "built" and "damaged" in again.reasons[0]
    assert built.path.read_bytes().startswith(b"plan ")


def test_a_forced_rebuild_stopped_while_it_writes_leaves_the_plan_missing_not_damaged(engine_copy, fake_tensorrt,
                                                                                      monkeypatch):
    """The manifest took the new plan's hash before its bytes were written: stopped there (Ctrl-C,
    a full disk), the old plan stayed under a hash it did not match and was called damaged, to be
    re-exported. The old plan goes first; missing, it is rebuilt as a new key's would be."""
    import errno
    from pathlib import Path

    from sdexport.build.tensorrt_build import build_engines
    from sdexport.errors import EngineDirError
    from sdexport.manifest import load_manifest

    (built,) = build_engines(engine_copy, components=["vae_decoder"])
    real = Path.write_bytes

    def full(self, data):
        if self.parent == built.path.parent and self.name.startswith("."):  # the plan's temporary file
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(OSError, match="No space left"):
        build_engines(engine_copy, components=["vae_decoder"], force=True)
    monkeypatch.undo()
    assert not built.path.exists()
    with pytest.raises(EngineDirError, match="is listed in the manifest but missing|missing") as info:
        load_manifest(engine_copy)
    assert "damaged" not in str(info.value)


def test_the_reason_for_a_build_compares_this_machines_plans_first(engine_copy, fake_tensorrt):
    """Another TensorRT's plan, differing by its version alone, was named as the reason where this
    machine's plan differed by a flag."""
    from sdexport.build.tensorrt_build import build_engines

    build_engines(engine_copy, components=["vae_decoder"], optimization_level=5)  # TensorRT 10.3: two flags off
    fake_tensorrt["version"] = "10.8.0.43"
    build_engines(engine_copy, components=["vae_decoder"], static=True)  # the version alone off
    fake_tensorrt["version"] = "10.3.0.26"
    (again,) = build_engines(engine_copy, components=["vae_decoder"], static=True)
    assert again.status == "built" and not any("TensorRT version" in r for r in again.reasons), again.reasons


def test_static_and_flags_are_separate_engines(engine_copy, fake_tensorrt):
    from sdexport.build.tensorrt_build import build_engines

    (dynamic,) = build_engines(engine_copy, components=["vae_decoder"])
    (static,) = build_engines(engine_copy, components=["vae_decoder"], static=True)
    (level,) = build_engines(engine_copy, components=["vae_decoder"], optimization_level=5)
    assert len({dynamic.path, static.path, level.path}) == 3
    assert static.key.static and static.key.ranges["latent_sample"][0] == static.key.ranges["latent_sample"][2]
    assert "optimization level default != 5" in level.reasons
    # TensorRT's default level is 3 (NvInfer.h): asking for it is the default plan, not a rebuild
    (three,) = build_engines(engine_copy, components=["vae_decoder"], optimization_level=3)
    assert three.status == "cached" and three.path == dynamic.path


def test_build_refuses_a_profile_outside_the_export(engine_copy, fake_tensorrt):
    from sdexport.build.tensorrt_build import build_engines
    from sdexport.errors import ProfileError

    with pytest.raises(ProfileError, match=r"height \[64, 512\] is not inside \[64, 256\]"):
        build_engines(engine_copy, profile=ShapeProfile((1, 1, 2), (64, 128, 512), (64, 128, 256)))
    assert fake_tensorrt["builds"] == []


def test_build_refuses_a_damaged_onnx(engine_copy, fake_tensorrt):
    from sdexport.build.tensorrt_build import build_engines
    from sdexport.errors import EngineDirError

    with (engine_copy / "unet" / "model.onnx").open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(EngineDirError, match="unet/model.onnx does not match its sha256"):
        build_engines(engine_copy, components=["unet"])


def test_runtime_picks_the_engine_for_this_platform(engine_copy, fake_tensorrt):
    from sdexport.build.tensorrt_build import build_engines
    from sdexport.errors import EngineDirError, ProfileError
    from sdexport.manifest import load_manifest
    from sdexport.runtime.plan_choice import select_engine

    (old,) = build_engines(engine_copy, components=["unet"])
    fake_tensorrt["version"] = "10.8.0.43"
    (new,) = build_engines(engine_copy, components=["unet"], static=True)
    manifest = load_manifest(engine_copy)
    here = {"gpu_name": "Fake GPU", "compute_capability": "8.0"}
    assert select_engine(engine_copy, manifest, "unet", tensorrt_version="10.3.0.26", **here)["path"] == (
        f"unet/{old.key.plan_name}"
    )
    assert select_engine(engine_copy, manifest, "unet", tensorrt_version="10.8.0.43", **here)["path"] == (
        f"unet/{new.key.plan_name}"
    )
    with pytest.raises(EngineDirError) as info:
        select_engine(engine_copy, manifest, "unet", tensorrt_version="10.13.0.35", **here)
    message = str(info.value)
    assert "no TensorRT engine for Fake GPU (sm 8.0) / TensorRT 10.13.0.35" in message
    assert f"run `sdexport build {engine_copy}`" in message
    assert "TensorRT 10.3.0.26" in message and "TensorRT 10.8.0.43" in message
    with pytest.raises(EngineDirError, match="no TensorRT engine"):
        select_engine(engine_copy, manifest, "vae_decoder", tensorrt_version="10.3.0.26", **here)
    wide = ShapeProfile((1, 1, 2), (64, 128, 256), (64, 128, 256))
    with pytest.raises(ProfileError, match="covers batch 1-2"):
        select_engine(engine_copy, manifest, "unet", tensorrt_version="10.8.0.43", profile=wide, **here)


def test_the_runtime_prefers_a_plan_that_reads_the_prompts_whole(engine_copy, fake_tensorrt):
    """A newer static plan reads one prompt chunk; a request of two takes the older dynamic plan,
    which reads both (a request of more than any plan reads still runs, cut: the newest plan)."""
    from dataclasses import replace

    from sdexport.build.tensorrt_build import build_engines
    from sdexport.manifest import load_manifest
    from sdexport.runtime.plan_choice import select_engine

    (dynamic,) = build_engines(engine_copy, components=["unet"])
    (static,) = build_engines(engine_copy, components=["unet"], static=True)  # chosen last
    manifest = load_manifest(engine_copy)
    here = {"gpu_name": "Fake GPU", "compute_capability": "8.0", "tensorrt_version": fake_tensorrt["version"]}
    one = ShapeProfile.single(1, 128, 128)
    chosen = {n: select_engine(engine_copy, manifest, "unet", profile=replace(one, chunks=(n, n, n)), **here)["path"]
              for n in (1, 2, 3)}
    assert chosen == {1: f"unet/{static.key.plan_name}", 2: f"unet/{dynamic.key.plan_name}",
                      3: f"unet/{static.key.plan_name}"}


def test_the_last_builds_plan_is_loaded_whether_built_or_cached(engine_copy, fake_tensorrt):
    """Of the plans that serve a run, the one a build chose last: a build within the same second as
    the one before it (records' ``built`` is to the second), and one that found its plan cached,
    which had left the other plan loaded."""
    from sdexport.build.tensorrt_build import build_engines
    from sdexport.manifest import load_manifest
    from sdexport.runtime.plan_choice import select_engine

    here = {"gpu_name": "Fake GPU", "compute_capability": "8.0", "tensorrt_version": fake_tensorrt["version"]}

    def loaded() -> str:
        return select_engine(engine_copy, load_manifest(engine_copy, verify_files=False), "unet", **here)["path"]

    (dynamic,) = build_engines(engine_copy, components=["unet"])
    (static,) = build_engines(engine_copy, components=["unet"], static=True)  # (within the second, here)
    assert loaded() == f"unet/{static.key.plan_name}"
    (again,) = build_engines(engine_copy, components=["unet"])
    assert again.status == "cached" and loaded() == f"unet/{dynamic.key.plan_name}"


def test_a_plan_is_chosen_without_a_refittable_one_or_a_recorded_profile(engine_copy, fake_tensorrt):
    """``refit`` (run-time LoRA) with no refittable plan still chooses one (for the refit check to
    refuse in words, not a crash on an empty choice); a record without a build profile (older
    sdexport) serves the export's."""
    import json

    from sdexport.build.tensorrt_build import build_engines
    from sdexport.manifest import load_manifest
    from sdexport.runtime.plan_choice import select_engine

    here = {"gpu_name": "Fake GPU", "compute_capability": "8.0", "tensorrt_version": fake_tensorrt["version"]}
    (plan,) = build_engines(engine_copy, components=["unet"])
    assert not plan.key.refittable
    manifest = load_manifest(engine_copy)
    assert select_engine(engine_copy, manifest, "unet", refit=True, **here)["path"] == f"unet/{plan.key.plan_name}"
    data = json.loads((engine_copy / "manifest.json").read_text())
    for entry in data["components"]["unet"]["engines"].values():
        del entry["profile"]
    (engine_copy / "manifest.json").write_text(json.dumps(data))
    low = manifest.shape_profile.height[0]
    chosen = select_engine(engine_copy, load_manifest(engine_copy, verify_files=False), "unet",
                           profile=ShapeProfile.single(1, low, low), **here)
    assert chosen["path"] == f"unet/{plan.key.plan_name}"


def test_inspect_lists_each_plan_and_the_one_a_run_loads(engine_copy, fake_tensorrt, capsys, monkeypatch):
    from conftest import run_cli
    from sdexport.build.tensorrt_build import build_engines
    from sdexport.console import out

    monkeypatch.setattr(out, "_width", 250)  # a row a line, whatever the worker's terminal

    (dynamic,) = build_engines(engine_copy, components=["unet"])
    (static,) = build_engines(engine_copy, components=["unet"], static=True, refittable=True)
    fake_tensorrt["gpu"] = ("Other GPU", "9.0")
    (elsewhere,) = build_engines(engine_copy, components=["unet"])
    fake_tensorrt["gpu"] = ("Third GPU", "9.0")
    (exact,) = build_engines(engine_copy, components=["unet"], fp16=False)  # no fp16 flag: said to be fp32
    capsys.readouterr()
    assert run_cli("inspect", engine_copy, "--no-check") == 0
    shown = capsys.readouterr().out
    rows = {line.split("│")[2].strip(): [cell.strip() for cell in line.split("│")[1:-1]]
            for line in shown.splitlines() if line.count("│") >= 8 and ".plan" in line}
    assert set(rows) == {r.key.plan_name for r in (dynamic, static, elsewhere, exact)}
    loads = {plan: row[-1] for plan, row in rows.items()}
    assert loads == {dynamic.key.plan_name: "", static.key.plan_name: "yes", elsewhere.key.plan_name: "yes",
                     exact.key.plan_name: "yes"}
    assert "refittable, static shapes" in rows[static.key.plan_name][4]
    assert rows[exact.key.plan_name][4].startswith("fp32") and not rows[static.key.plan_name][4].startswith("fp32")
    assert rows[elsewhere.key.plan_name][2].startswith("Other GPU (sm 9.0), TensorRT")


def test_run_time_lora_loads_a_refittable_plan_where_one_serves(engine_copy, fake_tensorrt):
    from sdexport.build.tensorrt_build import build_engines
    from sdexport.manifest import load_manifest
    from sdexport.runtime.plan_choice import select_engine

    (refittable,) = build_engines(engine_copy, components=["unet"], refittable=True)
    (static,) = build_engines(engine_copy, components=["unet"], static=True)  # chosen last, not refittable
    manifest = load_manifest(engine_copy, verify_files=False)
    here = {"gpu_name": "Fake GPU", "compute_capability": "8.0", "tensorrt_version": fake_tensorrt["version"]}
    at_opt = ShapeProfile.single(manifest.shape_profile.batch[1], manifest.shape_profile.height[1],
                                 manifest.shape_profile.width[1])
    assert select_engine(engine_copy, manifest, "unet", profile=at_opt, **here)["path"].endswith(static.key.plan_name)
    assert select_engine(engine_copy, manifest, "unet", profile=at_opt, refit=True, **here)["path"].endswith(
        refittable.key.plan_name)


def test_run_time_lora_takes_a_refittable_plan_that_cuts_a_long_text_over_one_that_cannot_refit(engine_copy,
                                                                                                 fake_tensorrt):
    """A refittable static plan reads one prompt chunk; a run of a longer text with --lora still takes
    it over a newer plan that reads the text whole but cannot take the LoRA."""
    from sdexport.build.tensorrt_build import build_engines
    from sdexport.manifest import load_manifest
    from sdexport.runtime.plan_choice import select_engine

    (one_chunk,) = build_engines(engine_copy, components=["unet"], refittable=True, static=True)
    (whole,) = build_engines(engine_copy, components=["unet"])  # chosen last, not refittable
    manifest = load_manifest(engine_copy, verify_files=False)
    assert manifest.shape_profile.chunks[2] >= 2
    exported = manifest.shape_profile
    long = ShapeProfile((exported.batch[1],) * 3, (exported.height[1],) * 3, (exported.width[1],) * 3, (2, 2, 2))
    here = {"gpu_name": "Fake GPU", "compute_capability": "8.0", "tensorrt_version": fake_tensorrt["version"]}
    assert select_engine(engine_copy, manifest, "unet", profile=long, **here)["path"].endswith(whole.key.plan_name)
    assert select_engine(engine_copy, manifest, "unet", profile=long, refit=True, **here)["path"].endswith(
        one_chunk.key.plan_name)


def test_a_plan_serves_every_size_of_an_axis_its_inputs_do_not_read(engine_copy, fake_tensorrt):
    """The text encoder's plan built under the profile's upper sizes is the plan of every size (its
    key, and so a later build's "cached", holds its inputs' shapes alone): chosen for a small image,
    where the U-Net's, which reads the size, is not."""
    from sdexport.build.tensorrt_build import build_engines
    from sdexport.errors import ProfileError
    from sdexport.manifest import load_manifest
    from sdexport.runtime.plan_choice import select_engine

    exported = load_manifest(engine_copy).shape_profile
    lo, opt, hi = exported.height
    upper = build_engines(engine_copy, components=["text_encoder", "unet"],
                          profile=exported.with_ranges(height=f"{opt}:{opt}:{hi}"))
    again = build_engines(engine_copy, components=["text_encoder"])  # the export's profile: the same key
    assert [r.status for r in again] == ["cached"] and again[0].key == upper[0].key
    manifest = load_manifest(engine_copy)
    here = {"gpu_name": "Fake GPU", "compute_capability": "8.0", "tensorrt_version": fake_tensorrt["version"]}
    small = ShapeProfile.single(1, lo, lo)
    assert select_engine(engine_copy, manifest, "text_encoder", profile=small, **here)["path"].endswith(
        upper[0].key.plan_name)
    with pytest.raises(ProfileError, match=f"no unet engine .* covers batch 1, height {lo}, width {lo}"):
        select_engine(engine_copy, manifest, "unet", profile=small, **here)


def test_serve_knows_before_triton_starts_whether_a_plan_covers_its_shapes(engine_copy, fake_tensorrt, monkeypatch,
                                                                           capsys):
    """A size no plan covers is refused in one line before Triton starts; where each part's newest
    plan is static at the profile's opt, ``serve --height`` of another size takes older plans."""
    from test_serving import _free_ports

    from conftest import run_cli
    from sdexport.build.tensorrt_build import build_engines
    from sdexport.serving import server as serving

    started: list[str] = []
    monkeypatch.setattr(serving, "run_server", lambda repository, *a, **k: started.append(
        (repository / "sdexport" / "config.pbtxt").read_text()))

    def serve(*flags: str) -> int:
        ports = [str(p) for p in _free_ports(3)]
        return run_cli("serve", engine_copy, "--backend", "tensorrt", "--http-port", ports[0], "--grpc-port",
                       ports[1], "--metrics-port", ports[2], *flags)

    exported = ShapeProfile.from_dict(json.loads((engine_copy / "manifest.json").read_text())["profile"])
    lo, opt, hi = exported.height
    build_engines(engine_copy, profile=exported.with_ranges(height=f"{opt}:{opt}:{hi}"))  # the upper sizes alone
    capsys.readouterr()
    assert serve("--height", str(lo), "--batch", "1") == 2 and not started
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"covers batch 1, height {lo}, width" in err, err
    assert f"engine for Fake GPU (sm 8.0) / TensorRT {fake_tensorrt['version']}" in err
    build_engines(engine_copy, components=["unet"], profile=exported.with_ranges(height=str(lo)), static=True)
    capsys.readouterr()  # the U-Net's newest plan at the smallest height, the VAE's at the upper half:
    assert serve() == 2 and not started  # no height both take
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "the engines share no height: " in err, err
    build_engines(engine_copy)
    (static,) = build_engines(engine_copy, components=["unet"], static=True)  # the newest, one prompt chunk
    assert serve("--height", str(lo), "--batch", "1") == 0 and len(started) == 1
    assert f'"height" value: {{ string_value: "{lo}:{lo}:{lo}" }}' in started[0]
    # told the static plan's shapes, the server loads it, though it reads fewer chunks than the export
    from sdexport.manifest import load_manifest
    from sdexport.runtime.plan_choice import select_engine
    from sdexport.serving.triton_model import ServeSettings

    manifest = load_manifest(engine_copy, verify_files=False)
    assert manifest.shape_profile.chunks[2] > 1
    settings = ServeSettings(str(engine_copy), shapes=(("batch", (1, 1, 1)), ("height", (opt,) * 3),
                                                       ("width", (exported.width[1],) * 3)))
    wanted = settings.plan_profile(settings.served_profile(manifest))
    here = {"gpu_name": "Fake GPU", "compute_capability": "8.0", "tensorrt_version": fake_tensorrt["version"]}
    assert select_engine(engine_copy, manifest, "unet", profile=wanted, **here)["path"].endswith(static.key.plan_name)


def test_a_key_of_an_older_format_reads_as_one_and_says_so():
    """A plan keyed by an older format keeps that format when read, and the difference says so
    (the build's reason to rebuild it), rather than passing for current."""
    key = EngineKey.create("unet", "a" * 64, {"x": ((1,), (2,), (3,))}, tensorrt_version="10", gpu_name="g",
                           compute_capability="8.0")
    old = EngineKey.from_dict({**key.to_dict(), "key_version": 2})
    assert old.key_version == 2 and old.diff(key) == [f"cache key format 2 != {key.key_version}"]


def test_an_input_only_the_second_key_has_is_named():
    key = EngineKey.create("unet", "a" * 64, {"x": ((1,), (2,), (3,)), "y": ((1,), (1,), (1,))},
                           tensorrt_version="10", gpu_name="g", compute_capability="8.0")
    fewer = dataclasses.replace(key, inputs=key.inputs[:1])
    assert fewer.diff(key) == ["input y is only in the second key"]
