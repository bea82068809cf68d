"""FIFO-Diffusion (spec §1.4–1.6): diagonal denoising of a queue of latents, as one jitted scan.

The queue holds Q = S + L latents (L = f/2 lookahead context slots, 0 without lookahead). Position p
always carries DDIM index I[p] = [0]×L ⧺ [0..S−1], so the timesteps along the queue are the diagonal
τ_I[p]. One iteration:

1. gathers every window (n, or 2n with lookahead) × CFG into **one** batched denoiser call with
   per-frame timesteps; all windows read the pre-update queue (the official code runs them one after
   another, noisiest first, which reads the same values);
2. applies the per-frame solver step (DDIM; DPM for the DiT), each frame with its own index, and keeps
   each frame's x̂0 for a multistep solver's next step;
3. writes back each window's write range (the whole window, or its second half with lookahead), so
   every position ≥ L is written exactly once;
4. emits the head latent (position L), shifts the queue (and the x̂0 history) left and puts fresh
   N(0, I) at the tail.

K = N + S − f iterations give N frames: the first S − f emitted latents are discarded.

Denoiser contract (any model plugs in, e.g. the VC2 U-Net (ε) or the CogVideoX DiT (v)):

    denoise(params, latents (B, T, H, W, C), timesteps (B, T) int32, cond) -> model output (B, T, H, W, C)

``params`` is any pytree (jit argument; ``None`` for a parameter-free toy); ``cond`` is the per-frame
conditioning pytree, every leaf with leading axes (B, T) (e.g. ``{"context": (B, T, L, D)}``), gathered
from the prompt table by each slot's prompt index. With CFG the batch is ``[cond windows; uncond windows]``.
The scheduler is a pytree with ``timesteps``, ``alphas`` tables (per DDIM index) and
``step(x, model_out, index, noise, history=x̂0 of the previous step) -> (x_prev, pred_x0)``; its
prediction type (ε or v) and solver are its own.
``unet_denoiser`` adapts the VideoCrafter2 U-Net (fps and Q-cache settings reach every window).

A chunk of C iterations is one ``lax.scan``, compiled once for any video length (the length is a
runtime ``stop`` argument). ``FifoSampler.run`` streams emitted latents to a consumer chunk by chunk,
so memory does not grow with length. ``FifoState`` saves/restores with orbax; resuming or extending a
run continues the same RNG stream and gives the same frames as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Callable, Literal, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_repvideo.config import ConfigError
from jax_repvideo.schedulers import ddim


SOLVERS = ("ddim", "dpm")


@dataclasses.dataclass(frozen=True)
class FifoConfig:
    video_length: int = 16  # f: frames per window (the model's clip length)
    num_partitions: int = 4  # n
    num_inference_steps: int | None = None  # S; None → f·n; when pinned it must equal f·n
    lookahead: bool = True
    new_video_length: int = 100  # N: output frames
    eta: float = 1.0
    guidance_scale: float = 12.0  # 1.0 → no CFG (one call per window)
    chunk_size: int = 8  # C: iterations per compiled scan
    uniform_latent_extension: bool = False  # base frame of slot k: ⌊k·f/S⌋ instead of max(0, k − (S − f))
    seed: int = 321
    # per-frame solver: ddim, or dpm (CogVideoX's DPM-Solver++(2M) SDE, RepVideo's sampler; DiT only)
    solver: Literal["ddim", "dpm"] = "ddim"


def validate(config: FifoConfig) -> None:
    """Raises ConfigError for settings the FIFO queue cannot run with (before anything compiles)."""
    f, n = config.video_length, config.num_partitions
    if f < 1 or n < 1:
        raise ConfigError(f"fifo.video_length (f={f}) and fifo.num_partitions (n={n}) must be ≥ 1")
    if config.num_inference_steps is not None and config.num_inference_steps != f * n:
        raise ConfigError(
            f"fifo.num_inference_steps={config.num_inference_steps} must equal video_length·num_partitions "
            f"= {f}·{n} = {f * n} (the queue is n partitions of f frames); leave it unset to derive it"
        )
    if config.lookahead and f % 2:
        raise ConfigError(f"fifo.video_length must be even with lookahead (half-windows of f/2), got f={f}")
    if config.new_video_length < 1:
        raise ConfigError(f"fifo.new_video_length must be ≥ 1, got N={config.new_video_length}")
    if config.chunk_size < 1:
        raise ConfigError(f"fifo.chunk_size must be ≥ 1, got {config.chunk_size}")
    if config.solver not in SOLVERS:
        raise ConfigError(f"fifo.solver must be one of {SOLVERS}, got {config.solver!r}")


@dataclasses.dataclass(frozen=True)
class Plan:
    """The static geometry of the queue: window starts, write ranges, head. Hashable (a jit key)."""

    f: int
    n: int
    lookahead: bool
    use_cfg: bool

    @property
    def steps(self) -> int:  # S
        return self.f * self.n

    @property
    def context(self) -> int:  # L: clean context slots in front (also the head position)
        return self.f // 2 if self.lookahead else 0

    @property
    def queue_length(self) -> int:  # Q
        return self.steps + self.context

    @property
    def starts(self) -> np.ndarray:
        """Window starts in the official call order (noisiest first)."""
        stride = self.f // 2 if self.lookahead else self.f
        count = 2 * self.n if self.lookahead else self.n
        return np.arange(count - 1, -1, -1) * stride

    @property
    def write_offset(self) -> int:
        """First frame of a window that is written back."""
        return self.f // 2 if self.lookahead else 0

    @property
    def window_positions(self) -> np.ndarray:  # (R, f)
        return self.starts[:, None] + np.arange(self.f)

    @property
    def write_positions(self) -> np.ndarray:  # (R, f − write_offset)
        return self.window_positions[:, self.write_offset :]

    @property
    def slot_indices(self) -> np.ndarray:
        """DDIM index of every queue position: [0]×L ⧺ [0..S−1]."""
        return np.concatenate([np.zeros(self.context, np.int32), np.arange(self.steps, dtype=np.int32)])

    def slot_base_frames(self, uniform: bool) -> np.ndarray:
        """Frame of the base video that initialises each queue position (spec §1.4 / uniform extension)."""
        k = np.arange(self.steps)
        j = k * self.f // self.steps if uniform else np.maximum(0, k - (self.steps - self.f))
        return np.concatenate([np.zeros(self.context, np.int64), j])

    def frame_of_slot(self) -> np.ndarray:
        """Output frame index each initial queue position becomes (negative: discarded)."""
        return np.arange(self.queue_length) - self.context - (self.steps - self.f)


def make_plan(config: FifoConfig) -> Plan:
    validate(config)
    return Plan(config.video_length, config.num_partitions, config.lookahead, config.guidance_scale != 1.0)


class FifoState(NamedTuple):
    """Everything the generator carries between iterations (a pytree; saved with orbax)."""

    queue: jax.Array  # (Q, H, W, C) latents
    # (Q, H, W, C) the x̂0 each latent got at its previous step: a multistep solver's history (DPM);
    # DDIM ignores it
    x0: jax.Array
    indices: jax.Array  # (Q,) int32 DDIM index of each position
    prompts: jax.Array  # (Q,) int32 prompt index each slot entered with (the prompt-schedule position)
    key: jax.Array  # (2,) uint32 RNG key for the next draws
    iteration: jax.Array  # () int32 iterations done


class Inputs(NamedTuple):
    """Runtime (traced) inputs of an iteration besides the state."""

    schedule: Any  # DDIMSchedule (or any scheduler pytree with the same interface)
    table: Any  # conditioning pytree, leading axis P + 1: the P prompts, then uncond
    bounds: jax.Array  # (P,) int32 cumulative frame counts of the prompt schedule
    guidance_scale: jax.Array  # () float32, or (S,) a weight per FIFO index k (each frame its own)


def prompt_of_frame(frame, bounds):
    """Prompt index of output frame ``frame`` (frames before 0 → prompt 0, after the end → the last)."""
    index = jnp.searchsorted(bounds, frame, side="right")
    return jnp.clip(index, 0, bounds.shape[0] - 1).astype(jnp.int32)


def _gather(table, ids):
    return jax.tree.map(lambda leaf: leaf[ids], table)


def denoise_windows(denoise: Callable, plan: Plan, params, inputs: Inputs, x, idx, prompt_ids):
    """Guided model output for a batch of windows ``x`` (R, f, H, W, C): one call, CFG stacked."""
    t = inputs.schedule.timesteps[idx]
    if not plan.use_cfg:
        return denoise(params, x, t, _gather(inputs.table, prompt_ids))
    uncond = jax.tree.leaves(inputs.table)[0].shape[0] - 1
    ids = jnp.concatenate([prompt_ids, jnp.full_like(prompt_ids, uncond)])
    out = denoise(params, ddim.stack_cfg(x), ddim.stack_cfg(t), _gather(inputs.table, ids))
    scale = inputs.guidance_scale
    if scale.ndim:  # a weight per noise level: every frame of every window takes its own
        scale = scale[idx].reshape(idx.shape + (1,) * (x.ndim - idx.ndim))
    return ddim.combine_cfg(out, scale)


def fifo_iteration(denoise: Callable, plan: Plan, params, inputs: Inputs, state: FifoState, noise):
    """One FIFO iteration (spec §1.5). ``noise`` = (step z (R, f, H, W, C), tail (H, W, C)).

    Returns the new state and the emitted head latent (H, W, C).
    """
    step_noise, tail_noise = noise
    positions = plan.window_positions
    x, idx = state.queue[positions], state.indices[positions]
    out = denoise_windows(denoise, plan, params, inputs, x, idx, state.prompts[positions])
    x_new, x0 = inputs.schedule.step(x, out, idx, step_noise, history=state.x0[positions])
    queue = _write_back(plan, state.queue, x_new)
    x0 = _write_back(plan, state.x0, x0)
    emitted = queue[plan.context]
    # The slot entering now is dequeued S iterations later, i.e. becomes output frame iteration + f.
    entering = prompt_of_frame(state.iteration + plan.f, inputs.bounds)
    state = FifoState(
        queue=jnp.concatenate([queue[1:], tail_noise[None].astype(queue.dtype)]),
        x0=jnp.concatenate([x0[1:], jnp.zeros_like(x0[:1])]),  # the tail's first step is first-order
        indices=state.indices,
        prompts=jnp.concatenate([state.prompts[1:], entering[None]]),
        key=state.key,
        iteration=state.iteration + 1,
    )
    return state, emitted


def _write_back(plan: Plan, whole, windows):
    """``whole`` (Q, …) with each window's write range of ``windows`` (R, f, …) written into it."""
    part = windows[:, plan.write_offset:].reshape((-1,) + windows.shape[2:])
    return whole.at[plan.write_positions.reshape(-1)].set(part.astype(whole.dtype), unique_indices=True)


