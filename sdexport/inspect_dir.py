"""Readable summary of an engine directory (``sdexport inspect`` and the end of ``sdexport export``)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from sdexport.build.vae_upcast import upcast_parts
from sdexport.console import out
from sdexport.errors import EngineDirError, SdexportError
from sdexport.export.memory import STAGES, TOO_LARGE
from sdexport.manifest import Manifest


def _size(directory: Path, manifest: Manifest, graph: str) -> str:
    """The graph's files, as the manifest lists them beside it: its weights whatever their names
    (optimum's ``model.onnx_data``, one file per tensor), not only sdexport's ``model.onnx.data``,
    and the few kB of its config.json and weights.json."""
    from sdexport.build.cache_key import onnx_files

    files = (directory / rel for rel in onnx_files(manifest.files, graph))
    total = sum(path.stat().st_size for path in files if path.is_file())
    return f"{total / 1024**2:,.1f} MiB"


def print_summary(directory: Path, manifest: Manifest) -> None:
    profile = manifest.shape_profile
    label = escape(str(manifest.model["label"]))
    weights = "[yellow]random weights[/]" if manifest.random_weights else "trained weights"
    if manifest.model["source"].get("kind") == "onnx":  # adopted without its model: nothing known
        # (its words come from the adopted folder's configs: "0.42.1[/]" was a MarkupError, "[dev]" lost)
        weights = f"{escape(str(manifest.tools.get('exporter', 'adopted')))}, weights not compared with PyTorch"
    if manifest.random_weights and "random weights" in label:  # a preset's label says it: once is enough
        label, weights = label.replace("random weights", "[yellow]random weights[/]"), ""
    # the directory on a line of its own, whole: what a script reads (``export ... | head -1``), its
    # label beside it was read as part of the path
    out.print(f"[bold]{escape(str(directory))}[/]", soft_wrap=True)
    out.print(f"{label}" + (f"  ({weights})" if weights else ""), soft_wrap=True)
    out.print(
        f"family {manifest.family}, "
        + (manifest.prediction_type.replace("_", "-") if manifest.prediction_type.endswith("_prediction")
           else f"{manifest.prediction_type} prediction")  # v_prediction: "v-prediction", not "... prediction" twice
        + (" (a latent consistency model: its U-Net takes the guidance embedded)" if manifest.model_dims.G else "")
        + (f", clip skip {manifest.model_dims.clip_skip}" if manifest.model_dims.clip_skip else "")
        + f", {manifest.dtype}, "
        f"{'U-Net opset' if manifest.adopted else 'opset'} {escape(str(manifest.tools.get('opset')))}; profile batch {':'.join(map(str, profile.batch))}, "
        f"height {':'.join(map(str, profile.height))}, width {':'.join(map(str, profile.width))}"
        + (f", prompt chunks {':'.join(map(str, profile.chunks))}" if profile.chunks != (1, 1, 1) else ""),
        soft_wrap=True,
    )
    tools = ", ".join(f"{k} {v}" for k, v in manifest.tools.items() if k not in ("opset", "exporter", "export_memory"))
    # an adopted folder's tools are those that adopted it, not the exporter's (its own are above)
    made = "adopted with " if manifest.adopted else ""
    out.print(f"[dim]{escape(f'{made}{tools}; created {manifest.created}')}[/]", soft_wrap=True)
    points = {name: points_words(entry.parity) for name, entry in manifest.components.items()}
    shared = next(iter(points.values())) if len(set(points.values())) == 1 else None
    checked = any(p.get("outputs") for entry in manifest.components.values() for p in entry.parity.get("points", []))
    table = Table(title="Components" + (" (worst error over the checked points)" if checked else ""),
                  title_justify="left",
                  caption=f"verification, each component: {shared}" if shared else None, caption_justify="left")
    for column in ("component", "size", "parity", "max-abs", "rel-L2", "tol.", "engines"):
        table.add_column(column, justify="right" if column != "component" else "left")
    for name, entry in manifest.components.items():
        errors = [e for p in entry.parity.get("points", []) for e in p.get("outputs", {}).values()]
        status = str(entry.parity.get("status", "?"))
        colour = {"passed": "green", "failed": "red"}.get(status, "yellow")
        table.add_row(
            name,
            _size(directory, manifest, entry.onnx),
            f"[{colour}]{'not checked' if status == 'skipped' else escape(status)}[/]"  # (a manifest's words: markup)
            + (f" ({points[name]})" if points[name] and not shared else ""),
            f"{max(e['max_abs'] for e in errors):.2e}" if errors else "-",
            f"{max(e['rel_l2'] for e in errors):.2e}" if errors else "-",
            f"{entry.parity['tolerance']:g}" if "tolerance" in entry.parity else "-",
            str(len(entry.engines)) if entry.engines else "-",
        )
    out.print(table)
    from sdexport.runtime.loading import lowered_vae_notes

    try:  # (a damaged VAE config is for the file check to report, not the summary: --no-check)
        upcast, lowered = upcast_parts(directory, manifest), lowered_vae_notes(directory, manifest)
    except EngineDirError:
        upcast, lowered = {}, []
    if upcast:
        runs = " and ".join(f"{'decode' if part == 'vae_decoder' else 'encode'} with {fp32}, not {part}"
                            for part, fp32 in upcast.items())
        left_out = [part for part in upcast if part in manifest.components]
        out.print(f"[dim]runs {runs}: the VAE's config sets force_upcast, as diffusers' SDXL pipelines read it"
                  + (f" (sdexport build leaves {' and '.join(left_out)} out)" if left_out else "") + "[/]",
                  soft_wrap=True)
    from sdexport.runtime.loading import vae_in_place

    alone = {part: fp32 for part, fp32 in vae_in_place(manifest, upcast).items() if part not in upcast}
    if alone:
        runs = " and ".join(f"{'decodes' if part == 'vae_decoder' else 'encodes'} with {fp32}" for part, fp32 in alone.items())
        out.print(f"[dim]{runs}: the export has no {' or '.join(alone)} to run in fp16[/]", soft_wrap=True)
    for note in lowered:
        out.print(f"[yellow]warning:[/] {escape(note)}", soft_wrap=True)  # (it holds a command to paste)
    _print_memory(manifest)
    _print_plans(directory, manifest)
    fused = {name: entry.optimized["onnxruntime-cuda"] for name, entry in manifest.components.items()
             if "onnxruntime-cuda" in entry.optimized}
    if fused:
        table = Table(title="ONNX Runtime CUDA graphs (sdexport build --target onnxruntime-cuda)", title_justify="left")
        for column in ("component", "dtype", "fused operators", "parity", "checked on"):
            table.add_column(column)
        for name, record in fused.items():
            parity = record.get("parity", {})
            status = str(parity.get("status", "?"))
            colour = {"passed": "green", "failed": "red"}.get(status, "yellow")
            table.add_row(name, escape(str(record.get("dtype"))),
                          escape(", ".join(f"{op} {n}" for op, n in sorted(record.get("fusions", {}).items())) or "none"),
                          f"[{colour}]{escape(status)}[/]", escape(str(parity.get("variant", "-"))))
        out.print(table)


def _print_plans(directory: Path, manifest: Manifest) -> None:
    """Each TensorRT plan: the GPU and TensorRT it runs on, the shapes it serves, how it was built,
    and whether a run there loads it where its request fits (``plan_choice.select_engine``: the
    plan a build chose last; a run or server whose shapes it does not cover takes another)."""
    from sdexport.build.cache_key import FLAG_LABELS, EngineKey
    from sdexport.build.vae_upcast import kept_fp32
    from sdexport.runtime.plan_choice import entry_profile, profile_text, select_engine

    records = [(name, record) for name, entry in manifest.components.items() for record in entry.engines.values()]
    if not records:
        return
    try:
        fp32 = kept_fp32(directory, manifest)
    except EngineDirError:  # (a damaged VAE config: the file check's to report)
        fp32 = ()
    table = Table(title="TensorRT plans", title_justify="left", caption_justify="left",
                  caption="loads: the plan a run on that GPU and TensorRT loads where it covers the request "
                          "(the one a build chose last)")
    for column in ("component", "plan", "for", "shapes", "build", "built", "loads"):
        table.add_column(column)
    chosen: dict[tuple[str, str, str, str], str | None] = {}  # (part, platform) → the plan a run loads
    for name, record in records:
        try:
            key = EngineKey.from_dict(record["key"])
        except (KeyError, TypeError, ValueError):
            continue
        here = (name, key.tensorrt_version, key.gpu_name, key.compute_capability)
        if here not in chosen:
            try:
                chosen[here] = select_engine(directory, manifest, name, tensorrt_version=key.tensorrt_version,
                                             gpu_name=key.gpu_name, compute_capability=key.compute_capability,
                                             fp32=name in fp32)["path"]
            except SdexportError:  # (every plan of that platform passed over: the note above says so)
                chosen[here] = None
        loaded = chosen[here] == record["path"]
        build = key.build_flags() if key.fp16 or key.strongly_typed else ["fp32", *key.build_flags()]
        table.add_row(escape(name), escape(Path(record["path"]).name),
                      escape(f"{key.gpu_name} (sm {key.compute_capability}), TensorRT {key.tensorrt_version}"),
                      profile_text(entry_profile(manifest, record, name)), escape(", ".join(build)),
                      escape(str(record.get("built", "?")).replace("T", " ")[:16]),
                      "[green]yes[/]" if loaded else (f"passed over ({FLAG_LABELS['fp16']})" if name in fp32 and key.fp16 else ""))
    out.print(table)


def _print_memory(manifest: Manifest) -> None:
    """Peak resident memory of each export stage, per component: where an export's peak comes from."""
    memory = manifest.tools.get("export_memory")
    if not isinstance(memory, dict) or not isinstance(memory.get("stages"), list) or not memory["stages"]:
        return
    stages = memory["stages"]
    gib = 1024  # (the records are MiB: 24,105 MiB is 23.5 GiB, or 25.3 GB, which "24 GB" was neither)
    machine = memory.get("machine_memory_mb")
    top = max(float(s.get("peak_rss_mb", 0)) for s in stages)
    table = Table(title=f"Export memory: peak {top / gib:.1f} GiB resident"
                        + (f" on a {machine / gib:.1f} GiB machine" if machine else "")
                        + " (GiB, per stage)", title_justify="left")
    for column in ("component", *STAGES):
        table.add_column(column, justify="right" if column != "component" else "left")
    rows: dict[str, dict[str, float]] = {}
    for record in stages:
        component, _, stage = str(record.get("stage", "")).rpartition("/")
        rows.setdefault(component or "model", {})[stage] = float(record.get("peak_rss_mb", 0))
    for component, peaks in rows.items():
        cells = [(f"[bold]{peaks[s] / gib:.1f}[/]" if peaks[s] == top else f"{peaks[s] / gib:.1f}") if s in peaks else "-"
                 for s in STAGES]
        table.add_row(component, *cells)
    out.print(table)


def points_words(parity: dict[str, object]) -> str:
    """How many points were checked, in words: "1 point checked, 3 skipped by request", not "1/4"."""
    points = parity.get("points") or []
    assert isinstance(points, list)
    checked = sum(p.get("status") != "skipped" for p in points)
    if not points:
        return ""
    if not checked:
        return "off by request"
    words = f"{checked} point{'s' if checked != 1 else ''} checked"
    reasons = [str(p.get("reason", "")) for p in points if p.get("status") == "skipped"]
    too_large = sum(reason.startswith(TOO_LARGE) for reason in reasons)
    # ("quick verification": --verify's; none in older records) any other is said as it is: adopt's
    # check of the min point alone was "skipped by request", which nobody made
    others = Counter(r for r in reasons if r and not r.startswith(TOO_LARGE) and not r.endswith("verification"))
    requested = len(reasons) - too_large - sum(others.values())
    return (words + (f", {requested} skipped by request" if requested else "")
            + (f", {too_large} skipped as {TOO_LARGE}" if too_large else "")
            + "".join(f", {n} skipped ({escape(reason)})" for reason, n in others.items()))  # (a manifest's words)
