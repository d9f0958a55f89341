"""The emulator's edits follow the prompt: each effect word changes the picture the expected way."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipeline.emulator import render
from pipeline.emulator.vocabulary import BLEND, PALETTE, PLACE, plan_for

SIZE = 512


def png(im: Image.Image) -> bytes:
    out = io.BytesIO()
    im.save(out, "PNG")
    return out.getvalue()


def landscape() -> bytes:
    """A sky gradient over hills, a red house with a dark outline, a green field."""
    w, h = 320, 240
    im = Image.new("RGB", (w, h))
    d = ImageDraw.Draw(im)
    for y in range(h):
        t = y / h
        d.line((0, y, w, y), fill=(int(110 + 90 * t), int(160 + 55 * t), int(230 + 5 * t)))
    d.polygon(
        [(0, 150), (80, 95), (160, 140), (240, 90), (320, 150), (320, 240), (0, 240)],
        fill=(70, 110, 70),
    )
    d.rectangle((0, 200, w, h), fill=(60, 130, 60))
    d.rectangle((130, 150, 190, 200), fill=(180, 50, 40), outline=(30, 20, 20), width=3)
    return png(im)


def product() -> bytes:
    """A blue bottle with a dark outline on a beige wall and a brown floor."""
    im = Image.new("RGB", (300, 300), (190, 170, 140))
    d = ImageDraw.Draw(im)
    d.rectangle((0, 220, 300, 300), fill=(120, 98, 80))
    d.rounded_rectangle(
        (100, 60, 200, 250), radius=16, fill=(30, 90, 160), outline=(10, 30, 60), width=4
    )
    return png(im)


def solid(colour: tuple[int, int, int], size: tuple[int, int] = (120, 120)) -> bytes:
    return png(Image.new("RGB", size, colour))


def logo() -> bytes:
    """An orange disc on a grey ground (what a transparent logo flattens to)."""
    im = Image.new("RGB", (128, 128), (128, 128, 128))
    ImageDraw.Draw(im).ellipse((8, 8, 120, 120), fill=(240, 90, 30))
    return png(im)


def base_of(*images: bytes, mask: bytes | None = None) -> render.Base:
    return render.build_base(list(images), mask, SIZE, SIZE)


def picture(base: render.Base, prompt: str, seed: int = 1, variant: int = 0) -> np.ndarray:
    """The variant's pixels between the bands, as int32."""
    im = render.variant_picture(base, prompt=prompt, seed=seed, variant=variant, n=1)
    top, bottom = base.layout.middle
    return np.asarray(im, dtype=np.int32)[top:bottom]


def plain(base: render.Base) -> np.ndarray:
    return picture(base, "make a change")


def luma(a: np.ndarray) -> np.ndarray:
    return np.asarray(a @ np.array([0.299, 0.587, 0.114]))


def saturation(a: np.ndarray) -> np.ndarray:
    high, low = a.max(axis=-1), a.min(axis=-1)
    return np.asarray((high - low) / np.maximum(high, 1))


def high_frequency(a: np.ndarray) -> float:
    """Mean absolute Laplacian of the luma: fine detail."""
    g = luma(a)
    lap = 4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]
    return float(np.abs(lap).mean())


def near_white(a: np.ndarray, level: int = 235) -> np.ndarray:
    return np.asarray((a >= level).all(axis=-1))


LANDSCAPE = landscape()
PRODUCT = product()


# --- the vocabulary ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "effects"),
    [
        ("Add a starry night sky with the milky way", {"night", "milky_way"}),
        ("Make it a winter scene", {"snow"}),
        ("Golden hour light", {"sunset"}),
        ("Turn it into a watercolour painting", {"paint"}),
        ("a pencil sketch", {"sketch"}),
        ("cyberpunk neon city", {"neon"}),
        ("Make it black and white", {"mono"}),
        (
            "Put the product on a pure white studio background with a soft shadow",
            {"white_background", "shadow"},
        ),
        ("blur the photo", {"blur"}),
        ("sharpen the details", {"sharpen"}),
        ("a snowy night", {"snow", "night"}),
        ("make the red square a circle", set()),
        ("a nightingale on a snowboard", set()),  # whole words only
        ("a soft shadow", set()),  # a shadow needs a background to fall on
    ],
)
def test_the_vocabulary_is_plain_word_matching(prompt: str, effects: set[str]) -> None:
    assert set(plan_for(prompt).effects) == effects


