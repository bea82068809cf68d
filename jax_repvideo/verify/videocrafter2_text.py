"""``verify videocrafter2-text DIR``: the CLIP tokenizer and the OpenCLIP text tower against the dump.

``DIR`` has the layout of ``shared/fixtures/vc2_vae_text``: ``text_config.json`` (FrozenOpenCLIPEmbedder
description), ``text.ckpt`` (``cond_stage_model.model.*`` keys) and ``text_io.npz`` (prompts, their
token rows, the embedding, per-block outputs, and the penultimate / last outputs). The tokenizer must
reproduce every token row exactly; the model then runs on the tokenizer's own rows.
``text_pooled_projected`` is not checked: it needs ``text_projection``, which VideoCrafter2 never uses.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_repvideo.checkpoint import nest
from jax_repvideo.verify import check

TOLERANCE = 1e-4


def load_model(directory: Path):
    from convert.common import load_torch_state_dict, strip_prefix
    from convert.videocrafter2_text import PREFIX, abstract_text, convert_text
    from jax_repvideo.models.text_clip import from_embedder_config

    cfg = from_embedder_config(json.loads((directory / "text_config.json").read_text()))
    flat = convert_text(strip_prefix(load_torch_state_dict(directory / "text.ckpt"), PREFIX), cfg)
    graphdef, state = nnx.split(abstract_text(cfg))
    nnx.replace_by_pure_dict(state, nest({k: jnp.asarray(v) for k, v in flat.items()}))
    return nnx.merge(graphdef, state)


def check_tokens(prompts, expected: np.ndarray, context_length: int) -> tuple[bool, np.ndarray]:
    from jax_repvideo.models.tokenizer_clip import ClipTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the long prompt's truncation warning is expected here
        ours = ClipTokenizer(context_length=context_length)(list(prompts))
    wrong = [i for i in range(len(expected)) if not np.array_equal(ours[i], expected[i])]
    print(f"{'text tokens (exact)':<40s} {len(expected) - len(wrong)}/{len(expected)} rows equal  "
          f"{'ok' if not wrong else 'FAIL rows ' + str(wrong)}", flush=True)
    return not wrong, ours


def _forward(model, tokens):
    x = model.embed(tokens)
    _, blocks = model.run_blocks(x, model.cfg.layers - 1)
    return {
        "text_embed_in": x,
        "text_resblock_outputs": blocks,
        "text_penultimate": model(tokens, layer="penultimate"),
        "text_last": model(tokens, layer="last"),
    }


def run(directory: Path) -> bool:
    model = load_model(directory)
    data = np.load(directory / "text_io.npz")
    ok, tokens = check_tokens(data["text_prompts"], data["text_tokens"], model.cfg.context_length)
    graphdef, state = nnx.split(model)
    with jax.default_matmul_precision("float32"):
        outputs = jax.jit(lambda s, t: _forward(nnx.merge(graphdef, s), t))(state, jnp.asarray(tokens))
    for name, ours in outputs.items():
        ok &= check(f"text {name}", ours, data[name], TOLERANCE)
    return bool(ok)
