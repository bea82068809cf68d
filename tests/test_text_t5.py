"""T5 v1.1 encoder and tokenizer: live parity with a random tiny transformers ``T5EncoderModel``.

The tiny model is built here (no download), saved with ``save_pretrained`` in sharded safetensors
and run through ``jax-repvideo verify t5``. A sentencepiece model trained on a few sentences stands
in for T5's ``spiece.model``; transformers' ``T5Tokenizer`` is the tokenizer oracle.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import T5Config as HFT5Config
from transformers import T5EncoderModel
from transformers import T5Tokenizer as HFT5Tokenizer

from convert.common import CheckpointError
from convert.t5 import check_manifest, load_model, load_t5
from jax_repvideo import cli
from jax_repvideo.config import load, to_dict
from jax_repvideo.models.text_t5 import T5Config, encode
from jax_repvideo.models.tokenizer_t5 import MAX_LENGTH, T5Tokenizer

CONFIG = load(T5Config, Path(__file__).parents[1] / "configs" / "tiny_t5.yaml")
SENTENCES = [
    "a cat sitting on a mat", "a dog running in the park under a blue sky",
    "the quick brown fox jumps over the lazy dog", "a panda eating bamboo in a forest",
    "waves crashing on a rocky shore at sunset", "an astronaut riding a horse on the moon",
]


def hf_config(cfg: T5Config) -> HFT5Config:
    fields = {k: v for k, v in to_dict(cfg).items() if k not in ("param_dtype", "dtype")}
    return HFT5Config(**fields, feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A CogVideoX-style folder: text_encoder/ (sharded fp32 safetensors) and tokenizer/spiece.model."""
    import sentencepiece

    folder = tmp_path_factory.mktemp("t5")
    (folder / "tokenizer").mkdir()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 4), model_prefix=str(folder / "tokenizer" / "spiece"), vocab_size=60,
        hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    torch.manual_seed(0)
    model = T5EncoderModel(hf_config(CONFIG)).eval()
    with torch.no_grad():  # RMS norm weights start at 1: randomise them so their mapping is tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(folder / "text_encoder", max_shard_size="40KB")
    return folder, model


@pytest.fixture(scope="module")
def verify_dir(model_folder):
    folder, model = model_folder
    prompts = T5Tokenizer.from_model_folder(folder)(SENTENCES[:2])
    cases = {"case0.input_ids": prompts,  # real tokenised prompts: EOS then padding, 226 long
             "case1.input_ids": np.random.default_rng(0).integers(0, CONFIG.vocab_size, (1, 17))}
    for k in range(2):
        with torch.no_grad():
            ids = torch.from_numpy(cases[f"case{k}.input_ids"].astype(np.int64))
            cases[f"case{k}.last_hidden_state"] = model(input_ids=ids).last_hidden_state.numpy()
    np.savez(folder / "io.npz", num_cases=2, **cases)
    return folder


def test_sharded_folder(model_folder):
    folder, _ = model_folder
    assert len(list((folder / "text_encoder").glob("*.safetensors"))) > 1
    assert (folder / "text_encoder" / "model.safetensors.index.json").is_file()


def test_verify_cli_parity(verify_dir, capsys):
    assert cli.main(["verify", "t5", str(verify_dir)]) == 0
    out = capsys.readouterr().out
    with capsys.disabled():
        print("\n" + out)
    assert out.count(" ok") == 2


def test_verify_exits_nonzero_above_tolerance(verify_dir, tmp_path):
    io = dict(np.load(verify_dir / "io.npz"))
    io["case1.last_hidden_state"] = io["case1.last_hidden_state"] * 1.01
    np.savez(tmp_path / "io.npz", **io)
    (tmp_path / "text_encoder").symlink_to(verify_dir / "text_encoder")
    assert cli.main(["verify", "t5", str(tmp_path)]) == 1


def test_bf16_checkpoint_converts(model_folder, tmp_path):
    folder, model = model_folder
    model.to(torch.bfloat16).save_pretrained(tmp_path / "text_encoder")
    model.float()
    cfg, flat = load_t5(tmp_path)
    want = model.state_dict()["encoder.block.1.layer.1.DenseReluDense.wo.weight"].to(torch.bfloat16).float().numpy()
    assert flat["layers.wo"].dtype == np.float32
    np.testing.assert_array_equal(flat["layers.wo"][1], want.T)
    ids = np.random.default_rng(1).integers(0, CONFIG.vocab_size, (1, 17))
    reference = T5EncoderModel(hf_config(CONFIG)).eval()
    reference.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})
    with torch.no_grad():
        ref = reference(input_ids=torch.from_numpy(ids)).last_hidden_state.numpy()
    ours = np.asarray(encode(load_model(tmp_path), ids))
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


def test_tokenizer_matches_transformers(model_folder):
    folder, _ = model_folder
    ours = T5Tokenizer.from_model_folder(folder)
    theirs = HFT5Tokenizer.from_pretrained(folder / "tokenizer")
    prompts = SENTENCES + ["A Cat, in the PARK!  twice", ""]
    want = theirs(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True).input_ids
    got = ours(prompts)
    assert got.shape == (len(prompts), MAX_LENGTH) and got.dtype == np.int32
    np.testing.assert_array_equal(got, np.array(want))


def test_long_prompt_is_truncated_with_a_warning(model_folder):
    folder, _ = model_folder
    ours = T5Tokenizer.from_model_folder(folder)
    theirs = HFT5Tokenizer.from_pretrained(folder / "tokenizer")
    prompt = " ".join(SENTENCES * 12)
    with pytest.warns(UserWarning, match="truncated to 226"):
        got = ours(prompt)
    want = theirs(prompt, padding="max_length", max_length=MAX_LENGTH, truncation=True).input_ids
    np.testing.assert_array_equal(got[0], want)
    assert got[0, -1] == ours.eos_id


def test_missing_tokenizer_names_the_expected_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "tokenizer" / "spiece.model")):
        T5Tokenizer.from_model_folder(tmp_path)


def test_bad_input_ids_are_refused(model_folder):
    folder, _ = model_folder
    model = load_model(folder)
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        encode(model, np.array([[5, 100]]))
    with pytest.raises(ValueError, match=r"\(B, L\) integer"):
        encode(model, np.zeros((2, 3), np.float32))


def test_full_size_t5_v1_1_xxl_keys_map_onto_the_model():
    """Every key of transformers' T5 v1.1 XXL encoder (meta device) fills our full-size model."""
    xxl = T5Config()
    with torch.device("meta"):
        model = T5EncoderModel(hf_config(xxl))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert "shared.weight" in shapes and len(shapes) == 2 + 24 * 9 + 2
    check_manifest(shapes, xxl)
    check_manifest({k: v for k, v in shapes.items() if k != "shared.weight"}, xxl)  # only the tied alias
    shapes.pop("encoder.block.7.layer.1.DenseReluDense.wi_1.weight")
    with pytest.raises(CheckpointError, match=r"layers\.wi_1: layer\(s\) \[7\] missing"):
        check_manifest(shapes, xxl)
