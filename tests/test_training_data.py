"""The tfds video pipeline: folder → repvideo_clips (array_record) → deterministic batches."""

import json
import os
import warnings

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jax_repvideo.training import data as D
from jax_repvideo.training.synthetic import moving_square, write_folder


def config(folder, **kw):
    kw = {"num_frames": 5, "frame_stride": 2, "height": 16, "width": 16, **kw}
    return D.DataConfig(data_dir=str(folder), **kw)


def test_folder_builds_and_reads_back(tmp_path):
    folder = write_folder(tmp_path / "videos", [12, 10, 9], captions="sidecar")
    builder = D.prepare(config(folder, clips_per_video=0), tmp_path / "tfds")
    source = builder.as_data_source()["train"]
    # span = (5-1)*2+1 = 9 source frames: 12 → 1 clip, 10 → 1, 9 → 1
    assert len(source) == 3
    example = source[0]
    assert example["video"].shape == (5, 16, 16, 3) and example["video"].dtype == np.uint8
    assert example["caption"].decode().startswith("a square moving")
    # the square moves: consecutive frames differ
    assert np.abs(example["video"][1].astype(int) - example["video"][0]).max() > 50
    # a second prepare reuses the dataset (same config name and files)
    again = D.prepare(config(folder, clips_per_video=0), tmp_path / "tfds")
    assert again.data_path == builder.data_path


def test_resize_crop_covers_and_centres():
    frames = np.zeros((1, 20, 40, 3), np.uint8)
    frames[:, :, 10:30] = 255  # centre half bright
    out = D.resize_crop(frames, 10, 10)  # scale 0.5 → 10×20, crop columns 5:15 → all from the bright middle
    assert out.shape == (1, 10, 10, 3)
    assert out[0, :, 2:8].min() > 200


def test_short_clips_skipped_with_counted_warning(tmp_path):
    folder = write_folder(tmp_path / "videos", [12, 4, 6])
    with pytest.warns(UserWarning, match=r"skipped 2 of 3 videos shorter than one clip"):
        builder = D.prepare(config(folder), tmp_path / "tfds")
    assert len(builder.as_data_source()["train"]) == 1


def test_all_short_is_an_error(tmp_path):
    folder = write_folder(tmp_path / "videos", [4])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(D.DataError, match="no clips"):
            D.prepare(config(folder), tmp_path / "tfds")


def test_missing_empty_and_unreadable_folders(tmp_path):
    with pytest.raises(D.DataError, match="does not exist"):
        D.folder_videos(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(D.DataError, match="holds no videos"):
        D.folder_videos(tmp_path / "empty")
    if os.geteuid() != 0:  # root reads through permissions
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0)
        try:
            with pytest.raises(D.DataError, match="unreadable"):
                D.folder_videos(locked)
        finally:
            locked.chmod(0o755)


def test_undecodable_video_is_named(tmp_path):
    folder = write_folder(tmp_path / "videos", [9])
    (folder / "clip0.mp4").write_bytes(b"not a video at all")
    with pytest.raises(D.DataError, match=r"cannot decode video .*clip0\.mp4"):
        D.prepare(config(folder), tmp_path / "tfds")


def test_captions_not_matching_videos(tmp_path):
    folder = write_folder(tmp_path / "videos", [9, 9])
    (folder / "captions.jsonl").write_text(
        json.dumps({"video": "clip0.mp4", "caption": "a"}) + "\n" + json.dumps({"video": "other.mp4", "caption": "b"})
    )
    with pytest.raises(D.DataError, match=r"not in the folder: other\.mp4; videos without a caption: clip1\.mp4"):
        D.folder_videos(folder)
    (folder / "captions.jsonl").write_text('{"video": "clip0.mp4"}\n')
    with pytest.raises(D.DataError, match=r"captions.jsonl:1: expected"):
        D.folder_videos(folder)
    (folder / "captions.jsonl").unlink()  # no sidecars either
    with pytest.raises(D.DataError, match=r"videos without a caption: clip0\.mp4, clip1\.mp4"):
        D.folder_videos(folder)


def test_bad_frame_count():
    with pytest.raises(D.DataError, match="4k\\+1"):
        D.DataConfig(num_frames=8)


class ListSource(list):
    pass


def test_batches_are_deterministic_sharded_and_resumable():
    source = ListSource({"x": np.array(i), "caption": f"c{i}".encode()} for i in range(10))
    full = D.BatchIterator(source, batch_size=4, seed=3)
    seen = [next(full)["x"].tolist() for _ in range(5)]  # 20 items = 2 epochs
    assert sorted(seen[0] + seen[1] + seen[2][:2]) == list(range(10))
    assert D.BatchIterator(source, batch_size=4, seed=3).indices(2).tolist() == seen[2]
    assert D.BatchIterator(source, batch_size=4, seed=4).indices(0).tolist() != seen[0]
    hosts = [D.BatchIterator(source, batch_size=4, seed=3, process_index=p, process_count=2) for p in range(2)]
    assert [h.indices(1).tolist() for h in hosts] == [seen[1][:2], seen[1][2:]]
    resumed = D.BatchIterator(source, batch_size=4, seed=3)
    resumed.restore({"position": 3, "seed": 3})
    batch = next(resumed)
    assert batch["x"].tolist() == seen[3] and batch["caption"][0].startswith("c")


class TinyLabelledVideos(tfds.core.GeneratorBasedBuilder):
    """A registered tfds video dataset with a ClassLabel and a nested text field."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "frames": tfds.features.Tensor(shape=(None, 32, 48, 3), dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=["square", "circle"]),
            "meta": {"text": tfds.features.Text()},
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i, length in enumerate([12, 4, 9]):
            yield i, {"frames": moving_square(length, seed=i), "label": [0, 0, 1][i], "meta": {"text": f"shape {i}"}}


def test_registered_tfds_dataset_by_name(tmp_path):
    TinyLabelledVideos(data_dir=str(tmp_path / "src"), file_format="array_record").download_and_prepare()
    for field, want in (("label", {"square", "circle"}), ("meta.text", {"shape 0", "shape 2"})):
        cfg = D.DataConfig(tfds_name="tiny_labelled_videos", tfds_data_dir=str(tmp_path / "src"), video_field="frames",
                           caption_field=field, num_frames=5, frame_stride=2, height=16, width=16)
        with pytest.warns(UserWarning, match="skipped 1 of 3"):
            source = D.prepare(cfg, tmp_path / "tfds").as_data_source()["train"]
        assert {source[i]["caption"].decode() for i in range(len(source))} == want
        assert source[0]["video"].shape == (5, 16, 16, 3)
    bad = D.DataConfig(tfds_name="tiny_labelled_videos", tfds_data_dir=str(tmp_path / "src"), caption_field="caption",
                       video_field="frames", num_frames=5)
    with pytest.raises(D.DataError, match="has no feature 'caption'"):
        D.prepare(bad, tmp_path / "tfds")
