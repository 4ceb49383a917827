"""ShapeProfile and ComponentSpec arithmetic: the single source of every shape."""

from __future__ import annotations

import pytest

from sdexport.errors import ProfileError
from sdexport.shapes import ShapeProfile, parse_range
from sdexport.specs import UNET, VAE_DECODER, VAE_ENCODER, ModelDims, resolve_dim

DIMS = ModelDims(S=77, E=768, P=768, C=4, vae_scale_factor=8, unet_downsample=8)


def test_parse_range_forms():
    assert parse_range("1:2:4", "batch") == (1, 2, 4)
    assert parse_range("512", "height") == (512, 512, 512)
    for bad in ("4:2:1", "0:1:2", "a:b:c", "1:2"):
        with pytest.raises(ProfileError, match="--batch"):
            parse_range(bad, "batch")


def test_validate_names_the_bad_value_and_valid_neighbours():
    profile = ShapeProfile(height=(256, 520, 1024))
    with pytest.raises(ProfileError, match=r"height opt 520 is not a multiple of 64.*try 512 or 576"):
        profile.validate(DIMS)


def test_cfg_doubles_unet_batch_but_not_vae():
    profile = ShapeProfile(batch=(1, 2, 4), height=(256, 512, 768), width=(256, 512, 1024))
    unet = profile.tensor_ranges(UNET, DIMS)
    assert unet["sample"] == ((1, 4, 32, 32), (4, 4, 64, 64), (8, 4, 96, 128))
    assert unet["timestep"] == ((), (), ())
    assert unet["encoder_hidden_states"][2] == (8, 77, 768)
    vae = profile.tensor_ranges(VAE_DECODER, DIMS)
    assert vae["latent_sample"] == ((1, 4, 32, 32), (2, 4, 64, 64), (4, 4, 96, 128))


def test_dims_resolve_multipliers():
    sizes = DIMS.sizes(2, 512, 256)
    assert VAE_ENCODER.outputs[0].shape(sizes) == (2, 8, 64, 32)
    assert resolve_dim("77", sizes) == 77
    assert UNET.inputs[0].dynamic_axes == {0: "B", 2: "h", 3: "w"}


def test_request_outside_profile_says_what_is_allowed():
    profile = ShapeProfile()
    with pytest.raises(ProfileError, match=r"height 2048 is outside.*\[256, 1024\]"):
        profile.check_request(1, 2048, 512, DIMS)
    with pytest.raises(ProfileError, match="multiple of 64"):
        profile.check_request(1, 520, 512, DIMS)
    with pytest.raises(ProfileError, match="width 520 must be a multiple of 64"):
        profile.check_request(1, 512, 520, DIMS)
    profile.check_request(4, 1024, 256, DIMS)


def test_the_limits_hold_at_their_bounds_exactly():
    """32 prompt chunks and 2^31 - 1 VAE values are taken; one more of either is refused."""
    from sdexport.shapes import MAX_PROMPT_CHUNKS, MAX_TENSOR_ELEMENTS

    ShapeProfile(chunks=(1, 1, MAX_PROMPT_CHUNKS)).check_limits(128)
    with pytest.raises(ProfileError, match="at most 32 chunks"):
        ShapeProfile(chunks=(1, 1, MAX_PROMPT_CHUNKS + 1)).check_limits(128)
    assert MAX_TENSOR_ELEMENTS == 2**31 - 1  # (one channel, one row: the count is the width)
    ShapeProfile(batch=(1, 1, 1), height=(64, 64, 1), width=(64, 64, MAX_TENSOR_ELEMENTS)).check_limits(1)
    with pytest.raises(ProfileError, match="beyond the 2\\^31 elements"):
        ShapeProfile(batch=(1, 1, 1), height=(64, 64, 1), width=(64, 64, MAX_TENSOR_ELEMENTS + 1)).check_limits(1)


def test_verification_points_include_an_uneven_mix():
    labels = [p[0] for p in ShapeProfile().points()]
    assert labels == ["min", "opt", "max", "odd"]
    from sdexport.export.verify import verification_points

    points = dict(verification_points(UNET, ShapeProfile(batch=(1, 1, 3), height=(256, 512, 768),
                                                         width=(256, 512, 768)), DIMS, "full"))
    odd = points["odd"]  # the largest batch (doubled for guidance) at the least height and the largest width
    assert odd is not None and (odd["B"], odd["h"], odd["w"]) == (6, 32, 96)


def test_with_ranges_replaces_only_the_given_axes():
    tiny = ShapeProfile(batch=(1, 1, 2), height=(64, 128, 256), width=(64, 128, 256))
    assert tiny.with_ranges(height="64:64:128", batch=None) == ShapeProfile(
        batch=(1, 1, 2), height=(64, 64, 128), width=(64, 128, 256))


def test_a_profile_of_one_size_is_not_static_where_the_prompt_chunks_vary():
    """The chunks axis counts too: such plans are not keyed and labelled static (mutation round 4)."""
    assert not ShapeProfile((1, 1, 1), (512,) * 3, (512,) * 3, (1, 1, 3)).is_static


def test_a_request_outside_an_axis_the_server_was_not_told_names_the_engines_profile():
    """``serve --height`` alone: a batch out of range is refused in the engines' words, not a KeyError."""
    with pytest.raises(ProfileError, match="outside the engines' profile"):
        ShapeProfile((1, 1, 4), (256, 512, 1024), (256, 512, 1024)).check_request(8, 512, 512, DIMS, served={"height": "sdexport serve --height"})


def test_the_hint_for_a_side_below_the_image_multiple_is_the_multiple_alone():
    """Rounding 8 down gives 0, which is no size: the hint names 64 only."""
    with pytest.raises(ProfileError, match=r"try 64$"):
        ShapeProfile(height=(8, 512, 1024)).validate(DIMS)


def test_the_odd_verification_point_reads_the_most_chunks():
    profile = ShapeProfile((1, 1, 4), (256, 512, 1024), (256, 512, 1024), (1, 1, 3))
    assert list(profile.points())[-1] == ("odd", 4, 256, 1024, 3)
