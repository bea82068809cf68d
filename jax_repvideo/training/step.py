"""The RepVideo train step: v-prediction loss, optax optimizer over labelled params, one jit.

Objective (spec §1.7, §2.5): v-prediction MSE under the CogVideoX schedule (scaled-linear betas,
SNR shift 3, zero terminal SNR), t uniform in {0…999} per sample and shared by its frames, and each
sample's text embedding zeroed with probability ``text_dropout`` (0.1) for classifier-free guidance.

Parameters are one flat ``{dotted path: float32 array}`` dict (the master weights; the DiT computes
in its own ``dtype``). ``optax.multi_transform`` labels every path ``gates``, ``backbone`` or
``frozen``: trainable ``gates`` trains the RepVideo gates only, ``all`` the gates and the whole DiT.
Frozen gradients are zeroed *before* global-norm clipping so the norm counts only what is trained,
and XLA drops their unused weight-gradient matmuls. Every random draw of step ``k`` comes from
``fold_in(key(seed), k)``, which is what makes a resumed run bit-exact.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jax_repvideo import checkpoint
from jax_repvideo.config import ConfigError
from jax_repvideo.schedulers.cogvideox import CogVideoXSchedulerConfig, alphas_cumprod
from jax_repvideo.training.config import OptimConfig

# ----------------------------------------------------------------------------- params


def flat_params(model: nnx.Module) -> dict[str, jax.Array]:
    """The model's ``nnx.Param`` leaves as ``{dotted path: array}``."""
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))  # leaves may be abstract (eval_shape)
    leaves = jax.tree_util.tree_flatten_with_path(pure)[0]
    return {".".join(str(k.key) for k in path): leaf for path, leaf in leaves}


def merge(graphdef, params: Mapping[str, jax.Array], rest) -> nnx.Module:
    return nnx.merge(graphdef, checkpoint.nest(params), rest)


def gate_paths(params: Mapping[str, Any], pattern: str) -> list[str]:
    return sorted(p for p in params if re.search(pattern, p))


def param_labels(params: Mapping[str, Any], trainable: str, pattern: str) -> dict[str, str]:
    """``gates`` / ``backbone`` / ``frozen`` for every path (the multi_transform labels)."""
    gates = set(gate_paths(params, pattern))
    if trainable == "gates" and not gates:
        raise ConfigError(f"trainable: gates, but no parameter matches gate_pattern {pattern!r} "
                          "(is model.repvideo true?)")
    backbone = "backbone" if trainable == "all" else "frozen"
    return {p: "gates" if p in gates else backbone for p in params}


# ----------------------------------------------------------------------------- optimizer


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything static about the train step (hashable: a jit static argument)."""

    optim: OptimConfig
    labels: tuple[tuple[str, str], ...]
    total_steps: int
    text_dropout: float


def learning_rate(optim: OptimConfig, peak: float, total_steps: int) -> optax.Schedule:
    warmup = min(optim.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=peak * optim.end_lr_ratio)


def make_optimizer(spec: StepSpec) -> optax.GradientTransformation:
    o, labels = spec.optim, dict(spec.labels)

    def adamw(peak, decay):
        return optax.adamw(learning_rate(o, peak, spec.total_steps), b1=o.b1, b2=o.b2, eps=o.eps,
                           weight_decay=decay)

    def keep_trained(kind):
        return optax.set_to_zero() if kind == "frozen" else optax.identity()

    kinds = set(labels.values())
    mask = optax.multi_transform({k: keep_trained(k) for k in kinds}, labels)
    update = {"gates": adamw(o.gate_learning_rate, 0.0), "backbone": adamw(o.learning_rate, o.weight_decay),
              "frozen": optax.set_to_zero()}
    return optax.chain(mask, optax.clip_by_global_norm(o.grad_clip),
                       optax.multi_transform({k: update[k] for k in kinds}, labels))


# ----------------------------------------------------------------------------- loss and step


def schedule_table(snr_shift_scale: float) -> jax.Array:
    """ᾱ over t = 0…999 (float32), the CogVideoX training schedule."""
    return jnp.asarray(alphas_cumprod(CogVideoXSchedulerConfig(snr_shift_scale=snr_shift_scale)), jnp.float32)


def v_loss(model, latents, text, key, alphas_bar, text_dropout: float):
    """v-prediction MSE (= SAT's x̂0 MSE weighted by 1/(1−ᾱ_t)) at a uniform random t per sample."""
    b, frames = latents.shape[:2]
    k_t, k_noise, k_drop = jax.random.split(key, 3)
    t = jax.random.randint(k_t, (b,), 0, alphas_bar.shape[0])
    noise = jax.random.normal(k_noise, latents.shape, jnp.float32)
    keep = jax.random.uniform(k_drop, (b,)) >= text_dropout
    text = jnp.where(keep[:, None, None], text, 0.0)
    a = alphas_bar[t].reshape(b, 1, 1, 1, 1)
    noisy = jnp.sqrt(a) * latents + jnp.sqrt(1 - a) * noise
    target = jnp.sqrt(a) * noise - jnp.sqrt(1 - a) * latents
    pred = model(noisy, jnp.broadcast_to(t[:, None], (b, frames)), text)
    return jnp.mean((pred.astype(jnp.float32) - target) ** 2)


def _train_step(params, opt_state, rest, step, latents, text, alphas_bar, seed, *, graphdef, spec: StepSpec):
    key = jax.random.fold_in(jax.random.key(seed), step)

    def loss_fn(p):
        return v_loss(merge(graphdef, p, rest), latents, text, key, alphas_bar, spec.text_dropout)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    labels = dict(spec.labels)
    grad_norm = optax.tree.norm({p: g for p, g in grads.items() if labels[p] != "frozen"})
    updates, opt_state = make_optimizer(spec).update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {"loss": loss, "grad_norm": grad_norm}


_STATIC = ("graphdef", "spec")
_step_jit = jax.jit(_train_step, static_argnames=_STATIC)
_step_jit_donated = jax.jit(_train_step, static_argnames=_STATIC, donate_argnums=(0, 1))


def train_step_fn():
    """The jitted step; params and optimizer state are donated where the backend supports it."""
    return _step_jit if jax.default_backend() == "cpu" else _step_jit_donated