def test_reference_uses_come_from_the_nearest_word() -> None:
    plan = plan_for(
        "Place the logo from image 2 on the bottle in image 1 and use the palette of image 3"
    )
    assert plan.references == ((0, PLACE), (1, PALETTE))
    assert plan_for("Repaint image 1 in the colours and brush strokes of image 2").use_of(0) == (
        PALETTE
    )
    assert plan_for("image 2 please").use_of(0) == BLEND
    assert plan_for("anything").use_of(3) == BLEND


# --- each effect, in the expected direction -----------------------------------------------


def test_night_darkens_the_sky_and_adds_stars() -> None:
    base = base_of(LANDSCAPE)
    before, after = plain(base), picture(base, "Add a starry night sky")
    sky = slice(0, before.shape[0] // 4)
    assert luma(after[sky]).mean() < 0.4 * luma(before[sky]).mean()
    assert luma(after).mean() < 0.5 * luma(before).mean()
    # Stars: bright specks on the dark sky, which had none that bright before.
    assert (luma(after[sky]) > 170).sum() > 50
    assert (luma(after[sky]) > 170).mean() < 0.05


def test_sunset_warms_the_picture() -> None:
    base = base_of(LANDSCAPE)
    before, after = plain(base), picture(base, "at sunset")
    warmth = lambda a: float((a[..., 0] - a[..., 2]).mean())  # noqa: E731
    assert warmth(after) > warmth(before) + 40


def test_black_and_white_has_no_colour() -> None:
    base = base_of(LANDSCAPE)
    before, after = plain(base), picture(base, "black and white photo")
    assert saturation(before).mean() > 0.2
    assert saturation(after).mean() < 0.01


def test_snow_is_cooler_brighter_and_speckled() -> None:
    base = base_of(LANDSCAPE)
    before, after = plain(base), picture(base, "a winter scene with snow")
    coolness = lambda a: float((a[..., 2] - a[..., 0]).mean())  # noqa: E731
    assert coolness(after) > coolness(before) + 10
    assert luma(after).mean() > luma(before).mean() + 10
    # Flakes: near-white specks where the picture (the field) had none.
    field = slice(after.shape[0] * 3 // 4, after.shape[0])
    assert near_white(before[field]).sum() == 0
    assert near_white(after[field]).sum() > 100


def test_white_background_floods_the_border_but_not_the_object() -> None:
    base = base_of(PRODUCT)
    before, after = plain(base), picture(base, "on a white background")
    h, w = after.shape[:2]
    border = np.zeros((h, w), dtype=bool)
    border[:, : w // 10] = border[:, -w // 10 :] = True
    assert near_white(before)[border].mean() < 0.01
    assert near_white(after)[border].mean() > 0.95
    centre = after[h // 2 - 20 : h // 2 + 20, w // 2 - 20 : w // 2 + 20]
    assert not near_white(centre).any()
    assert np.abs(centre - before[h // 2 - 20 : h // 2 + 20, w // 2 - 20 : w // 2 + 20]).max() < 8


def test_blur_lowers_and_sharpen_raises_fine_detail() -> None:
    base = base_of(LANDSCAPE)
    before = high_frequency(plain(base))
    assert high_frequency(picture(base, "blur it")) < 0.6 * before
    assert high_frequency(picture(base, "sharpen it")) > 1.3 * before


def test_neon_glows_saturated_on_the_edges_of_a_dark_picture() -> None:
    base = base_of(PRODUCT)
    before, after = plain(base), picture(base, "neon cyberpunk style")
    g = luma(before)
    edge = np.zeros(g.shape, dtype=bool)
    edge[1:-1, 1:-1] = (
        np.abs(4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]) > 30
    )
    assert edge.sum() > 100
    assert luma(after)[~edge].mean() < 0.5 * luma(before)[~edge].mean()
    assert saturation(after)[edge].mean() > saturation(before)[edge].mean() + 0.1
    assert luma(after)[edge].mean() > 2 * luma(after)[~edge].mean()


def test_watercolour_changes_the_picture_and_inks_its_edges() -> None:
    base = base_of(LANDSCAPE)
    before, after = plain(base), picture(base, "as a watercolour painting")
    assert np.abs(after - before).mean() > 12
    assert saturation(after).mean() > saturation(before).mean()


def test_sketch_is_dark_lines_on_pale_paper() -> None:
    base = base_of(LANDSCAPE)
    before, after = plain(base), picture(base, "a pencil sketch")
    assert saturation(after).mean() < 0.08
    assert np.median(luma(after)) > 200 > np.median(luma(before))
    assert (luma(after) < 120).mean() > 0.002  # some lines


def test_effects_combine() -> None:
    base = base_of(LANDSCAPE)
    night, snowy_night = picture(base, "night"), picture(base, "a snowy night")
    assert not np.array_equal(night, snowy_night)
    field = slice(night.shape[0] * 3 // 4, night.shape[0])
    assert near_white(snowy_night[field], 200).sum() > near_white(night[field], 200).sum() + 100
    assert luma(snowy_night).mean() < luma(plain(base)).mean()


# --- references and masks ------------------------------------------------------------------


def test_a_reference_palette_moves_the_colours_toward_it() -> None:
    base = base_of(LANDSCAPE, solid((240, 60, 200)))
    before = picture(base, "hello image 2")  # blended in at a third
    after = picture(base, "use the palette of image 2")
    magenta = lambda a: float((a[..., 0] + a[..., 2] - 2 * a[..., 1]).mean())  # noqa: E731
    assert magenta(plain(base_of(LANDSCAPE))) < magenta(before) < magenta(after)


def test_a_placed_reference_appears_cut_out_at_the_centre() -> None:
    base = base_of(PRODUCT, logo())
    after = picture(base, "Place the logo from image 2 on the bottle")
    h, w = after.shape[:2]
    centre = after[h // 2 - 10 : h // 2 + 10, w // 2 - 10 : w // 2 + 10]
    assert np.abs(centre - np.array([240, 90, 30])).max() < 10
    # The logo's grey ground is left out: no grey square around the disc.
    side = round(SIZE * 0.32)
    corner = after[h // 2 - side // 2 + 3, w // 2 - side // 2 + 3]
    assert np.abs(corner - 128).max() > 20


def test_a_mask_keeps_the_effects_inside_its_area() -> None:
    mask = Image.new("RGBA", (320, 240), (0, 0, 0, 255))
    ImageDraw.Draw(mask).rectangle((100, 60, 220, 180), fill=(0, 0, 0, 0))
    base = base_of(LANDSCAPE, mask=png(mask))
    after = picture(base, "a snowy night")
    source = np.asarray(base.fitted, dtype=np.int32)[slice(*base.layout.middle)]
    area = np.asarray(base.area)[slice(*base.layout.middle)] > 0
    assert area.mean() > 0.1
    assert np.array_equal(after[~area], source[~area])
    assert luma(after[area]).mean() < 0.6 * luma(source[area]).mean()


# --- determinism and the seed --------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["a starry night", "snow", "sunset", "a snowy night"])
def test_same_seed_same_bytes_other_seed_other_stamps(prompt: str) -> None:
    base = base_of(LANDSCAPE)
    for fmt in ("jpeg", "png"):
        one = render.render_variant(base, prompt=prompt, seed=7, variant=0, n=2, output_format=fmt)
        again = render.render_variant(
            base_of(LANDSCAPE), prompt=prompt, seed=7, variant=0, n=2, output_format=fmt
        )
        assert one == again
    a, b, c = picture(base, prompt, 7), picture(base, prompt, 8), picture(base, prompt, 7, 1)
    for other in (b, c):
        changed = (np.abs(a - other).max(axis=-1) > 40).mean()
        assert changed > 0.001  # stars, flakes or the sun moved: visibly different


@pytest.mark.parametrize("prompt", ["a starry night with the milky way", "snowy sunset", "p"])
def test_spliced_outputs_equal_whole_encodes(prompt: str) -> None:
    base = base_of(LANDSCAPE, solid((20, 200, 90)))
    whole = render.variant_picture(base, prompt=prompt, seed=3, variant=1, n=2)
    jpeg = render.render_variant(
        base, prompt=prompt, seed=3, variant=1, n=2, output_format="jpeg", compression=80
    )
    assert jpeg == render.encode(whole, "jpeg", 80)
    out = render.render_variant(base, prompt=prompt, seed=3, variant=1, n=2, output_format="png")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(out))), np.asarray(whole))


def test_a_prompt_without_effect_words_keeps_the_plain_edit() -> None:
    base = base_of(LANDSCAPE)
    top, strip = render.render_bands(base.layout, prompt="p", seed=1, variant=0, n=1)
    whole = render.variant_picture(base, prompt="p", seed=1, variant=0, n=1)
    assert np.array_equal(np.asarray(whole), np.asarray(render.compose(base, top, strip)))
