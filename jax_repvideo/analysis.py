"""RepVideo's measurements: adjacent-frame feature similarity per layer and step, and attention maps.

RepVideo (Fig. 5/7/12, spec §1.9) plots, for each transformer layer, the cosine similarity between
the video-token features of adjacent latent frames. We compute both readings of that figure, from
the features of the conditional branch at every denoising step of one sampled clip:

* **per-token**: for frames j and j+1, the cosine over channels between the features of the token
  at the same spatial position, averaged over positions;
* **flattened**: the cosine between the whole flattened feature maps of frames j and j+1.

Layers are the DiT blocks' outputs (video tokens of the joint sequence; with RepVideo the outputs
of the gated blocks) or the U-Net's block outputs (``input_blocks.i``, ``middle_block``,
``output_blocks.i``). The clip is sampled with plain DDIM from the run's seed (FIFO presets: one
window of ``fifo.video_length`` frames); ``compare=true`` repeats the sweep with RepVideo's gates at
0 (= CogVideoX) or with the Q-cache off, from the same noise.

``attention_map`` recomputes softmax(QKᵀ/√d) of one DiT block from its traced input;
``frame_attention`` condenses it to the attention mass from each query frame to the text and to
each key frame (RepVideo's method figure (b): deep layers attend mostly within their own frame).

``jax-repvideo analyze CONFIG [key=value …]`` writes ``similarity.png`` and ``similarity.json``
into ``analysis.out`` (default ``outputs/analysis``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_repvideo import config as config_lib
from jax_repvideo import generate_config as gc
from jax_repvideo.schedulers import cogvideox as cog
from jax_repvideo.schedulers import ddim, guidance

_EPS = 1e-8


@dataclasses.dataclass(frozen=True)
class AnalysisConfig:
    """The ``analysis:`` section of a run preset (every other section is ``GenerateConfig``'s)."""

    steps: int = 10  # DDIM steps of the analysed clip
    frames: int | None = None  # latent frames of the clip; null: the run's clip (FIFO: fifo.video_length)
    attention_layer: int | None = None  # DiT block whose attention is extracted; null: the last
    compare: bool = True  # also sweep the baseline: RepVideo gates 0, or the Q-cache off
    out: str = "outputs/analysis"  # folder for similarity.png and similarity.json


# ---------------------------------------------------------------------------------------------- similarity
def per_token_similarity(features: jax.Array) -> jax.Array:
    """``(T, P, D)`` → ``(T−1,)``: mean over the P positions of cos(frame j token p, frame j+1 token p)."""
    x = features.astype(jnp.float32)
    a, b = x[:-1], x[1:]
    cos = (a * b).sum(-1) / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), _EPS)
    return cos.mean(-1)


def flattened_similarity(features: jax.Array) -> jax.Array:
    """``(T, P, D)`` → ``(T−1,)``: cos between the flattened ``(P·D)`` features of frames j and j+1."""
    x = features.astype(jnp.float32).reshape(features.shape[0], -1)
    a, b = x[:-1], x[1:]
    return (a * b).sum(-1) / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), _EPS)


def frame_similarities(features: jax.Array) -> jax.Array:
    """``(T, P, D)`` → ``(2, T−1)``: [per-token, flattened]."""
    return jnp.stack([per_token_similarity(features), flattened_similarity(features)])


# ---------------------------------------------------------------------------------------------- DiT
def dit_video_features(trace: dict, text_len: int, frames: int, sample: int = 0) -> jax.Array:
    """Block outputs of one sample's video tokens: ``(layers, T, P, D)``."""
    out = trace["output"][:, sample, text_len:]
    return out.reshape(out.shape[0], frames, -1, out.shape[-1])


def _block(model, layer: int):
    if not model.scan_layers:
        return model.blocks[layer]
    graphdef, state = nnx.split(model.blocks)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[layer], state))


