"""Build profiles: requested TensorRT shapes come from the specs and stay inside the export."""

from __future__ import annotations

import pytest

from sdexport.build.profiles import build_profile, input_ranges, static_profile
from sdexport.errors import ProfileError
from sdexport.shapes import ShapeProfile
from sdexport.specs import SDXL_UNET, TEXT_ENCODER, UNET, VAE_DECODER, ModelDims

DIMS = ModelDims(S=77, E=32, P=32, C=4, vae_scale_factor=8, unet_downsample=2)
EXPORTED = ShapeProfile(batch=(1, 1, 4), height=(64, 128, 256), width=(64, 128, 256))


def test_default_is_the_exported_profile():
    assert build_profile(EXPORTED, None, DIMS) == EXPORTED


def test_narrower_request_inside_the_export_is_accepted():
    requested = ShapeProfile(batch=(1, 2, 2), height=(128, 128, 192), width=(64, 128, 256))
    assert build_profile(EXPORTED, requested, DIMS) == requested


@pytest.mark.parametrize(
    ("requested", "axis", "allowed"),
    [
        (ShapeProfile(batch=(1, 1, 8), height=(64, 128, 256), width=(64, 128, 256)), "batch", "[1, 4]"),
        (ShapeProfile(batch=(1, 1, 4), height=(64, 128, 512), width=(64, 128, 256)), "height", "[64, 256]"),
        (ShapeProfile(batch=(1, 1, 4), height=(64, 128, 256), width=(32, 128, 256)), "width", "[64, 256]"),
    ],
)
def test_request_outside_the_export_names_the_axis_and_allowed_range(requested, axis, allowed):
    with pytest.raises(ProfileError) as info:
        build_profile(EXPORTED, requested, DIMS)
    message = str(info.value)
    assert axis in message and allowed in message and f"--{axis}" in message
    assert "\n" not in message


def test_sides_must_be_multiples_the_unet_can_serve():
    requested = ShapeProfile(batch=(1, 1, 4), height=(64, 120, 256), width=(64, 128, 256))
    with pytest.raises(ProfileError, match=r"height opt 120 is not a multiple of 16"):
        build_profile(EXPORTED, requested, DIMS)


def test_unet_ranges_double_the_batch_for_cfg_and_resolve_latents():
    ranges = input_ranges(UNET, EXPORTED, DIMS)
    assert list(ranges) == ["sample", "timestep", "encoder_hidden_states"]
    assert ranges["sample"] == ((1, 4, 8, 8), (2, 4, 16, 16), (8, 4, 32, 32))
    assert ranges["timestep"] == ((), (), ())  # a scalar, as diffusers and optimum pass it
    assert ranges["encoder_hidden_states"] == ((1, 77, 32), (2, 77, 32), (8, 77, 32))


def test_components_without_cfg_keep_the_image_batch():
    ranges = input_ranges(VAE_DECODER, EXPORTED, DIMS)
    assert ranges["latent_sample"] == ((1, 4, 8, 8), (1, 4, 16, 16), (4, 4, 32, 32))
    assert input_ranges(TEXT_ENCODER, EXPORTED, DIMS)["input_ids"] == ((1, 77), (2, 77), (8, 77))


def test_sdxl_unet_gets_every_input():
    dims = ModelDims(S=77, E=2048, P=1280, C=4, vae_scale_factor=8, unet_downsample=4, E1=768, E2=1280, T=6)
    profile = ShapeProfile(batch=(1, 1, 2), height=(512, 1024, 1024), width=(512, 1024, 1024))
    ranges = input_ranges(SDXL_UNET, profile, dims)
    assert ranges["time_ids"] == ((1, 6), (2, 6), (4, 6))
    assert ranges["text_embeds"][2] == (4, 1280)
    assert ranges["sample"][2] == (4, 4, 128, 128)


def test_static_uses_opt_everywhere():
    profile = build_profile(EXPORTED, None, DIMS, static=True)
    assert profile == ShapeProfile(batch=(1, 1, 1), height=(128, 128, 128), width=(128, 128, 128))
    assert profile.is_static and static_profile(profile) == profile
    vae = input_ranges(VAE_DECODER, profile, DIMS)
    assert vae["latent_sample"] == ((1, 4, 16, 16),) * 3
    # Under CFG the U-Net still sees batch 1 (guidance 1) and 2, so it is not fully static.
    unet = input_ranges(UNET, profile, DIMS)
    assert unet["sample"] == ((1, 4, 16, 16), (2, 4, 16, 16), (2, 4, 16, 16))


def test_explicit_single_numbers_are_static_and_checked():
    requested = ShapeProfile.parse("2", "192", "256")
    assert build_profile(EXPORTED, requested, DIMS).is_static
    with pytest.raises(ProfileError, match=r"batch \[8, 8\] is not inside \[1, 4\]"):
        build_profile(EXPORTED, ShapeProfile.parse("8", "192", "256"), DIMS)


def test_static_of_a_request_outside_the_export_is_refused():
    requested = ShapeProfile(batch=(1, 1, 4), height=(64, 512, 512), width=(64, 128, 256))
    with pytest.raises(ProfileError, match="height"):
        build_profile(EXPORTED, requested, DIMS, static=True)


# From mutation testing round 6


def test_static_collapses_a_requested_profile_to_its_opt_point():
    """``--static`` with ``--batch``/``--height``/``--width``/``--prompt-chunks`` builds the one shape
    the user asked for as opt, on every axis: a dynamic plan keyed as static would be reused where a
    static one was meant, and one chunk would cut the prompts the user asked to read whole."""
    exported = ShapeProfile(batch=(1, 1, 4), height=(64, 128, 256), width=(64, 128, 256), chunks=(1, 1, 3))
    requested = ShapeProfile(batch=(1, 2, 4), height=(64, 192, 256), width=(64, 128, 256), chunks=(1, 2, 3))
    assert build_profile(exported, requested, DIMS, static=True) == ShapeProfile(
        batch=(2, 2, 2), height=(192, 192, 192), width=(128, 128, 128), chunks=(2, 2, 2))
