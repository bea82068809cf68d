"""Video–caption data for RepVideo fine-tuning: a tfds builder and a deterministic batch reader.

Sources (``DataConfig``):

* a local folder (``data_dir``) of videos (``.mp4 .mov .webm .mkv .avi``) with captions either in
  ``captions.jsonl`` (one ``{"video": "clip.mp4", "caption": "..."}`` per line) or in sidecar files
  (``clip.mp4`` + ``clip.txt``);
* any registered tfds video dataset (``tfds_name``, e.g. ``"my_videos"`` or ``"my_videos/cfg:1.0.0"``),
  prepared as array_record (``tfds build --file_format=array_record``). ``video_field`` and
  ``caption_field`` name its features; dotted names reach nested features (``"annotations.text"``),
  a ``ClassLabel`` caption becomes its class name and a list of captions gives its first one.

Either source is turned into the tfds dataset ``repvideo_clips`` (array_record): clips of
``num_frames`` (4k+1) frames taken every ``frame_stride`` source frames, resized to cover
``height``×``width`` and centre-cropped. A video shorter than one clip is skipped and counted in one
warning. With an ``Encoder`` (frozen VAE + T5) the builder stores latents and text embeddings
instead of pixels (``preprocess: true``), so training never runs the VAE or T5.

The builder config name is a hash of the source (file names, sizes, mtimes), the clip settings and
the encoder fingerprint, so a changed folder or setting builds a new dataset and an unchanged one is
reused. ``BatchIterator`` reads it back with a per-epoch seeded permutation, gives each host its
slice of the global batch, and resumes from a single integer position.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Iterator, Protocol

import jax
import numpy as np
import tensorflow_datasets as tfds
from jax.experimental import multihost_utils
from PIL import Image

from jax_repvideo import sharding
from jax_repvideo.training.config import DataConfig, DataError

VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv", ".avi")
CAPTIONS_FILE = "captions.jsonl"
DATASET_NAME = "repvideo_clips"


class Encoder(Protocol):
    """Frozen encoders for the preprocessing pass and for training on pixels."""

    fingerprint: str  # identifies the weights (checkpoint path, or "random:<seed>")

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, ...]: ...

    def text_shape(self) -> tuple[int, int]: ...

    def encode_video(self, frames: np.ndarray) -> np.ndarray:
        """uint8 ``(B, F, H, W, 3)`` → scaled latents ``(B, T, h, w, C)`` float32."""
        ...

    def encode_text(self, captions: list[str]) -> np.ndarray:
        """captions → ``(B, L, D)`` float32."""
        ...


# ----------------------------------------------------------------------------- sources


def folder_videos(data_dir: str | Path) -> list[tuple[Path, str]]:
    """``(video path, caption)`` pairs of a local folder, sorted by name; errors name the problem."""
    folder = Path(data_dir)
    if not folder.exists():
        raise DataError(f"data folder {folder} does not exist")
    if not folder.is_dir():
        raise DataError(f"data folder {folder} is not a directory")
    try:
        entries = sorted(folder.iterdir())
    except OSError as err:
        raise DataError(f"data folder {folder} is unreadable: {err}") from None
    videos = [p for p in entries if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file()]
    if not videos:
        raise DataError(f"data folder {folder} holds no videos ({', '.join(VIDEO_SUFFIXES)})")
    if (folder / CAPTIONS_FILE).is_file():
        captions = _read_jsonl_captions(folder / CAPTIONS_FILE)
    else:
        captions = _read_sidecar_captions(videos)
    names = {v.name for v in videos}
    unknown = sorted(set(captions) - names)
    missing = sorted(names - set(captions))
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"captions for videos that are not in the folder: {', '.join(unknown)}")
        if missing:
            parts.append(f"videos without a caption: {', '.join(missing)}")
        source = CAPTIONS_FILE if (folder / CAPTIONS_FILE).is_file() else "sidecar .txt files"
        raise DataError(f"captions ({source}) do not match the videos in {folder}: " + "; ".join(parts))
    return [(v, captions[v.name]) for v in videos]


def _read_jsonl_captions(path: Path) -> dict[str, str]:
    captions: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("video"), str) or not isinstance(
            row.get("caption"), str
        ):
            raise DataError(f'{path}:{number}: expected {{"video": "<file>", "caption": "<text>"}}, got {line!r}')
        name = Path(row["video"]).name
        if name in captions:
            raise DataError(f"{path}:{number}: a second caption for {name}")
        captions[name] = row["caption"]
    return captions


def _read_sidecar_captions(videos: list[Path]) -> dict[str, str]:
    captions = {}
    for video in videos:
        sidecar = video.with_suffix(".txt")
        if sidecar.is_file():
            captions[video.name] = sidecar.read_text().strip()
    return captions


def read_frames(path: Path, limit: int) -> np.ndarray:
    """Up to ``limit`` decoded RGB frames ``(N, H, W, 3)`` uint8 of a video file (ffmpeg)."""
    import imageio.v2 as imageio

    frames = []
    try:
        with imageio.get_reader(str(path), format="FFMPEG") as reader:
            for frame in reader:
                frames.append(np.asarray(frame)[..., :3])
                if len(frames) >= limit:
                    break
    except Exception as err:  # imageio raises OSError/RuntimeError/IndexError depending on the damage
        raise DataError(f"cannot decode video {path}: {err}") from None
    if not frames:
        return np.zeros((0, 1, 1, 3), np.uint8)
    return np.stack(frames)


def _tfds_videos(config: DataConfig) -> Iterator[tuple[str, np.ndarray, str]]:
    data_dir = config.tfds_data_dir or None
    try:
        builder = tfds.builder(config.tfds_name, data_dir=data_dir)
        source = builder.as_data_source(split=config.tfds_split)
    except Exception as err:
        raise DataError(
            f"cannot read tfds dataset {config.tfds_name!r} split {config.tfds_split!r}: {err}. It must be "
            "prepared as array_record (tfds build --file_format=array_record)"
        ) from None
    features = builder.info.features
    for field in (config.video_field, config.caption_field):
        _feature(features, field, config.tfds_name)
    caption_feature = _feature(features, config.caption_field, config.tfds_name)
    for index in range(len(source)):
        example = source[index]
        video = np.asarray(_field(example, config.video_field))
        caption = _caption_text(_field(example, config.caption_field), caption_feature)
        yield f"{config.tfds_name}/{config.tfds_split}/{index}", video, caption


def _feature(features, dotted: str, name: str):
    node = features
    for part in dotted.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError):
            available = ", ".join(features.keys()) if hasattr(features, "keys") else "?"
            raise DataError(f"tfds dataset {name!r} has no feature {dotted!r}; top-level features: {available}") from None
    return node


def _field(example: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        example = example[part]
    return example


def _caption_text(value: Any, feature: Any) -> str:
    if isinstance(feature, tfds.features.ClassLabel):
        return feature.int2str(int(value))
    if isinstance(value, (list, tuple, np.ndarray)) and not isinstance(value, (bytes, str)):
        value = value[0] if len(value) else b""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


# ----------------------------------------------------------------------------- clips


def resize_crop(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resizes ``(N, H, W, 3)`` so it covers ``height``×``width`` (bicubic), then centre-crops."""
    _, h, w, _ = frames.shape
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    top, left = (new_h - height) // 2, (new_w - width) // 2
    out = np.empty((len(frames), height, width, 3), np.uint8)
    for i, frame in enumerate(frames):
        image = Image.fromarray(frame).resize((new_w, new_h), Image.Resampling.BICUBIC)
        out[i] = np.asarray(image)[top : top + height, left : left + width]
    return out


