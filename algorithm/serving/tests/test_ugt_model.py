"""The reference model: contract, padding invariance, out-of-range ids, checkpoints, training."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from algorithm.errors import CheckpointError, ConfigError, InputFileNotFoundError
from algorithm.ugt import INPUT_NAMES, UGTConfig, UGTModel, random_inputs


def run(model, x):
    with torch.inference_mode():
        return model(*[torch.as_tensor(x[k]) for k in INPUT_NAMES])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return UGTModel(UGTConfig.tiny()).eval()


@pytest.mark.parametrize("batch,seq", [(1, 1), (3, 17), (2, 1024)])
def test_output_contract(model, batch, seq):
    recs, scores = run(model, random_inputs(batch, seq, ragged=True))
    assert recs.shape == (batch, 50, 3) and recs.dtype == torch.int64
    assert scores.shape == (batch, 50) and scores.dtype == torch.float32
    assert torch.all(scores[:, :-1] >= scores[:, 1:]), "scores must be sorted descending"
    for level, size in enumerate((1024, 4096, 16384)):
        assert recs[..., level].min() >= 0 and recs[..., level].max() < size
    # a score is a sum of three log-probabilities
    assert torch.all(scores <= 0)


def test_beams_are_distinct_items(model):
    recs, _ = run(model, random_inputs(2, 8))
    for row in recs:
        assert len({tuple(r.tolist()) for r in row}) == 50


def test_padding_invariance(model, rng):
    x = random_inputs(4, 12, rng=rng, ragged=True)
    padded = {k: np.concatenate([v, rng.integers(0, 1000, (4, 20))], axis=1) for k, v in x.items()}
    padded["attention_mask"][:, 12:] = 0
    r1, s1 = run(model, x)
    r2, s2 = run(model, padded)
    assert torch.equal(r1, r2)
    torch.testing.assert_close(s1, s2, atol=1e-5, rtol=0)


def test_all_masked_history_is_finite_and_padding_invariant(model):
    x = random_inputs(2, 5)
    x["attention_mask"][:] = 0
    r1, s1 = run(model, x)
    assert torch.isfinite(s1).all()
    longer = random_inputs(2, 40)
    longer["attention_mask"][:] = 0
    r2, s2 = run(model, longer)
    assert torch.equal(r1, r2)
    torch.testing.assert_close(s1, s2, atol=1e-5, rtol=0)


def test_out_of_range_ids_are_treated_as_padding(model, rng):
    x = random_inputs(3, 10, rng=rng)
    bad = {k: v.copy() for k, v in x.items()}
    bad["encoder_l1_ids"][0, 3] = 1024  # one past the codebook
    bad["encoder_l2_ids"][1, 0] = -7
    bad["encoder_l3_ids"][2, 9] = 10**9
    masked = {k: v.copy() for k, v in x.items()}
    masked["attention_mask"][0, 3] = masked["attention_mask"][1, 0] = masked["attention_mask"][
        2, 9
    ] = 0
    r1, s1 = run(model, bad)
    r2, s2 = run(model, masked)
    assert torch.equal(r1, r2)
    torch.testing.assert_close(s1, s2)


def test_bad_shapes_raise(model):
    x = random_inputs(2, 4)
    x["attention_mask"] = x["attention_mask"][:, :3]
    with pytest.raises(ValueError, match="share one"):
        run(model, x)
    with pytest.raises(ValueError, match="seq_len"):
        run(model, random_inputs(1, 1025))


def test_non_default_config_runs():
    cfg = UGTConfig(
        codebook_sizes=(64, 128, 256),
        d_model=32,
        n_heads=2,
        n_encoder_layers=1,
        n_decoder_layers=2,
        d_ff=64,
        max_seq_length=100,
        num_recommendations=10,
    )
    m = UGTModel(cfg).eval()
    recs, scores = run(m, random_inputs(2, 100, (64, 128, 256)))
    assert recs.shape == (2, 10, 3) and scores.shape == (2, 10)


def test_base_preset_matches_issue():
    c = UGTConfig.base()
    assert (c.d_model, c.n_heads, c.n_encoder_layers, c.n_decoder_layers, c.d_ff) == (
        512,
        8,
        8,
        4,
        2048,
    )
    assert (
        c.codebook_sizes == (1024, 4096, 16384)
        and c.num_recommendations == 50
        and c.max_seq_length == 1024
    )


@pytest.mark.parametrize(
    "field,value",
    [
        ("codebook_sizes", (10, 20)),
        ("codebook_sizes", (1, 20, 30)),
        ("d_model", 0),
        ("n_heads", 3),
        ("n_encoder_layers", -1),
        ("n_decoder_layers", 0),
        ("d_ff", 0),
        ("max_seq_length", 0),
        ("num_recommendations", 0),
        ("num_recommendations", 2000),
        ("dropout", 1.5),
    ],
)
def test_invalid_model_config(field, value):
    with pytest.raises(ConfigError) as e:
        UGTConfig.tiny(**{field: value})
    assert field in str(e.value) and repr(value) in str(e.value)


def test_checkpoint_round_trip(tmp_path, model):
    path = model.save(tmp_path / "m.safetensors")
    loaded = UGTModel.load(path)
    assert loaded.config == model.config
    x = random_inputs(2, 9)
    r1, s1 = run(model, x)
    r2, s2 = run(loaded, x)
    assert torch.equal(r1, r2) and torch.equal(s1, s2)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o644


def test_checkpoint_missing(tmp_path):
    with pytest.raises(InputFileNotFoundError, match="not found"):
        UGTModel.load(tmp_path / "nope.safetensors")
    assert issubclass(InputFileNotFoundError, FileNotFoundError)


def test_checkpoint_corrupt(tmp_path, model):
    path = tmp_path / "m.safetensors"
    model.save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        UGTModel.load(path)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    with pytest.raises(CheckpointError):
        UGTModel.load(junk)


def test_foreign_safetensors_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="not a UGT checkpoint"):
        UGTModel.load(path)


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/ugt-pwned-by-pickle",))


def test_pickle_with_code_is_refused_without_running(tmp_path):
    import os

    marker = "/tmp/ugt-pwned-by-pickle"
    if os.path.exists(marker):
        os.remove(marker)
    path = tmp_path / "evil.pt"
    torch.save(
        {"config": {}, "state_dict": {}, "x": _Payload()},
        path,
        pickle_protocol=pickle.DEFAULT_PROTOCOL,
    )
    with pytest.raises(CheckpointError, match="weights-only"):
        UGTModel.load(path)
    assert not os.path.exists(marker)


def test_weights_only_torch_checkpoint_loads(tmp_path, model):
    path = tmp_path / "plain.pt"
    torch.save({"config": model.config.to_dict(), "state_dict": model.state_dict()}, path)
    loaded = UGTModel.load(path)
    x = random_inputs(1, 4)
    assert torch.equal(run(model, x)[0], run(loaded, x)[0])


def test_trained_model_beats_chance(trained):
    _, report, _ = trained
    assert report["heldout_recall@50"] > 5 * report["chance_recall@50"]
