# Before/after panels for docs/ASSETS.md (needs Pillow): after `cutout_eval OUT 1`,
# `python3 scripts/cutout_panels.py OUT NAME...` writes docs/img/cutout-NAME.jpg: upload | colour | learned.
import sys
from PIL import Image, ImageDraw
out, names = sys.argv[1], sys.argv[2:]
for name in names:
    up = Image.open(f"{out}/{name}.jpg").convert("RGB")
    w, h = up.size
    s = min(w, h)
    up = up.crop(((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2))
    tiles = [("upload", up)]
    for method, label in [("colour", "colour cut-out (before)"), ("learned", "learned cut-out (after)")]:
        tiles.append((label, Image.open(f"{out}/{name}-{method}-velvet.png").convert("RGB")))
    sheet = Image.new("RGB", (920, 322), "white")
    d = ImageDraw.Draw(sheet)
    for k, (label, im) in enumerate(tiles):
        im.thumbnail((300, 300))
        x = k * 310
        sheet.paste(im, (x + (300 - im.width) // 2, 22 + (300 - im.height) // 2))
        d.text((x + 4, 4), label, fill="black")
    sheet.save(f"docs/img/cutout-{name}.jpg", quality=85)