def draw_noise(plan: Plan, key, latent_shape):
    """The RNG noise of one iteration: (next key, (step z (R, f, *latent), tail (*latent)))."""
    key, k_step, k_tail = jax.random.split(key, 3)
    windows = len(plan.starts)
    step = jax.random.normal(k_step, (windows, plan.f) + tuple(latent_shape), jnp.float32)
    return key, (step, jax.random.normal(k_tail, tuple(latent_shape), jnp.float32))


def run_chunk(denoise: Callable, plan: Plan, chunk: int, params, inputs: Inputs, state: FifoState, noise, stop):
    """``chunk`` iterations as one ``lax.scan``; iterations at or past ``stop`` leave the state as is.

    ``noise`` None draws from ``state.key``; otherwise (step (chunk, R, f, …), tail (chunk, …)) injected.
    Returns the state and the emitted latents (chunk, H, W, C) (zeros for skipped iterations).
    """
    latent_shape = state.queue.shape[1:]

    def body(state, noise_i):
        def active(state):
            if noise_i is None:
                key, drawn = draw_noise(plan, state.key, latent_shape)
                state = state._replace(key=key)
            else:
                drawn = noise_i
            return fifo_iteration(denoise, plan, params, inputs, state, drawn)

        def idle(state):
            return state, jnp.zeros(latent_shape, state.queue.dtype)

        return jax.lax.cond(state.iteration < stop, active, idle, state)

    return jax.lax.scan(body, state, noise, length=chunk)


