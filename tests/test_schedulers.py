"""The runtime's schedulers are diffusers' own, built as ``from_config`` builds them.

``make_scheduler`` skips ``from_config``'s import of every compatible scheduler class (a second of
a tiny run's start); these tests pin that what it builds is what ``from_config`` builds.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import diffusers
import pytest
import torch

from sdexport.errors import SdexportError
from sdexport.models.presets import PRESETS
from sdexport.runtime.request import GenerationRequest
from sdexport.runtime.schedulers import DEFAULT, SCHEDULERS, make_scheduler

CONFIGS = {
    "sd15": PRESETS["sd15"].scheduler,
    "sd21-v": PRESETS["sd21"].scheduler,
    "sdxl": PRESETS["sdxl"].scheduler,
    "lcm": PRESETS["tiny-lcm"].scheduler,
    # what diffusers' save_config writes: its version, and keys of other scheduler classes
    "saved-by-diffusers": {**PRESETS["sd15"].scheduler, "_diffusers_version": "0.42.1",
                           "use_karras_sigmas": False, "solver_order": 3, "rescale_betas_zero_snr": True},
    # a live scheduler's config: ``_use_default_values`` names keys that were left at their default
    "live-config": {**diffusers.EulerDiscreteScheduler(timestep_spacing="trailing", steps_offset=1).config,
                    "_class_name": "EulerDiscreteScheduler"},
}


def _from_config(name: str, config: dict) -> object:
    class_name, overrides = SCHEDULERS.get(name, (config["_class_name"], {}))
    return getattr(diffusers, class_name).from_config(config, **overrides)


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("name", [DEFAULT, *SCHEDULERS])
def test_make_scheduler_builds_what_from_config_builds(name: str, config_name: str) -> None:
    config = CONFIGS[config_name]
    ours, theirs = make_scheduler(name, dict(config)), _from_config(name, dict(config))
    assert type(ours) is type(theirs)
    assert dict(ours.config) == dict(theirs.config)
    ours.set_timesteps(20)
    theirs.set_timesteps(20)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    assert torch.equal(torch.as_tensor(ours.init_noise_sigma), torch.as_tensor(theirs.init_noise_sigma))


def test_a_config_diffusers_refuses_is_refused_in_one_line() -> None:
    config = {**PRESETS["sd15"].scheduler, "beta_schedule": "no-such-schedule"}
    with pytest.raises(SdexportError, match="cannot build the PNDMScheduler scheduler from its saved config"):
        make_scheduler(DEFAULT, config)


def test_a_scheduler_made_for_another_loop_is_refused_in_one_line() -> None:
    """Saved configs of diffusers schedulers the loop cannot drive passed export and its dry run, and
    ``run`` failed with an AttributeError traceback: ScoreSdeVe has no ``step``, IPNDM and DDIMInverse
    no ``add_noise`` (an init image's noising)."""
    from sdexport.runtime.schedulers import check_model_scheduler, check_steps

    sde = {**PRESETS["sd15"].scheduler, "_class_name": "ScoreSdeVeScheduler"}
    with pytest.raises(SdexportError, match=r"^the ScoreSdeVeScheduler scheduler has no step, which the denoising loop "
                                            r"uses; fix model.s scheduler config"):
        check_model_scheduler(sde, "model")
    for class_name in ("IPNDMScheduler", "DDIMInverseScheduler"):
        config = {**PRESETS["sd15"].scheduler, "_class_name": class_name}
        check_model_scheduler(config, "model")  # (text to image: it samples)
        check_steps(DEFAULT, config, 4)
        with pytest.raises(SdexportError, match=rf"^the default \({class_name}\) scheduler has no add_noise, which an "
                                                r"init image needs \(img2img and inpainting noise it\); pick another"):
            check_steps(DEFAULT, config, 4, from_image=True)
        check_steps("ddim", config, 4, from_image=True)


@pytest.mark.parametrize("class_name", ["KarrasVeScheduler", "RePaintScheduler", "CogVideoXDPMScheduler",
                                        "DDPMWuerstchenScheduler", "CMStochasticIterativeScheduler"])
def test_an_export_notes_a_scheduler_whose_loop_fails_at_every_count(class_name: str) -> None:
    """diffusers schedulers whose ``step`` takes other arguments (or whose timesteps leave the trained
    ones at any count) passed export unsaid, and every ``run`` without --scheduler then refused the
    directory: the export dry-runs its default at a usual count and a few, and says so where both fail."""
    import json

    from sdexport.runtime.schedulers import FEW_STEPS, USUAL_STEPS, default_scheduler_note

    # as the SD preset's config names it, and as diffusers saves the class's own (KarrasVe's and
    # DDPMWuerstchen's have no num_train_timesteps: an AttributeError traceback, a review found)
    for config in ({**PRESETS["sd15"].scheduler, "_class_name": class_name},
                   json.loads(getattr(diffusers, class_name)().to_json_string())):
        note = default_scheduler_note(config, "model", family="sd", conditioned=False)
        assert re.fullmatch(rf"model: its scheduler, {class_name}, (fails \(.*\)|reaches timestep .*) at "
                            rf"{USUAL_STEPS} steps(, outside .*)?, and at {FEW_STEPS} steps too: `run` with these "
                            r"engines needs another scheduler \(ddim, euler, .*\), or its scheduler config fixed in "
                            r"model and export it again", str(note)), note


def test_the_schedulers_offered_instead_are_those_that_sample():
    """UniPC's bh1 solver with a final sigma of zero returns NaN, and ``--scheduler unipc`` reads the
    same keys: it was offered, and failed the same way (a review)."""
    from sdexport.runtime.schedulers import check_steps, default_scheduler_note

    bh1 = {**PRESETS["sd15"].scheduler, "_class_name": "UniPCMultistepScheduler", "solver_type": "bh1"}
    note = str(default_scheduler_note(bh1, "model", family="sd", conditioned=False))
    assert "(ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_karras, pndm, lms, lcm)" in note, note
    with pytest.raises(SdexportError, match=r"pick another scheduler \(ddim, euler, euler_a, dpmpp_2m, "
                                            r"dpmpp_2m_karras, pndm, lms, lcm\)$"):
        check_steps(DEFAULT, bh1, 20)


REAL_CONFIGS = {  # what models ship, as far as the dry run reads them
    "zero-snr-ddim-trailing": {**PRESETS["sd21"].scheduler, "_class_name": "DDIMScheduler", "rescale_betas_zero_snr": True,
                               "timestep_spacing": "trailing"},
    "lightning-euler-trailing": {**PRESETS["sdxl"].scheduler, "timestep_spacing": "trailing"},
    "playground-edm-dpm": {"_class_name": "EDMDPMSolverMultistepScheduler", "sigma_data": 0.5, "sigma_min": 0.002,
                           "sigma_max": 80.0, "prediction_type": "epsilon", "final_sigmas_type": "zero"},
    "cosxl-continuous-v": {**PRESETS["sdxl"].scheduler, "prediction_type": "v_prediction",
                           "timestep_type": "continuous", "sigma_min": 0.002, "sigma_max": 120.0, "sigma_data": 1.0},
    "lcm-3-original-steps": {**PRESETS["tiny-lcm"].scheduler, "original_inference_steps": 3},
    "tcd": {**PRESETS["tiny-lcm"].scheduler, "_class_name": "TCDScheduler"},
    "dpm-karras": {**PRESETS["sd15"].scheduler, "_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True},
    "ipndm": {**PRESETS["sd15"].scheduler, "_class_name": "IPNDMScheduler"},  # (no add_noise: text to image only)
}


@pytest.mark.parametrize("name", list(REAL_CONFIGS))
def test_an_export_says_nothing_of_a_scheduler_that_samples(name: str) -> None:
    """No note for a config that samples at some count tried; an LCM config whose original steps are
    fewer than four is tried at those (it runs at 1 to 3 steps: a review's finding)."""
    from sdexport.runtime.schedulers import default_scheduler_note

    for family, conditioned in (("sd", False), ("sd", True), ("sdxl", False)):
        assert default_scheduler_note(dict(REAL_CONFIGS[name]), "model", family=family, conditioned=conditioned) is None


def test_a_model_whose_own_scheduler_cannot_sample_is_exported_with_a_note(tiny_engine_dir, tmp_path, capsys):
    """The engines are sound and another --scheduler runs them; refusing the export (a first version)
    left a model whose config cannot be edited where it lies with no way through. Adopt says it too."""
    import json
    import shutil

    from conftest import run_cli

    folder = tmp_path / "adopted"
    shutil.copytree(tiny_engine_dir, folder)
    (folder / "manifest.json").unlink()
    for name, key in (("scheduler/scheduler_config.json", "_class_name"), ("model_index.json", "scheduler")):
        data = json.loads((folder / name).read_text())
        data[key] = "KarrasVeScheduler" if key == "_class_name" else ["diffusers", "KarrasVeScheduler"]
        (folder / name).write_text(json.dumps(data))
    capsys.readouterr()
    assert run_cli("adopt", folder) == 0
    said = " ".join(capsys.readouterr().err.split())
    assert f"note: {folder}: its scheduler, KarrasVeScheduler, fails (" in said
    assert "`run` with these engines needs another --scheduler (ddim, euler," in said
    assert f"or its scheduler config fixed in {folder} and adopt it again (--force)" in said
    run = ("run", folder, "-p", "a fox", "--steps", "2", "-o", tmp_path / "x.png")
    assert run_cli(*run) == 2
    assert "pick another --scheduler" in capsys.readouterr().err
    assert run_cli(*run, "--scheduler", "euler") == 0


def test_building_a_scheduler_imports_no_other_scheduler_module() -> None:
    """The point of skipping from_config: no scipy.stats, no fifteen scheduler modules."""
    code = textwrap.dedent("""
        import sys
        from sdexport.models.presets import PRESETS
        from sdexport.runtime.schedulers import make_scheduler
        make_scheduler("default", dict(PRESETS["sd15"].scheduler)).set_timesteps(20)
        modules = sorted(m for m in sys.modules if m.startswith("diffusers.schedulers.scheduling_"))
        print(" ".join(modules), "scipy.stats" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["diffusers.schedulers.scheduling_pndm", "diffusers.schedulers.scheduling_utils", "False"]


def test_dpmpp_2m_is_dpm_plus_plus_2m_whatever_variant_the_model_saved() -> None:
    """A model saved with the SDE variant and Karras sigmas: ``dpmpp_2m`` is neither; the model's own
    (``default``) is recorded by its class, not as a name that would replay another sampler."""
    from sdexport.runtime.schedulers import a1111_sampler, scheduler_label

    dpm = {**PRESETS["sd15"].scheduler, "_class_name": "DPMSolverMultistepScheduler"}
    for variant in ({"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}, {"solver_order": 3},
                    {"use_exponential_sigmas": True}, {"use_beta_sigmas": True}, {"use_lu_lambdas": True}):
        saved = {**dpm, **variant}
        plain, karras, own = (make_scheduler(name, dict(saved)) for name in ("dpmpp_2m", "dpmpp_2m_karras", DEFAULT))
        for scheduler, sigmas in ((plain, False), (karras, True)):
            config = scheduler.config
            assert (config.algorithm_type, config.solver_order, config.use_karras_sigmas) == ("dpmsolver++", 2, sigmas)
            assert not (config.use_exponential_sigmas or config.use_beta_sigmas or config.use_lu_lambdas)
        assert [scheduler_label(s) for s in (plain, karras, own)] == ["dpmpp_2m", "dpmpp_2m_karras",
                                                                      "DPMSolverMultistepScheduler"], variant
        assert a1111_sampler(plain) == "DPM++ 2M" and a1111_sampler(own) == "DPMSolverMultistepScheduler"


def test_a_scheduler_diffusers_saves_exports_and_runs_as_diffusers_loads_it(tiny_diffusers_dir, tmp_path, capsys,
                                                                            monkeypatch):
    """diffusers writes DPMSolverMultistepScheduler's lambda_min_clipped as -Infinity, and builds the
    scheduler of the class model_index.json names (here over a config of another class): the export
    keeps both, and run samples with that scheduler. A config naming no diffusers scheduler is refused
    before any graph is made."""
    import json
    import shutil

    from conftest import run_cli

    model = tmp_path / "model"
    shutil.copytree(tiny_diffusers_dir, model)
    config = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    (model / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({**config, "lambda_min_clipped": float("-inf")}))  # (json writes -Infinity, as diffusers)
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "DPMSolverMultistepScheduler"]}))
    assert run_cli("export", model, "-o", tmp_path / "e", "--verify", "none") == 0
    saved = json.loads((tmp_path / "e" / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "DPMSolverMultistepScheduler" and saved["lambda_min_clipped"] == float("-inf")
    assert run_cli("run", tmp_path / "e", "-p", "a fox", "--steps", "2", "--height", "256", "--width", "256",
                   "-o", tmp_path / "a.png") == 0
    capsys.readouterr()

    index["scheduler"] = ["diffusers", "MyScheduler"]
    (model / "model_index.json").write_text(json.dumps(index))
    assert run_cli("export", model, "-o", tmp_path / "bad", "--verify", "none") == 2
    err = capsys.readouterr().err
    assert f"names 'MyScheduler', which is not a diffusers scheduler; fix {model}'s" in err and "--scheduler" not in err
    assert not (tmp_path / "bad").exists()
    # a single file takes its scheduler from --config's directory: that is what to fix
    from ldm_layout import write_single_file_checkpoint

    from sdexport.models import load_model

    single = tmp_path / "model.safetensors"
    write_single_file_checkpoint(load_model("tiny"), single)
    assert run_cli("export", single, "--config", model, "-o", tmp_path / "bad", "--verify", "none") == 2
    assert f"fix {model}'s scheduler config" in capsys.readouterr().err
    assert run_cli("export", model, "-o", tmp_path / "unet", "--verify", "none", "--components", "unet") == 0  # runs nothing
    # diffusers' stand-in for a scheduler whose optional package is missing (DPMSolverSDEScheduler
    # without torchsde) was "not a diffusers scheduler", the user told to fix a sound config
    import diffusers

    stand_in = type("DPMSolverSDEScheduler", (), {"_backends": ["torch", "torchsde"],
                                                  "__module__": "diffusers.utils.dummy_torch_and_torchsde_objects"})
    monkeypatch.setattr(diffusers, "DPMSolverSDEScheduler", stand_in, raising=False)
    index["scheduler"] = ["diffusers", "DPMSolverSDEScheduler"]
    (model / "model_index.json").write_text(json.dumps(index))
    assert run_cli("export", model, "-o", tmp_path / "bad", "--verify", "none") == 2
    assert capsys.readouterr().err.endswith("error: scheduler config names 'DPMSolverSDEScheduler', which needs the "
                                            "optional package torchsde: pip install torchsde\n")


OUTDATED = {  # saved scheduler configs diffusers' SD pipelines rewrite as they load
    "ddim-old": {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                 "beta_end": 0.012},  # no steps_offset (0), no clip_sample (True)
    "pndm-prk": {"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                 "beta_end": 0.012, "steps_offset": 0, "skip_prk_steps": False, "clip_sample": True},
    "euler-offset-0": {**PRESETS["sd15"].scheduler, "_class_name": "EulerDiscreteScheduler", "steps_offset": 0},
}
PIPELINES = {"txt2img": "StableDiffusionPipeline", "img2img": "StableDiffusionImg2ImgPipeline",
             "inpaint": "StableDiffusionInpaintPipeline"}


@pytest.mark.filterwarnings("ignore:The configuration file of this scheduler:FutureWarning")  # (what it is about)
@pytest.mark.parametrize("task", list(PIPELINES))
@pytest.mark.parametrize("config_name", list(OUTDATED))
def test_an_outdated_config_samples_as_diffusers_sd_pipelines_load_it(tiny_model, config_name, task):
    """steps_offset to 1 and clip_sample to False (inpainting: skip_prk_steps to True), as each SD
    pipeline's __init__ rewrites them; a named scheduler from the pipeline's config as
    ``X.from_config(pipe.scheduler.config)`` gives it (the file's keys rewritten, the others the
    class's defaults). Before, the saved config was used as it was: 0.94 rel-L2 for DDIM's clipping."""
    from sdexport.runtime.schedulers import config_as_loaded

    saved = OUTDATED[config_name]
    modules = tiny_model.modules
    pipe = getattr(diffusers, PIPELINES[task])(
        vae=modules["vae"], text_encoder=modules["text_encoder"], unet=modules["unet"],
        tokenizer=tiny_model.tokenizers["tokenizer"], scheduler=_from_config(DEFAULT, saved),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    keys = ("steps_offset", "clip_sample", "skip_prk_steps")
    for name in (DEFAULT, "ddim", "euler", "pndm", "lcm"):
        ours = make_scheduler(name, config_as_loaded(saved, name, family="sd", conditioned=tiny_model.dims.conditioned,
                                                     inpainting=task == "inpaint")).config
        theirs = (pipe.scheduler if name == DEFAULT else _from_config(name, pipe.scheduler.config)).config
        assert {k: ours.get(k) for k in keys} == {k: theirs.get(k) for k in keys}, name


def test_pipelines_that_rewrite_nothing_sample_the_config_as_saved(tiny_model):
    """SDXL's, the ControlNet, T2I-Adapter and latent consistency pipelines keep an outdated config."""
    from dataclasses import replace

    from sdexport.runtime.schedulers import config_as_loaded

    saved, dims = OUTDATED["ddim-old"], tiny_model.dims
    for family, variant in (("sdxl", dims), ("sd", replace(dims, residuals=((32, 8),))),
                            ("sd", replace(dims, adapter_features=((32, 8),))), ("sd", replace(dims, G=256))):
        assert variant.conditioned or family == "sdxl"
        assert config_as_loaded(saved, DEFAULT, family=family, conditioned=variant.conditioned, inpainting=False) is saved
    assert config_as_loaded(saved, DEFAULT, family="sd", conditioned=dims.conditioned, inpainting=False) != saved


@pytest.mark.parametrize("config", [
    {"_class_name": "EDMEulerScheduler", "sigma_data": 0.5, "prediction_type": "epsilon"},
    {"_class_name": "EDMDPMSolverMultistepScheduler"},
    {**PRESETS["sdxl"].scheduler, "_class_name": "EulerDiscreteScheduler", "timestep_type": "continuous",
     "prediction_type": "v_prediction", "sigma_max": 120.0, "sigma_min": 0.002, "use_karras_sigmas": True},
], ids=["edm-euler", "edm-dpm", "euler-continuous"])
def test_schedulers_of_continuous_timesteps_take_usual_step_counts(config):
    """They hand the U-Net noise levels (EDM's 0.25 log sigma ends negative), not training indices:
    every step count was refused before, naming the largest timestep though the smallest failed."""
    from sdexport.runtime.schedulers import check_steps, continuous_timesteps

    assert continuous_timesteps(make_scheduler(DEFAULT, config))
    for steps in (1, 20, 50):
        check_steps(DEFAULT, config, steps)


@pytest.mark.parametrize("class_name", ["TCDScheduler", "DDIMScheduler", "EulerAncestralDiscreteScheduler",
                                        "LCMScheduler", "PNDMScheduler"])
def test_each_step_gets_what_diffusers_pipelines_pass_it(class_name):
    """``prepare_extra_step_kwargs`` (the pipeline's default eta 0, and its generator): TCD's own
    default eta of 0.3 gave other images (0.27 rel-L2) when the loop passed none."""
    import types

    from sdexport.runtime.txt2img import _step_kwargs

    scheduler = getattr(diffusers, class_name)()
    generators = [torch.Generator().manual_seed(0)]
    theirs = diffusers.StableDiffusionPipeline.prepare_extra_step_kwargs(
        types.SimpleNamespace(scheduler=scheduler), generators, 0.0)
    assert _step_kwargs(scheduler, generators) == theirs


def test_each_schedule_lies_where_its_steps_read_it_without_waiting():
    """diffusers' pipelines put the timesteps on the GPU, where PNDM, DDIM and LCM index their
    host-side table with them (a wait for the device each): theirs stay on the host. The sigma-based
    ones read them only to start and in add_noise (inpainting's blend, every step), which copies
    them to the device: theirs go there (the blend asks on host copies: ``HostSchedule``); UniPC
    copies each sigma it reads to the device (a blocking copy each): its sigmas go there. The GPU
    test counts the waits; here, where each part lies."""
    from sdexport.runtime.schedulers import set_schedule

    config = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    device = torch.device("meta")  # (stands for a GPU: any device but the CPU)
    for name in SCHEDULERS:
        scheduler = make_scheduler(name, {"_class_name": "PNDMScheduler", **config})
        asked: list[object] = []
        real = scheduler.set_timesteps
        scheduler.set_timesteps = lambda steps, device=None, real=real, asked=asked: (asked.append(device), real(steps))
        set_schedule(scheduler, 5, device)
        host = name in ("pndm", "ddim", "lcm")
        assert asked == [None if host else device], name
        if not host:  # (the sigma-based: diffusers keeps their sigmas on the host, but UniPC's)
            assert scheduler.sigmas.device.type == ("meta" if name == "unipc" else "cpu"), name
    cpu = make_scheduler("unipc", {"_class_name": "PNDMScheduler", **config})
    set_schedule(cpu, 5, torch.device("cpu"))
    assert cpu.sigmas.device.type == "cpu"


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_the_blend_s_noise_levels_are_add_noise_s_own_asked_on_the_host(name):
    """Inpainting's blend (a standard U-Net) calls add_noise at every step, which copies the sigmas
    or the noise table to the latents' device, a wait each on a GPU: its two factors are asked on
    host copies of the schedule instead. The same latents, bit for bit, at the step the loop is on;
    the schedule on the device (meta here, standing for a GPU) is neither read nor replaced."""
    from sdexport.runtime.schedulers import HostSchedule, set_schedule
    from sdexport.runtime.txt2img import _step_kwargs

    config = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    scheduler = make_scheduler(name, {"_class_name": "PNDMScheduler", **config})
    set_schedule(scheduler, 6, torch.device("cpu"))
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(1)  # (an image task starts into the schedule)
    generator = torch.Generator().manual_seed(0)
    latents, noise, image = (torch.randn(1, 4, 8, 8, generator=generator) for _ in range(3))
    timesteps = scheduler.timesteps[1:]
    scheduler.scale_model_input(latents, timesteps[0])  # (as the loop: LMS warns without it)
    latents = scheduler.step(torch.randn(1, 4, 8, 8, generator=generator), timesteps[0], latents,
                             **_step_kwargs(scheduler, [generator]), return_dict=False)[0]
    expected = scheduler.add_noise(image, noise, timesteps[1:2])
    host = HostSchedule(scheduler, timesteps)
    on_device = {name: getattr(scheduler, name).to("meta") for name in host.tensors}
    for attribute, value in on_device.items():
        setattr(scheduler, attribute, value)
    image_level, noise_level = host.noise_levels(scheduler, 1)
    assert torch.equal(image_level * image + noise_level * noise, expected)
    assert all(getattr(scheduler, attribute) is value for attribute, value in on_device.items())
    assert getattr(scheduler, "alphas_cumprod", torch.zeros(())).device.type == "cpu"  # (not moved either)


@pytest.mark.parametrize("class_name", ["HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "EulerDiscreteScheduler"])
def test_an_init_image_starts_where_diffusers_img2img_starts_for_schedulers_of_any_order(class_name: str) -> None:
    """diffusers' ``get_timesteps`` skips ``(steps - int(steps x strength)) x order`` entries: a
    second-order scheduler a model saved (Heun, KDPM2) lists each step's timestep twice."""
    from PIL import Image

    from sdexport.runtime.request import GenerationRequest
    from sdexport.runtime.schedulers import schedule_window, set_schedule

    config = {**PRESETS["tiny"].scheduler, "_class_name": class_name}
    scheduler = make_scheduler(DEFAULT, config)
    set_schedule(scheduler, 10, torch.device("cpu"))
    request = GenerationRequest(prompt=["x"], steps=10, image=[Image.new("RGB", (64, 64))], strength=0.5)
    expected = scheduler.timesteps[(10 - 5) * scheduler.order:]
    assert scheduler.order == (1 if class_name == "EulerDiscreteScheduler" else 2)
    assert torch.equal(schedule_window(scheduler, request, "sd"), expected)


@pytest.mark.parametrize("class_name", ["HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "EulerDiscreteScheduler"])
@pytest.mark.parametrize("start", [0.5, 0.7, 0.799])
def test_a_refiner_starts_where_diffusers_sdxl_img2img_starts_for_schedulers_of_any_order(class_name, start):
    """``denoising_start``: diffusers' SDXL img2img ``get_timesteps`` takes the timesteps below the
    cut-off, one more where a second-order scheduler (Heun, KDPM2: each step's timestep listed twice)
    would be cut between its two evaluations."""
    import types

    from sdexport.runtime.request import GenerationRequest
    from sdexport.runtime.schedulers import schedule_window, set_schedule

    config = {**PRESETS["tiny-sdxl-refiner"].scheduler, "_class_name": class_name}
    ours, theirs = make_scheduler(DEFAULT, config), make_scheduler(DEFAULT, config)
    set_schedule(ours, 10, torch.device("cpu"))
    theirs.set_timesteps(10)
    request = GenerationRequest(prompt=["x"], steps=10, denoising_start=start, init_latents=torch.zeros(1, 4, 8, 8))
    expected, _ = diffusers.StableDiffusionXLImg2ImgPipeline.get_timesteps(
        types.SimpleNamespace(scheduler=theirs), 10, 0.3, "cpu", denoising_start=start)
    assert torch.equal(schedule_window(ours, request, "sdxl-refiner"), expected)
    assert ours.begin_index == theirs.begin_index


def _sdxl_window(**fields) -> list[float]:
    """The timesteps SDXL's default scheduler runs at 10 steps for a request with ``fields``."""
    from sdexport.runtime.schedulers import schedule_window, set_schedule

    scheduler = make_scheduler(DEFAULT, PRESETS["tiny-sdxl"].scheduler)
    set_schedule(scheduler, 10, torch.device("cpu"))
    return schedule_window(scheduler, GenerationRequest(prompt=["x"], steps=10, **fields), "sdxl").tolist()


def test_an_empty_window_that_no_strength_fills_advises_more_steps():
    """A cut at 0.05 lies above the first timestep SDXL's schedule runs at 10 steps (901): no strength
    gives the base model a step, and the refusal advised raising the strength, at 1 already, or
    "above 0.95", refused again at 0.96 (an audit). More steps help (20 run timestep 951)."""
    from PIL import Image

    image = [Image.new("RGB", (64, 64))]
    for strength in (1.0, 0.96):
        with pytest.raises(SdexportError, match=rf"^denoising_end 0.05 and strength {strength:g} with steps 10 "
                                                r"\(default scheduler\) leave no step: move the window or raise steps "
                                                r"\(no strength leaves a step at 10 steps\)$"):
            _sdxl_window(denoising_end=0.05, image=image, strength=strength)
    with pytest.raises(SdexportError, match=r"leave no step: move the window or raise steps and strength above 0.95 "
                                            r"\(no strength leaves a step at 10 steps\)$"):
        _sdxl_window(denoising_end=0.05, image=image, strength=0.5)


def test_a_config_that_fails_at_every_step_count_is_blamed_not_the_count():
    """UniPC's bh1 solver with a final sigma of zero returns NaN at any count (diffusers' own
    pipeline too): it was told "use fewer steps" (an audit's finding)."""
    from sdexport.runtime.schedulers import check_steps

    bh1 = {**PRESETS["sd15"].scheduler, "_class_name": "UniPCMultistepScheduler", "solver_type": "bh1"}
    with pytest.raises(SdexportError, match=r"^steps 30: the default \(UniPCMultistepScheduler\) scheduler returns NaN "
                                            r"at 30 steps, and at 4 steps too with this model's scheduler config; "
                                            r"pick another scheduler \(ddim, euler, "):
        check_steps(DEFAULT, bh1, 30)
    # consistency models' scheduler reaches past the training timesteps at every count: was "use fewer steps"
    consistency = {**PRESETS["sd15"].scheduler, "_class_name": "CMStochasticIterativeScheduler"}
    with pytest.raises(SdexportError, match=r"^steps 4: the default \(CMStochasticIterativeScheduler\) scheduler reaches "
                                            r"timestep [0-9.]+ at 4 steps, outside the model's 1000 training timesteps "
                                            r"\(0 to 999\), and at 20 steps too .*; pick another scheduler"):
        check_steps(DEFAULT, consistency, 4)
    # a count of a few is tried again at a usual one, not at itself (a review's finding: "at 2 too"), and
    # the scheduler that failed is not offered
    with pytest.raises(SdexportError, match=r"^steps 2: .* at 20 steps too with this model's scheduler config; pick another scheduler \(ddim, euler, "
                                            r"euler_a, dpmpp_2m, dpmpp_2m_karras, pndm, lms, lcm\)$"):
        check_steps("unipc", {**bh1, "_class_name": "PNDMScheduler"}, 2)


def test_an_empty_window_from_an_init_image_names_its_strength():
    """SDXL img2img's default strength (0.3) starts its schedule at a cut at 0.7: the refusal advised
    raising the steps alone (an audit's finding), which no count of steps helps (a review's). The
    refusal names the least strength that leaves a step: "above 0.3" was refused again at 0.31 to
    0.39 with ten steps (an audit)."""
    from PIL import Image

    image = [Image.new("RGB", (64, 64))]
    with pytest.raises(SdexportError, match=r"^denoising_end 0.7 and strength 0.3 \(the default\) with steps 10 "
                                            r"\(default scheduler\) leave no step: move the window or raise strength "
                                            r"to 0.4 \(the least that leaves a step at 10 steps\)$"):
        _sdxl_window(denoising_end=0.7, image=image)
    with pytest.raises(SdexportError, match=r"^denoising_end 0.95 and strength 0.08 with steps 10 .* leave no step: "
                                            r"move the window or raise strength to 0.2 \(the least that leaves a step "
                                            r"at 10 steps\)$"):
        _sdxl_window(denoising_end=0.95, image=image, strength=0.08)
    for strength in (0.39, 0.4):  # (the advice holds: the step comes at 0.4, not before)
        try:
            _sdxl_window(denoising_end=0.7, image=image, strength=strength)
        except SdexportError:
            assert strength < 0.4
        else:
            assert strength >= 0.4


def test_the_experts_split_the_schedule_where_diffusers_rounds_the_cut_off():
    """diffusers' ``discrete_timestep_cutoff`` is ``int(round(1000 - fraction x 1000))``: at 0.7984
    that is 202 (1000 - 798.4 = 201.6), so SDXL's timestep 201 is the refiner's, not the base model's
    (truncated, the cut-off would be 201 and the base model would run it)."""
    base = _sdxl_window(denoising_end=0.7984)
    refined = _sdxl_window(denoising_start=0.7984, init_latents=torch.zeros(1, 4, 8, 8))
    assert base == [901, 801, 701, 601, 501, 401, 301] and refined == [201, 101, 1]


# From mutation testing round 5: each seen to fail with the change it guards against.

def test_the_a1111_sampler_says_karras_once():
    """DPM++ 2M Karras is recorded as A1111 names it, not "DPM++ 2M Karras Karras"; a saved
    Euler config with Karras sigmas is A1111's "Euler Karras"."""
    from sdexport.runtime.schedulers import a1111_sampler

    dpm = {**PRESETS["sd15"].scheduler, "_class_name": "DPMSolverMultistepScheduler"}
    assert a1111_sampler(make_scheduler("dpmpp_2m_karras", dict(dpm))) == "DPM++ 2M Karras"
    euler = {**PRESETS["sd15"].scheduler, "_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True}
    assert a1111_sampler(make_scheduler(DEFAULT, euler)) == "Euler Karras"
    # a scheduler without Karras sigmas, picked over a model saved with them, ran none (an audit's finding)
    karras_dpm = {**dpm, "use_karras_sigmas": True}
    assert [a1111_sampler(make_scheduler(name, dict(karras_dpm))) for name in ("ddim", "euler_a", "pndm")] == [
        "DDIM", "Euler a", "PLMS"]


def test_a_timestep_at_the_cut_off_is_the_base_models():
    """Diffusers' base model runs the timesteps at or above ``discrete_timestep_cutoff``, the
    refiner those below: a timestep equal to it (801 at denoising_end 0.199) is the base model's,
    and no timestep falls between the two."""
    base = _sdxl_window(denoising_end=0.199)
    refined = _sdxl_window(denoising_start=0.199, init_latents=torch.zeros(1, 4, 8, 8))
    assert base == [901, 801] and refined == [701, 601, 501, 401, 301, 201, 101, 1]
