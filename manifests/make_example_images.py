"""Draws the example manifest's source images with Pillow (run it to regenerate them)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).parent / "images"


def product() -> Image.Image:
    im = Image.new("RGB", (320, 320), (182, 160, 132))
    d = ImageDraw.Draw(im)
    d.rectangle((0, 220, 320, 320), fill=(120, 98, 80))
    d.rounded_rectangle(
        (110, 70, 210, 250), radius=18, fill=(30, 90, 160), outline=(10, 30, 60), width=4
    )
    d.rectangle((135, 40, 185, 75), fill=(200, 200, 210), outline=(60, 60, 70), width=3)
    d.rectangle((125, 130, 195, 180), fill=(240, 240, 240))
    d.text((138, 147), "AQUA", fill=(30, 90, 160))
    return im


def landscape() -> Image.Image:
    w, h = 384, 216
    im = Image.new("RGB", (w, h))
    d = ImageDraw.Draw(im)
    for y in range(h):
        t = y / h
        d.line((0, y, w, y), fill=(int(120 + 100 * t), int(170 + 50 * t), int(230 - 40 * t)))
    d.polygon(
        [(0, 170), (90, 80), (170, 160), (250, 60), (384, 170), (384, 216), (0, 216)],
        fill=(70, 90, 80),
    )
    d.polygon([(225, 90), (250, 60), (275, 90)], fill=(245, 245, 250))
    d.rectangle((0, 190, w, h), fill=(60, 120, 60))
    return im


def portrait() -> Image.Image:
    im = Image.new("RGB", (240, 320), (225, 215, 200))
    d = ImageDraw.Draw(im)
    d.ellipse((70, 50, 170, 170), fill=(235, 190, 160), outline=(120, 80, 60), width=3)
    d.rectangle((60, 170, 180, 320), fill=(90, 60, 120))
    d.ellipse((95, 95, 110, 110), fill=(40, 40, 40))
    d.ellipse((130, 95, 145, 110), fill=(40, 40, 40))
    d.arc((100, 115, 140, 145), 20, 160, fill=(150, 60, 60), width=3)
    return im


def style() -> Image.Image:
    im = Image.new("RGB", (256, 256), (250, 240, 200))
    d = ImageDraw.Draw(im)
    colours = [(230, 60, 50), (250, 190, 40), (40, 110, 200), (20, 20, 20)]
    for i in range(12):
        c = colours[i % len(colours)]
        d.line((0, i * 24, 256, 256 - i * 20), fill=c, width=6)
    d.ellipse((80, 80, 176, 176), outline=(20, 20, 20), width=8)
    return im


def logo() -> Image.Image:
    im = Image.new("RGBA", (128, 128), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    d.ellipse((8, 8, 120, 120), fill=(240, 90, 30, 255))
    d.text((40, 56), "BRAND", fill=(255, 255, 255, 255))
    return im


def room() -> Image.Image:
    im = Image.new("RGB", (320, 240), (200, 190, 170))
    d = ImageDraw.Draw(im)
    d.rectangle((0, 170, 320, 240), fill=(140, 100, 70))
    d.rectangle((40, 110, 140, 175), fill=(90, 120, 90))
    d.rectangle((200, 40, 290, 120), fill=(235, 230, 220), outline=(90, 80, 70), width=3)
    return im


def room_mask() -> Image.Image:
    """Transparent (alpha 0) where the edit goes: the blank frame on the wall."""
    im = Image.new("RGBA", (320, 240), (0, 0, 0, 255))
    ImageDraw.Draw(im).rectangle((200, 40, 290, 120), fill=(0, 0, 0, 0))
    return im


def main() -> None:
    HERE.mkdir(parents=True, exist_ok=True)
    product().save(HERE / "product.png")
    landscape().save(HERE / "landscape.jpg", quality=88)
    portrait().save(HERE / "portrait.png")
    style().save(HERE / "style.webp", quality=85)
    logo().save(HERE / "logo.png")
    room().save(HERE / "room.png")
    room_mask().save(HERE / "room-mask.png")


if __name__ == "__main__":
    main()