@functools.lru_cache(maxsize=None)
def compiled_chunk(denoise: Callable, plan: Plan, chunk: int) -> Callable:
    """The jitted chunk for one denoiser and plan, shared by every sampler (one compile per shape).

    The state argument is donated: the new queue is written into the old one's buffer, and the
    state passed in is deleted. Pass a copy to keep it.
    """
    return jax.jit(functools.partial(run_chunk, denoise, plan, chunk), donate_argnums=2)


@functools.lru_cache(maxsize=None)
def _compiled_init(plan: Plan, uniform: bool) -> Callable:
    return jax.jit(functools.partial(init_state, plan, uniform=uniform))


def init_state(plan: Plan, schedule, base, noise, bounds, key, *, uniform: bool = False) -> FifoState:
    """The initial queue (spec §1.4) from a clean base video ``base`` (f, H, W, C).

    Slot p = √a_k·V[j]+√(1−a_k)·z_p with its DDIM index k and base frame j; ``noise``: (Q, H, W, C).
    No VC2 scale factor here (spec §1.2 quirk). A slot's solver history starts as V[j], the clean frame
    it was noised from.
    """
    k = plan.slot_indices
    a = ddim._expand(schedule.alphas[k], base.ndim)
    frames = base[plan.slot_base_frames(uniform)]
    queue = jnp.sqrt(a) * frames + jnp.sqrt(1.0 - a) * noise
    return FifoState(
        queue=queue.astype(jnp.float32),
        x0=frames.astype(jnp.float32),
        indices=jnp.asarray(k),
        prompts=prompt_of_frame(jnp.asarray(plan.frame_of_slot()), bounds),
        key=jnp.asarray(key, jnp.uint32),
        iteration=jnp.zeros((), jnp.int32),
    )