def sample_clips(frames: np.ndarray, config: DataConfig) -> list[np.ndarray]:
    """Non-overlapping clips of ``num_frames`` frames every ``frame_stride``, from the start."""
    count = len(frames) // config.span
    if config.clips_per_video:
        count = min(count, config.clips_per_video)
    return [frames[i * config.span : (i + 1) * config.span : config.frame_stride] for i in range(count)]


def _source_fingerprint(config: DataConfig) -> str:
    if config.data_dir:
        folder = Path(config.data_dir)
        files = []
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            if path.is_file():
                stat = path.stat()
                files.append((path.name, stat.st_size, stat.st_mtime_ns))
        return json.dumps([str(folder.absolute()), files])
    return json.dumps([config.tfds_name, config.tfds_split, config.tfds_data_dir])


# ----------------------------------------------------------------------------- tfds builder


class RepvideoClips(tfds.core.GeneratorBasedBuilder):
    """Fixed-size training clips (pixels + caption, or latents + text embedding) in array_record."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def __init__(self, *, data: DataConfig, encoder: Encoder | None = None, **kwargs):
        if not data.data_dir and not data.tfds_name:
            raise DataError("set data.data_dir (a video folder) or data.tfds_name (a registered tfds dataset)")
        if data.preprocess and encoder is None:
            raise DataError("data.preprocess needs an encoder (VAE + T5) to store latents")
        self._data = data
        self._encoder = encoder if data.preprocess else None
        self.skipped: list[str] = []
        self.num_videos = 0
        settings = {
            "source": _source_fingerprint(data),
            "clip": [data.num_frames, data.frame_stride, data.height, data.width, data.clips_per_video],
            "fields": [data.video_field, data.caption_field],
            "encoder": self._encoder.fingerprint if self._encoder else None,
        }
        digest = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:12]
        kind = "latents" if self._encoder else "pixels"
        name = f"{kind}_f{data.num_frames}_s{data.frame_stride}_{data.height}x{data.width}_{digest}"
        super().__init__(config=tfds.core.BuilderConfig(name=name), file_format="array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        data = self._data
        features: dict[str, Any] = {"caption": tfds.features.Text()}
        if self._encoder is None:
            features["video"] = tfds.features.Tensor(
                shape=(data.num_frames, data.height, data.width, 3),
                dtype=np.uint8,
                encoding=tfds.features.Encoding.ZLIB,
            )
        else:
            latent = self._encoder.latent_shape(data.num_frames, data.height, data.width)
            features["latents"] = tfds.features.Tensor(shape=tuple(latent), dtype=np.float32)
            features["text_embedding"] = tfds.features.Tensor(shape=tuple(self._encoder.text_shape()), dtype=np.float32)
        return tfds.core.DatasetInfo(
            builder=self,
            description="RepVideo fine-tuning clips built from a video–caption source.",
            features=tfds.features.FeaturesDict(features),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        data = self._data
        yielded = 0
        for key, frames, caption in self._videos():
            self.num_videos += 1
            clips = sample_clips(frames, data)
            if not clips:
                self.skipped.append(f"{key} ({len(frames)} frames)")
                continue
            for index, clip in enumerate(clips):
                clip = resize_crop(clip, data.height, data.width)
                yielded += 1
                yield f"{key}#{index}", self._example(clip, caption)
        self._report(yielded)

    def _videos(self) -> Iterator[tuple[str, np.ndarray, str]]:
        data = self._data
        if data.tfds_name:
            yield from _tfds_videos(data)
            return
        limit = data.span * (data.clips_per_video or 10**9)
        for path, caption in folder_videos(data.data_dir):
            yield path.name, read_frames(path, limit), caption

    def _example(self, clip: np.ndarray, caption: str) -> dict[str, Any]:
        if self._encoder is None:
            return {"video": clip, "caption": caption}
        return {
            "caption": caption,
            "latents": np.asarray(self._encoder.encode_video(clip[None]), np.float32)[0],
            "text_embedding": np.asarray(self._encoder.encode_text([caption]), np.float32)[0],
        }

    def _report(self, yielded: int) -> None:
        data = self._data
        if self.skipped:
            warnings.warn(
                f"skipped {len(self.skipped)} of {self.num_videos} videos shorter than one clip "
                f"({data.num_frames} frames at stride {data.frame_stride} = {data.span} source frames): "
                + ", ".join(self.skipped),
                stacklevel=2,
            )
        if not yielded:
            raise DataError(
                f"no clips: every one of the {self.num_videos} videos is shorter than {data.span} frames "
                f"(num_frames={data.num_frames}, frame_stride={data.frame_stride})"
            )


def prepare(data: DataConfig, cache_dir: str | Path, encoder: Encoder | None = None) -> RepvideoClips:
    """Builds (or reuses) the ``repvideo_clips`` dataset for ``data`` under ``cache_dir``.

    Under several processes the first one builds it while the others wait; they then read its copy
    (a shared filesystem) or build their own (local disks). Building it concurrently in one shared
    directory would race on tfds' final rename.
    """
    def build() -> RepvideoClips:
        builder = RepvideoClips(data=data, encoder=encoder, data_dir=str(Path(data.cache_dir or cache_dir).absolute()))
        builder.download_and_prepare()
        return builder

    if jax.process_count() == 1:
        return build()
    first = build() if sharding.is_primary() else None
    multihost_utils.sync_global_devices("repvideo_clips prepared")
    return first or build()


# ----------------------------------------------------------------------------- reading


class BatchIterator:
    """Deterministic, resumable batches of one host's share of a random-access source.

    The stream of example indices is the concatenation of per-epoch permutations seeded by
    ``(seed, epoch)``; global batch ``k`` is stream items ``[k·B, (k+1)·B)``, and host ``p`` of ``P``
    takes its ``B/P`` contiguous slice. The whole state is ``position`` (batches consumed).
    """

    def __init__(self, source, batch_size: int, seed: int = 0, process_index: int = 0, process_count: int = 1):
        if batch_size % process_count:
            raise DataError(f"global batch_size {batch_size} is not divisible by {process_count} hosts")
        if len(source) == 0:
            raise DataError("the dataset is empty")
        self.source = source
        self.batch_size = batch_size
        self.seed = seed
        self.local = batch_size // process_count
        self.offset = process_index * self.local
        self.position = 0
        self._perm_epoch = -1
        self._perm = np.zeros(0, np.int64)

    def indices(self, position: int) -> np.ndarray:
        """This host's example indices for global batch ``position``."""
        n = len(self.source)
        start = position * self.batch_size + self.offset
        stream = np.arange(start, start + self.local)
        return np.array([self._permutation(s // n)[s % n] for s in stream])

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.source))
            self._perm_epoch = epoch
        return self._perm

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        examples = [self.source[int(i)] for i in self.indices(self.position)]
        self.position += 1
        return collate(examples)

    def state(self) -> dict[str, int]:
        return {"position": self.position, "seed": self.seed}

    def restore(self, state: dict[str, Any]) -> None:
        if int(state["seed"]) != self.seed:
            raise DataError(f"checkpointed data seed {state['seed']} differs from data.shuffle_seed {self.seed}")
        self.position = int(state["position"])


def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stacks arrays; captions become a list of str."""
    batch: dict[str, Any] = {}
    for key in examples[0]:
        values = [e[key] for e in examples]
        if key == "caption":
            batch[key] = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]
        else:
            batch[key] = np.stack([np.asarray(v) for v in values])
    return batch