def _block_qk(model, trace: dict, layer: int, sample: int):
    """q, k ``(1, S, heads, head_dim)`` of block ``layer`` recomputed from its traced (gated) input."""
    block, text_len = _block(model, layer), model.config.max_text_seq_length
    h = trace["input_gated"][layer][sample:sample + 1]
    temb, temb_text = trace["temb"][sample:sample + 1], trace["temb_text"][sample:sample + 1]
    d = h.shape[-1]
    s, _ = block.norm1(h, temb, temb_text, text_len)
    attn = block.attn1
    split = lambda t: t.reshape(1, s.shape[1], attn.heads, d // attn.heads)  # noqa: E731
    return attn.norm_q(split(attn.to_q(s))), attn.norm_k(split(attn.to_k(s)))


def _probs(q, k):
    scores = jnp.einsum("qhd,khd->hqk", q.astype(jnp.float32), k.astype(jnp.float32)) / np.sqrt(q.shape[-1])
    return jax.nn.softmax(scores, axis=-1)


def attention_map(model, trace: dict, layer: int, queries=None, sample: int = 0) -> jax.Array:
    """softmax(QKᵀ/√d) of DiT block ``layer``: ``(heads, Q, S)`` over the joint ``[text; video]`` keys.

    ``trace`` comes from ``model(..., return_trace=True)``; ``queries`` (indices into the joint
    sequence) limits the rows: the full map is heads·S² floats (38 GB at CogVideoX-2B scale).
    """
    q, k = _block_qk(model, trace, layer, sample)
    q = q[0] if queries is None else q[0, jnp.asarray(queries)]
    return _probs(q, k[0])


def frame_attention(model, trace: dict, layer: int, sample: int = 0) -> jax.Array:
    """``(heads, T, 1+T)``: for video queries of frame j, the mean attention mass on the text
    (column 0) and on each key frame (columns 1…T). One query frame at a time (never S² floats)."""
    text_len = model.config.max_text_seq_length
    frames = trace["temb"].shape[1]
    q, k = _block_qk(model, trace, layer, sample)
    per_frame = (q.shape[1] - text_len) // frames

    def one_frame(j):
        qj = jax.lax.dynamic_slice_in_dim(q[0], text_len + j * per_frame, per_frame, axis=0)
        p = _probs(qj, k[0])  # (heads, P, S)
        video = p[..., text_len:].reshape(*p.shape[:2], frames, per_frame).sum(-1)
        return jnp.concatenate([p[..., :text_len].sum(-1, keepdims=True), video], -1).mean(1)

    return jnp.moveaxis(jax.lax.map(one_frame, jnp.arange(frames)), 0, 1)


def zero_gates(transformer_params):
    """The DiT's split state with RepVideo's gates set to 0 (exactly CogVideoX, spec §1.2)."""
    state = jax.tree.map(lambda a: a, transformer_params)
    state["gates"] = jax.tree.map(jnp.zeros_like, state["gates"])
    return state


@functools.lru_cache(maxsize=None)
def _dit_sweep(graphdef, layer: int):
    def run(params, schedule, table, x_T, cond, uncond):
        model = nnx.merge(graphdef, params)
        frames, text_len = x_T.shape[1], model.config.max_text_seq_length
        text = jnp.concatenate([cond, uncond])

        def body(x, i):
            t = jnp.broadcast_to(cog.model_timesteps(schedule, i), (2, frames))
            v, trace = model(jnp.concatenate([x, x]), t, text, return_trace=True)
            sims = jax.vmap(frame_similarities)(dit_video_features(trace, text_len, frames))
            attn = frame_attention(model, trace, layer).mean(0)
            v_cond, v_uncond = jnp.split(v.astype(jnp.float32), 2)
            x, _ = cog.ddim_step(schedule, i, x, guidance.combine(v_uncond, v_cond, table[i]))
            return x, (sims, attn)

        _, (sims, attn) = jax.lax.scan(body, x_T, jnp.arange(schedule.num_steps))
        return sims, attn

    return jax.jit(run)


def sweep_dit(pipe, cfg: gc.GenerateConfig, frames: int, steps: int, attention_layer: int | None = None,
              params=None) -> dict:
    """Similarities ``(steps, layers, 2, T−1)`` and frame attention ``(steps, T, 1+T)`` of one DDIM clip
    (the noise of ``generate`` with ``sampler.kind=ddim``)."""
    arch = pipe.config
    layer = arch.num_layers - 1 if attention_layer is None else attention_layer
    if not 0 <= layer < arch.num_layers:
        raise ValueError(f"attention_layer={layer} is not a block of this {arch.num_layers}-layer DiT")
    cond = pipe.encode_text([cfg.prompt])
    uncond = pipe.unconditional(cond, cfg.guidance, cfg.negative_prompt)
    schedule = cog.make_schedule(steps)
    table = guidance.guidance_scale_table(cfg.guidance, np.asarray(schedule.timesteps))
    x_T = jax.random.normal(jax.random.split(jax.random.PRNGKey(cfg.seed))[0],
                            (1, frames, *pipe.latent_size(cfg.height, cfg.width), pipe.latent_channels))
    run = _dit_sweep(pipe.dit_graph, layer)
    sims, attn = run(pipe.dit_params if params is None else params, schedule, table, x_T, cond, uncond)
    return dict(layers=[f"block {i}" for i in range(arch.num_layers)], timesteps=np.asarray(schedule.timesteps),
                similarity=np.asarray(sims), frame_attention=np.asarray(attn), attention_layer=layer)


# ---------------------------------------------------------------------------------------------- U-Net
def unet_layer_names(intermediates: dict) -> list[str]:
    names = sorted((k for k in intermediates if k.startswith("h_in_")), key=lambda k: int(k[5:]))
    names += ["h_mid"] + sorted((k for k in intermediates if k.startswith("h_out_")), key=lambda k: int(k[6:]))
    return names


@functools.lru_cache(maxsize=None)
def _unet_sweep(graphdef, fps: int, qcache, guidance_scale: float):
    def run(params, schedule, x_T, context, uncond, noise):
        model = nnx.merge(graphdef, params)
        frames = x_T.shape[1]
        both = jnp.concatenate([context, uncond])
        fps_arr = jnp.full((2,), fps, jnp.int32)

        def body(x, step):
            index, z = step
            t = jnp.broadcast_to(schedule.timesteps[index], (2, frames))
            out, inter = model(jnp.concatenate([x, x]), t, both, fps_arr, qcache=qcache, return_intermediates=True)
            feats = [inter[name][:frames] for name in unet_layer_names(inter)]  # conditional half
            sims = jnp.stack([frame_similarities(f.reshape(frames, -1, f.shape[-1])) for f in feats])
            x, _ = schedule.step(x, ddim.combine_cfg(out, guidance_scale), index, z, use_scale=True)
            return x, sims

        _, sims = jax.lax.scan(body, x_T, (jnp.arange(schedule.num_steps - 1, -1, -1), noise))
        return sims

    return jax.jit(run)


def sweep_unet(pipe, cfg: gc.GenerateConfig, frames: int, steps: int, qcache_enabled: bool | None = None) -> dict:
    """Similarities ``(steps, layers, 2, T−1)`` of the U-Net's block outputs along one DDIM clip
    (VideoCrafter's grid, η and noise as ``generate`` with ``sampler.kind=ddim``)."""
    gc._check_videocrafter_grid(steps)
    enabled = cfg.qcache.enabled if qcache_enabled is None else qcache_enabled
    schedule = ddim.videocrafter2_schedule(steps, eta=cfg.sampler.eta, grid="videocrafter")
    shape = (1, frames, *pipe.latent_size(cfg.height, cfg.width), pipe.latent_channels)
    k_x, k_steps = jax.random.split(jax.random.PRNGKey(cfg.seed))
    context = pipe.encode_text([cfg.prompt, cfg.negative_prompt])
    run = _unet_sweep(pipe.unet_graph, int(cfg.sampler.fps), cfg.qcache if enabled else None,
                      float(cfg.guidance.scale))
    sims = run(pipe.unet_params, schedule, jax.random.normal(k_x, shape), context[:1], context[1:],
               jax.random.normal(k_steps, (steps, *shape)))
    return dict(layers=_unet_names(pipe), timesteps=np.asarray(schedule.timesteps)[::-1].copy(),
                similarity=np.asarray(sims))


def _unet_names(pipe) -> list[str]:
    from jax_repvideo.models.unet3d import unet_layout

    layout = unet_layout(pipe.arch.unet)
    return ([f"input_blocks.{i}" for i in range(len(layout["input_blocks"]))] + ["middle_block"]
            + [f"output_blocks.{i}" for i in range(len(layout["output_blocks"]))])


# ---------------------------------------------------------------------------------------------- runs
def load(path: str | Path, overrides: Sequence[str] = ()) -> tuple[gc.GenerateConfig, AnalysisConfig]:
    """A run preset plus ``key=value`` overrides → (run config, ``analysis:`` section); strict keys."""
    data = config_lib.apply_overrides(config_lib.load_yaml(path), overrides)
    section = data.pop("analysis", None) or {}
    if not isinstance(section, dict):
        raise config_lib.ConfigError("analysis must be a section (analysis.steps=…, analysis.out=…)")
    acfg = config_lib.from_dict(AnalysisConfig, section, "analysis")
    if acfg.steps < 1 or (acfg.frames is not None and acfg.frames < 2):
        raise config_lib.ConfigError(f"analysis.steps must be ≥ 1 and analysis.frames ≥ 2 (adjacent pairs), "
                                     f"got steps={acfg.steps}, frames={acfg.frames}")
    cfg = config_lib.from_dict(gc.GenerateConfig, data)
    gc.validate(cfg)
    return cfg, acfg


def clip_frames(pipe, cfg: gc.GenerateConfig, acfg: AnalysisConfig) -> int:
    if acfg.frames is not None:
        return acfg.frames
    if cfg.sampler.kind == "fifo":
        return cfg.fifo.video_length
    return pipe.latent_frames(cfg.num_frames) if cfg.family == "cogvideox" else cfg.num_frames


def analyze(pipe, acfg: AnalysisConfig) -> dict:
    """Runs the sweep (and the baseline with ``compare``) for a ``pipelines.Pipeline``; plain-data result."""
    cfg, models = pipe.config, pipe.models
    frames = clip_frames(models, cfg, acfg)
    if cfg.family == "cogvideox":
        repvideo = models.config.repvideo
        result = dict(family="cogvideox", variant="repvideo" if repvideo else "cogvideox",
                      runs={"main": sweep_dit(models, cfg, frames, acfg.steps, acfg.attention_layer)})
        if acfg.compare and repvideo:
            result["runs"]["gates 0"] = sweep_dit(models, cfg, frames, acfg.steps, acfg.attention_layer,
                                                  params=zero_gates(models.dit_params))
    else:
        on = cfg.qcache.enabled
        result = dict(family="videocrafter2", variant="qcache on" if on else "qcache off",
                      runs={"main": sweep_unet(models, cfg, frames, acfg.steps)})
        if acfg.compare:
            result["runs"]["qcache off" if on else "qcache on"] = sweep_unet(models, cfg, frames, acfg.steps,
                                                                            qcache_enabled=not on)
    result.update(frames=frames, steps=acfg.steps, prompt=cfg.prompt, seed=cfg.seed,
                  variants={"per_token": "mean over positions of cos(frame j token, frame j+1 same token)",
                            "flattened": "cos(flattened frame j features, flattened frame j+1 features)"})
    return result


def to_json(result: dict) -> dict:
    """Arrays → nested lists; ``similarity`` split into ``per_token`` / ``flattened`` [step][layer][pair]."""
    runs = {}
    for name, run in result["runs"].items():
        sims = np.asarray(run["similarity"])
        entry = dict(layers=run["layers"], timesteps=np.asarray(run["timesteps"]).tolist(),
                     per_token=sims[:, :, 0].tolist(), flattened=sims[:, :, 1].tolist(),
                     per_token_layer_mean=sims[:, :, 0].mean((0, 2)).tolist(),
                     flattened_layer_mean=sims[:, :, 1].mean((0, 2)).tolist())
        if "frame_attention" in run:
            entry.update(attention_layer=run["attention_layer"],
                         frame_attention=np.asarray(run["frame_attention"]).tolist())
        runs[name] = entry
    return {**{k: v for k, v in result.items() if k != "runs"}, "runs": runs}


def plot(result: dict, path: str | Path | None = None):
    """Layer-mean similarity (both variants) per run, and per-pair curves of up to 6 layers."""
    try:
        import matplotlib

        matplotlib.use("Agg") if path is not None else None
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("the analysis plot needs matplotlib: pip install 'jax-repvideo[notebooks]' "
                          "(or pip install matplotlib)") from err
    runs = result["runs"]
    first = next(iter(runs.values()))
    n_layers = len(first["layers"])
    picks = sorted(set(np.linspace(0, n_layers - 1, min(6, n_layers)).round().astype(int).tolist()))
    fig, axes = plt.subplots(1, 1 + len(picks), figsize=(4 + 2.6 * len(picks), 3.2), squeeze=False)
    axes = axes[0]
    for name, run in runs.items():
        sims = np.asarray(run["similarity"]).mean(0)  # (layers, 2, pairs), averaged over steps
        line, = axes[0].plot(sims[:, 0].mean(-1), "o-", label=f"{name} per-token")
        axes[0].plot(sims[:, 1].mean(-1), "s--", color=line.get_color(), label=f"{name} flattened")
        for ax, layer in zip(axes[1:], picks):
            ax.plot(np.arange(1, sims.shape[-1] + 1), sims[layer, 0], "o-", color=line.get_color(), label=name)
            ax.set_title(run["layers"][layer], fontsize=9)
            ax.set_xlabel("frame pair")
    axes[0].set_xlabel("layer")
    axes[0].set_ylabel("adjacent-frame cosine")
    axes[0].set_title(f"{result['family']}: mean over steps and pairs", fontsize=9)
    axes[0].legend(fontsize=7)
    axes[1].set_ylabel("per-token cosine")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return fig


def main(config_path: str, overrides: Sequence[str] = ()) -> int:
    from jax_repvideo.pipelines import Pipeline

    cfg, acfg = load(config_path, overrides)
    out = Path(acfg.out)
    out.mkdir(parents=True, exist_ok=True)
    result = analyze(Pipeline(cfg), acfg)
    (out / "similarity.json").write_text(json.dumps(to_json(result), indent=1))
    plot(result, out / "similarity.png")
    for name, run in result["runs"].items():
        means = np.asarray(run["similarity"])[:, :, 0].mean((0, 2))
        print(f"{name:>10s} per-token similarity by layer: " + " ".join(f"{m:.3f}" for m in means))
    print(f"wrote {out / 'similarity.png'} and {out / 'similarity.json'}")
    return 0
