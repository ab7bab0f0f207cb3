"""The photographs the proofs and benchmarks calibrate and judge on: scikit-image's samples (in its
wheel, the ``photos`` extra), written once as PNG files that ``--calibrate`` / ``--image`` take.
Calibrated on CALIB, judged on JUDGE: no photo is in both."""
from __future__ import annotations

from pathlib import Path

CALIB = ("rocket", "immunohistochemistry", "retina", "hubble_deep_field")
JUDGE = ("astronaut", "coffee", "chelsea")


def save_photos(folder: Path, names) -> list[Path]:
    """``folder``/NAME.png for each scikit-image sample ``name`` (RGB; a grey one stacked to three
    channels), written where missing."""
    import numpy as np
    import skimage.data
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name in names:
        path = folder / f"{name}.png"
        if not path.exists():
            a = np.asarray(getattr(skimage.data, name)())
            a = np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3]
            Image.fromarray(a).save(path)
        out.append(path)
    return out
