"""The cut-out bench's anchor: rembg (U²-Net-p through onnxruntime) on the test photos that
`cutout_eval OUT` wrote (NAME.jpg, NAME-truth.png). Prints, per photo, the median time of
`rembg.remove` over RUNS runs (upload bytes in, RGBA PNG out: what kiln's cut-out does too) and
the IoU of its alpha (>= 128) with the truth. Usage: cutout_anchor.py OUT RUNS NAME..."""
import io
import statistics
import sys
import time

import numpy as np
from PIL import Image
from rembg import new_session, remove

out, runs, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
session = new_session("u2netp")
for name in names:
    upload = open(f"{out}/{name}.jpg", "rb").read()
    times, result = [], None
    for _ in range(runs):
        start = time.perf_counter()
        result = remove(upload, session=session)
        times.append((time.perf_counter() - start) * 1000)
    alpha = np.array(Image.open(io.BytesIO(result)).convert("RGBA"))[:, :, 3] >= 128
    truth = np.array(Image.open(f"{out}/{name}-truth.png")) >= 128
    iou = (alpha & truth).sum() / max((alpha | truth).sum(), 1)
    transparent = (truth & ~alpha).sum() / max(truth.sum(), 1)
    print(f"{name} rembg {iou:.4f} {transparent:.4f} {statistics.median(times):.0f}")