@dataclasses.dataclass(frozen=True)
class InjectedNoise:
    """Recorded draws in the loop's order: ``init`` (Q, …), ``steps`` (K, R, f, …), ``tails`` (K, …)."""

    init: np.ndarray
    steps: np.ndarray
    tails: np.ndarray

    def chunk(self, start: int, size: int):
        """Iterations [start, start + size), zero-padded past the recorded ones (those are skipped)."""

        def window(a):
            part = a[start : start + size]
            pad = np.zeros((size - part.shape[0],) + a.shape[1:], a.dtype)
            return jnp.asarray(np.concatenate([part, pad]))

        return window(self.steps), window(self.tails)


def stack_prompts(schedule: Sequence[tuple[Any, int]]):
    """``[(cond pytree, frames), …]`` → (cond pytree stacked on a new leading axis, frame counts)."""
    if not schedule:
        raise ConfigError("the prompt schedule is empty")
    conds, frames = zip(*schedule)
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *conds), tuple(int(n) for n in frames)


class FifoSampler:
    """Runs FIFO-Diffusion for one denoiser: base video, queue init, streaming chunks, resume/extend.

    ``prompts``: conditioning pytree with a leading prompt axis P (``stack_prompts`` builds it);
    ``uncond``: the same pytree without that axis. Leaves are what ``denoise`` expects per frame.
    """

    def __init__(self, denoise: Callable, params, config: FifoConfig, schedule=None, guidance_table=None):
        """``guidance_table``: optional (S,) CFG weight per FIFO index k (ascending noise), e.g. CogVideoX's
        dynamic CFG; by default every frame takes ``config.guidance_scale``."""
        self.plan = make_plan(config)
        self.config = config
        self.denoise = denoise
        self.params = params
        self.guidance = (jnp.float32(config.guidance_scale) if guidance_table is None
                         else jnp.asarray(guidance_table, jnp.float32))
        if self.guidance.shape not in ((), (self.plan.steps,)):
            raise ConfigError(f"guidance_table must have one weight per FIFO step ({self.plan.steps}), "
                              f"got shape {self.guidance.shape}")
        if schedule is None:
            schedule = ddim.videocrafter2_schedule(self.plan.steps, eta=config.eta)
        solver = getattr(schedule, "solver", "ddim")
        if solver != config.solver:
            raise ConfigError(f"fifo.solver={config.solver}, but the FIFO schedule steps with {solver} "
                              "(VideoCrafter2's schedule is ddim only; fifo_dit.fifo_schedule takes a solver)")
        self.schedule = schedule
        if schedule.timesteps.shape[0] != self.plan.steps:
            steps = schedule.timesteps.shape[0]
            raise ConfigError(f"scheduler has {steps} steps, FIFO needs S = f·n = {self.plan.steps}")

    # -- inputs ---------------------------------------------------------------------------------------

    def inputs(self, prompts, uncond, prompt_frames: Sequence[int] | None, num_frames: int) -> Inputs:
        count = jax.tree.leaves(prompts)[0].shape[0]
        frames = (num_frames,) if prompt_frames is None and count == 1 else tuple(prompt_frames or ())
        if len(frames) != count:
            raise ConfigError(f"prompt schedule has {len(frames)} frame counts for {count} prompts")
        if any(n < 1 for n in frames) or sum(frames) != num_frames:
            raise ConfigError(
                f"prompt schedule frame counts {list(frames)} must be ≥ 1 and sum to the video length "
                f"N={num_frames} (they sum to {sum(frames)})"
            )
        table = jax.tree.map(lambda p, u: jnp.concatenate([p, jnp.asarray(u, p.dtype)[None]]), prompts, uncond)
        bounds = jnp.asarray(np.cumsum(frames), jnp.int32)
        return Inputs(self.schedule, table, bounds, self.guidance)

    def _check_length(self, num_frames: int) -> None:
        if num_frames < 1:
            raise ConfigError(f"fifo.new_video_length must be ≥ 1, got N={num_frames}")

    # -- base video -----------------------------------------------------------------------------------

    def base_video(self, prompts, uncond, latent_shape, *, key=None, x_T=None, noise=None):
        """Plain S-step sampling with the FIFO schedule's solver (VC2 use_scale, CFG) of an f-frame clip
        with prompt 0 → (f, H, W, C)."""
        f = self.plan.f
        if x_T is None or noise is None:
            k_x, k_steps = jax.random.split(jax.random.PRNGKey(self.config.seed) if key is None else key)
            shape = (1, f) + tuple(latent_shape)
            x_T = jax.random.normal(k_x, shape) if x_T is None else x_T
            noise = jax.random.normal(k_steps, (self.plan.steps,) + shape) if noise is None else noise
        cond0 = jax.tree.map(lambda p: jnp.broadcast_to(p[0], (1, f) + p.shape[1:]), prompts)
        uncond_f = jax.tree.map(lambda u: jnp.broadcast_to(jnp.asarray(u), (1, f) + jnp.shape(u)), uncond)
        guidance = self.guidance if self.plan.use_cfg else None
        x0, trace = _compiled_base(self.denoise)(self.params, self.schedule, x_T, cond0, uncond_f, noise, guidance)
        return x0[0], trace

    # -- the queue ------------------------------------------------------------------------------------

    def init(self, base, prompts, uncond, prompt_frames=None, *, num_frames=None, key=None, noise=None) -> FifoState:
        """The initial state from a clean base video ``base`` (f, H, W, C) (spec §1.4)."""
        num_frames = self.config.new_video_length if num_frames is None else num_frames
        self._check_length(num_frames)
        base = jnp.asarray(base)
        if base.ndim != 4 or base.shape[0] != self.plan.f:
            raise ValueError(f"base video must be (f={self.plan.f}, H, W, C), got {base.shape}")
        inputs = self.inputs(prompts, uncond, prompt_frames, num_frames)
        key = jax.random.PRNGKey(self.config.seed) if key is None else key
        k_init, k_loop = jax.random.split(key)
        if noise is None:
            noise = jax.random.normal(k_init, (self.plan.queue_length,) + base.shape[1:])
        fn = _compiled_init(self.plan, self.config.uniform_latent_extension)
        return fn(self.schedule, base, jnp.asarray(noise), inputs.bounds, k_loop)

    def run(
        self,
        state: FifoState,
        prompts,
        uncond,
        prompt_frames: Sequence[int] | None = None,
        *,
        num_frames: int | None = None,
        consumer: Callable[[int, np.ndarray], None] | None = None,
        noise: InjectedNoise | None = None,
        max_chunks: int | None = None,
        include_warmup: bool = False,
    ) -> FifoState:
        """Runs chunks until K = N + S − f iterations are done (or ``max_chunks``), streaming frames.

        ``consumer(first_frame_index, latents (m, H, W, C))`` receives each chunk's output frames
        (the S − f discarded warm-up latents, frame indices < 0, only with ``include_warmup``). Calling
        ``run`` again with the returned state resumes; with a larger ``num_frames`` it extends a finished run.
        On extension, slots already queued past the old end keep the prompt they entered with (the old
        schedule's last one); a single longer run matches exactly when its schedule keeps that prompt for
        the first S new frames. The ``state`` passed in stays valid (the chunks donate a copy of it).
        """
        num_frames = self.config.new_video_length if num_frames is None else num_frames
        self._check_length(num_frames)
        inputs = self.inputs(prompts, uncond, prompt_frames, num_frames)
        plan, size = self.plan, self.config.chunk_size
        total = num_frames + plan.steps - plan.f
        fn = compiled_chunk(self.denoise, plan, size)
        done, chunks = int(state.iteration), 0
        state = jax.tree.map(jnp.copy, state)
        while done < total and (max_chunks is None or chunks < max_chunks):
            chunk_noise = None if noise is None else noise.chunk(done, size)
            state, emitted = fn(self.params, inputs, state, chunk_noise, jnp.int32(total))
            first = done - (plan.steps - plan.f)  # frame index of emitted[0]
            lo, hi = (0 if include_warmup else max(0, -first)), min(size, total - done)
            if consumer is not None and hi > lo:
                consumer(first + lo, np.asarray(emitted[lo:hi]))
            done, chunks = done + size, chunks + 1
        return state


