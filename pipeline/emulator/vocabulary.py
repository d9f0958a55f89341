"""The emulator's edit vocabulary: which effects a prompt asks for, by plain word matching."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

# The effects, in the order they are applied (whatever order the prompt names them in).
EFFECT_ORDER = (
    "white_background",
    "shadow",
    "paint",
    "sketch",
    "sunset",
    "snow",
    "night",
    "milky_way",
    "mono",
    "neon",
    "blur",
    "sharpen",
)

# effect -> the words and phrases that ask for it. A phrase matches its words in order with
# at most PHRASE_GAP other words between two of them ("white studio background").
VOCABULARY: dict[str, tuple[str, ...]] = {
    "white_background": (
        "white background",
        "white backdrop",
        "white studio",
        "remove background",
        "background removed",
        "cutout",
        "cut out",
        "isolated on white",
    ),
    "shadow": ("shadow", "shadows"),
    "paint": (
        "watercolour",
        "watercolor",
        "watercolours",
        "watercolors",
        "painting",
        "painted",
        "paint",
        "repaint",
        "brush",
        "brushstrokes",
        "strokes",
        "gouache",
        "impressionist",
        "oil painting",
        "acrylic",
    ),
    "sketch": ("sketch", "sketched", "pencil", "drawing", "charcoal", "line art", "lineart"),
    "sunset": (
        "sunset",
        "sunrise",
        "golden hour",
        "dusk",
        "dawn",
        "evening",
        "golden",
        "warm",
        "warmer",
    ),
    "snow": (
        "snow",
        "snowy",
        "snowing",
        "snowfall",
        "snowflakes",
        "winter",
        "wintry",
        "wintery",
        "blizzard",
        "frost",
        "frosty",
        "icy",
    ),
    "night": (
        "night",
        "nighttime",
        "midnight",
        "starry",
        "stars",
        "star",
        "starlit",
        "moonlit",
        "moonlight",
        "galaxy",
        "milky way",
    ),
    "milky_way": ("milky way", "galaxy"),
    "mono": (
        "black and white",
        "black & white",
        "b&w",
        "monochrome",
        "greyscale",
        "grayscale",
        "noir",
    ),
    "neon": ("neon", "cyberpunk", "synthwave", "vaporwave", "glow", "glowing"),
    "blur": (
        "blur",
        "blurred",
        "blurry",
        "defocus",
        "defocused",
        "bokeh",
        "soft focus",
        "out of focus",
    ),
    "sharpen": (
        "sharpen",
        "sharpened",
        "sharper",
        "sharp",
        "sharpness",
        "crisp",
        "crisper",
        "deblur",
        "unblur",
        "more detail",
    ),
}
PHRASE_GAP = 2

# How a reference image ("image 2", "image 3", ...) is used, from the nearest of these words
# before its mention (within REFERENCE_WINDOW words), else after it; unnamed references blend.
PALETTE = "palette"
PLACE = "place"
BLEND = "blend"
REFERENCE_WORDS: dict[str, str] = {
    **dict.fromkeys(
        (
            "palette",
            "colours",
            "colors",
            "colour",
            "color",
            "tones",
            "style",
            "strokes",
            "brush",
            "look",
            "mood",
            "lighting",
        ),
        PALETTE,
    ),
    **dict.fromkeys(
        ("place", "put", "add", "insert", "paste", "overlay", "stamp", "logo", "sticker", "badge"),
        PLACE,
    ),
    **dict.fromkeys(("blend", "mix", "merge", "combine", "texture"), BLEND),
}
REFERENCE_WINDOW = 8
IMAGE_WORDS = frozenset(("image", "img", "picture", "photo"))
NUMBER_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}

_WORD = re.compile(r"[a-z0-9&]+")


@dataclass(frozen=True)
class Plan:
    """What a prompt asks for: effects (in EFFECT_ORDER) and each named reference's use."""

    effects: tuple[str, ...] = ()
    references: tuple[tuple[int, str], ...] = ()  # (reference index from 0 = image 2, use)

    def __bool__(self) -> bool:
        return bool(self.effects or self.references)

    def has(self, effect: str) -> bool:
        return effect in self.effects

    def use_of(self, reference: int) -> str:
        for index, use in self.references:
            if index == reference:
                return use
        return BLEND


def words(prompt: str) -> list[str]:
    """The prompt's words, lower case ("b&w" is one word)."""
    return _WORD.findall(prompt.lower())


def _matches(tokens: list[str], phrase: str) -> bool:
    parts = phrase.split()
    for start, token in enumerate(tokens):
        if token != parts[0]:
            continue
        pos = start
        for part in parts[1:]:
            window = tokens[pos + 1 : pos + 2 + PHRASE_GAP]
            if part not in window:
                break
            pos += 1 + window.index(part)
        else:
            return True
    return False


def _image_number(token: str) -> int | None:
    if token.isdigit():
        return int(token)
    return NUMBER_WORDS.get(token)


def _references(tokens: list[str]) -> tuple[tuple[int, str], ...]:
    found: dict[int, str] = {}
    for i, token in enumerate(tokens[:-1]):
        number = _image_number(tokens[i + 1])
        if token not in IMAGE_WORDS or number is None or number < 2 or number - 2 in found:
            continue
        use = BLEND
        before = tokens[max(0, i - REFERENCE_WINDOW) : i]
        after = tokens[i + 2 : i + 2 + REFERENCE_WINDOW // 2]
        for word in [*reversed(before), *after]:
            if word in REFERENCE_WORDS:
                use = REFERENCE_WORDS[word]
                break
        found[number - 2] = use
    return tuple(sorted(found.items()))


@lru_cache(maxsize=1024)
def plan_for(prompt: str) -> Plan:
    """The effects and reference uses `prompt` asks for (no word asks for nothing)."""
    tokens = words(prompt)
    present = {
        effect
        for effect, phrases in VOCABULARY.items()
        if any(_matches(tokens, phrase) for phrase in phrases)
    }
    if "shadow" in present and "white_background" not in present:
        present.discard("shadow")  # a drop shadow needs a background to fall on
    effects = tuple(e for e in EFFECT_ORDER if e in present)
    return Plan(effects, _references(tokens))
