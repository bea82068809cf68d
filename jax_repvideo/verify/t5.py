"""``jax-repvideo verify t5 DIR``: our T5 v1.1 encoder against transformers.

``DIR/text_encoder/`` is a ``T5EncoderModel.save_pretrained`` folder; ``DIR/io.npz`` holds, per
case k, ``case{k}.input_ids`` ``(B, L)`` and ``case{k}.last_hidden_state`` ``(B, L, d_model)``
(``num_cases`` optional). The encoder runs without an attention mask, as the CogVideoX pipeline calls it.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from convert.t5 import load_model
from jax_repvideo.models.text_t5 import encode
from jax_repvideo.verify import check

TOLERANCE = 1e-4


def case_indices(io) -> list[int]:
    if "num_cases" in io:
        return list(range(int(io["num_cases"])))
    return sorted(int(k[4:].split(".")[0]) for k in io.files if k.endswith(".input_ids"))


def run(directory: Path) -> bool:
    io_path = directory / "io.npz"
    if not io_path.is_file():
        raise SystemExit(f"verify t5: {io_path} not found")
    model = load_model(directory / "text_encoder")
    io = np.load(io_path)
    ok = True
    with jax.default_matmul_precision("float32"):
        for k in case_indices(io):
            ids = io[f"case{k}.input_ids"]
            hidden = np.asarray(encode(model, ids))
            ok &= check(f"case{k} last_hidden_state {ids.shape}", hidden, io[f"case{k}.last_hidden_state"], TOLERANCE)
    return ok