@functools.lru_cache(maxsize=None)
def _compiled_base(denoise: Callable) -> Callable:
    def base(params, schedule, x_T, cond, uncond, noise, guidance):
        return ddim.ddim_sample(
            denoise, params, schedule, x_T, cond, uncond, noise, guidance_scale=guidance, use_scale=True
        )

    return jax.jit(base)


# ---- FifoState on disk -----------------------------------------------------------------------------------


def save_state(directory: str | Path, state: FifoState) -> Path:
    """Writes the state with orbax (``directory`` is created or overwritten). Under several processes
    every one calls it (gathering the state and orbax's save are collective); process 0 writes."""
    import orbax.checkpoint as ocp

    from jax_repvideo import sharding

    directory = Path(directory).absolute()
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory, sharding.gather_to_host(state._asdict()), force=True)
    checkpointer.wait_until_finished()
    return directory


def load_state(directory: str | Path) -> FifoState:
    import orbax.checkpoint as ocp

    restored = ocp.StandardCheckpointer().restore(Path(directory).absolute())
    if "x0" not in restored:  # saved before the solver history existed: a DDIM run, which ignores it
        restored["x0"] = np.zeros_like(restored["queue"])
    return FifoState(**{k: jnp.asarray(restored[k]) for k in FifoState._fields})


# ---- the VideoCrafter2 U-Net as a denoiser --------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def unet_denoiser(graphdef, fps: int, qcache=None) -> Callable:
    """``denoise(state, latents, timesteps, cond)`` for an ``nnx.split`` U-Net; ``cond = {"context": (B, T, L, D)}``.

    The graphdef is closed over and merged inside the trace (DESIGN §2); fps and the Q-cache settings
    (hashable) reach every window of the batched call.
    """
    from flax import nnx

    def denoise(params, latents, timesteps, cond):
        model = nnx.merge(graphdef, params)
        fps_arr = jnp.full((latents.shape[0],), fps, jnp.int32)
        return model(latents, timesteps, cond["context"], fps_arr, qcache=qcache)

    return denoise
