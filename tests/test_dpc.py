"""DPC: the dense score's positives and negative classes land where DPC's taxonomy says (hand-built), the
``negatives`` switch, the curriculum's stages and checks, the 2d3d ResNet, the 2-D encoder with temporal pooling,
training + resume through the engine and bad input."""

import json
import math

import einops
import pytest
import torch

from vidssl.config import ConfigError
from vidssl.engine import model_from_checkpoint, resolve_run_config, train
from vidssl.losses import info_nce
from vidssl.models.dpc import (DPC, EASY, POSITIVE, SPATIAL, TEMPORAL, ConvGRU, dpc_negative_mask, dpc_scores,
                               dpc_taxonomy, stage_at)
from vidssl.models.encoders import ModelConfig, ResNetEncoder, build_model_encoder
from vidssl.models.r2d3d import R2D3D


def test_taxonomy_by_hand():
    # B = 2 videos, P = 2 steps, S = 2 positions; rows/columns ordered (b, p, s)
    P_, E, T, S = POSITIVE, EASY, TEMPORAL, SPATIAL
    expected = torch.tensor([
        # b0p0s0 b0p0s1 b0p1s0 b0p1s1 | b1 ...
        [P_, S, T, S, E, E, E, E],
        [S, P_, S, T, E, E, E, E],
        [T, S, P_, S, E, E, E, E],
        [S, T, S, P_, E, E, E, E],
        [E, E, E, E, P_, S, T, S],
        [E, E, E, E, S, P_, S, T],
        [E, E, E, E, T, S, P_, S],
        [E, E, E, E, S, T, S, P_],
    ], dtype=torch.int8)
    torch.testing.assert_close(dpc_taxonomy(2, 2, 2), expected)


def test_taxonomy_counts_match_dpc():
    tax = dpc_taxonomy(32, 3, 16)  # DPC at 128 px, batch 32: 1 / 2 / 45 / 1488 per row (spec 3.4)
    counts = [(tax == c).sum(1) for c in (POSITIVE, TEMPORAL, SPATIAL, EASY)]
    assert [int(c.unique()) for c in counts] == [1, 2, 45, 1488]


def test_dense_scores_put_the_positive_on_the_diagonal_and_the_classes_where_the_taxonomy_says():
    b, p, s, c = 2, 2, 4, 16
    # every (video, step, position) gets its own one-hot code; predictions equal their targets
    codes = torch.eye(c)[: b * p * s]  # (b p s) c
    target = einops.rearrange(codes, "(b p h w) c -> b p c h w", b=b, p=p, h=2, w=2)
    scores = dpc_scores(target * 5.0, target)  # N N
    torch.testing.assert_close(scores, 5.0 * torch.eye(b * p * s))
    loss, n = info_nce(scores)
    assert n == b * p * s and float(loss) < 0.1
    # a prediction equal to a temporal negative's target is scored there: the taxonomy labels that cell -1
    wrong = torch.roll(target, shifts=1, dims=1)  # step p predicts step p-1's code (same video, same position)
    tax = dpc_taxonomy(b, p, s)
    hot = dpc_scores(wrong, target).argmax(dim=1)  # N
    assert bool((tax[torch.arange(b * p * s), hot] == TEMPORAL).all())
    # ... and one equal to another position's code lands on a spatial negative
    spatial = torch.roll(target, shifts=1, dims=-1)
    hot = dpc_scores(spatial, target).argmax(dim=1)
    assert bool((tax[torch.arange(b * p * s), hot] == SPATIAL).all())


@pytest.mark.parametrize("negatives,per_row", [("all", 16), ("easy", 1 + 8), ("temporal", 1 + 1),
                                               ("spatial", 1 + 6), ("hard", 1 + 7)])
def test_negatives_switch_keeps_the_named_classes(negatives, per_row):
    tax = dpc_taxonomy(2, 2, 4)  # 16 candidates: 1 positive, 1 temporal, 6 spatial, 8 easy per row
    valid = dpc_negative_mask(tax, negatives)
    assert bool((valid.sum(1) == per_row).all()) and bool(valid.diagonal().all())
    _, n = info_nce(torch.zeros(16, 16), None, valid=valid)
    assert n == per_row  # chance level is log(per_row)
    with pytest.raises(ValueError, match="negatives: 'bogus'"):
        dpc_negative_mask(tax, "bogus")


def _tiny_dpc(**kw):
    torch.manual_seed(0)
    return DPC(R2D3D("r2d3d18", out_layer="layer2"), **{"num_blocks": 4, "block_len": 2, "pred_steps": 1,
                                                      "total_steps": 5, **kw})


def test_curriculum_switches_at_the_right_steps(one_thread):
    model = _tiny_dpc(stages=[{"until_step": 2, "context": 3, "pred_steps": 1},
                              {"until_step": 5, "context": 2, "pred_steps": 2}])
    video = torch.rand(2, 8, 3, 16, 16)
    seen = []
    for _ in range(5):
        _, logs = model({"video": video})
        seen.append((logs["context"], logs["pred_steps"], logs["num_candidates"]))
    # 2 videos x P steps x (16/8)^2 positions candidates per row
    assert seen == [(3, 1, 8)] * 2 + [(2, 2, 16)] * 3
    assert int(model.step) == 5 and stage_at(model.stages, 99).context == 2
    model.eval()
    model({"video": video})
    assert int(model.step) == 5  # evaluation does not advance the curriculum


def test_curriculum_that_does_not_add_up_names_the_key():
    with pytest.raises(ConfigError, match=r"stages.1.until_step: the stages end at step 4, the run has "
                                          r"train.steps=5"):
        _tiny_dpc(stages=[{"until_step": 2, "context": 3, "pred_steps": 1},
                          {"until_step": 4, "context": 2, "pred_steps": 2}])
    with pytest.raises(ConfigError, match="stages.1.until_step: 2 does not come after"):
        _tiny_dpc(stages=[{"until_step": 2, "context": 3, "pred_steps": 1},
                          {"until_step": 2, "context": 2, "pred_steps": 2}])
    with pytest.raises(ConfigError, match="stages.0: context 3 \\+ pred_steps 2 .* fit num_blocks=4"):
        _tiny_dpc(stages=[{"until_step": 5, "context": 3, "pred_steps": 2}])
    with pytest.raises(ConfigError, match=r"objectives.0.stages.0: expected \{until_step, context, pred_steps\}"):
        resolve_run_config(None, ["objectives=[{name: dpc, stages: [{until: 3}]}]", "data.clip_len=40"])


def test_clips_shorter_than_the_blocks_name_the_key():
    with pytest.raises(ConfigError, match="data.clip_len: 4 is too short for objective 'dpc'.* reads 40 frames"):
        resolve_run_config(None, ["objectives=[{name: dpc}]", "data.clip_len=4"])
    with pytest.raises(ValueError, match="T >= num_blocks \\* block_len = 8.*raise data.clip_len"):
        _tiny_dpc()({"video": torch.rand(1, 7, 3, 16, 16)})


def test_r2d3d_shapes_and_registry():
    enc = build_model_encoder(ModelConfig(encoder="r2d3d18", out_layer="layer4"))
    assert isinstance(enc, R2D3D) and enc.stride == 32 and enc.out_channels == 256
    with torch.no_grad():
        assert enc(torch.rand(2, 3, 5, 32, 32)).shape == (2, 256, 2, 1, 1)  # T' = ceil(5 / 4)
        assert enc(torch.rand(2, 3, 32, 32)).shape == (2, 256, 1, 1)  # a frame for propagation
        assert enc(torch.rand(2, 3, 32, 32), upto="layer2").shape == (2, 128, 4, 4)
    assert enc.stride_at("layer2") == 8 and enc.channels_at("layer3") == 256
    assert [len(getattr(enc, n)) for n in enc.layers] == [2, 2, 2, 2]


def test_two_d_encoder_pools_each_block_over_time(one_thread):
    enc = ResNetEncoder("resnet18", out_layer="layer1", stride8=False, padding_mode="zeros")
    model = DPC(enc, num_blocks=3, block_len=2, pred_steps=1, total_steps=1, random_gray=0.0)
    blocks = torch.rand(1, 3, 2, 3, 16, 16)
    z = model.encode_blocks(blocks)
    enc.eval()
    with torch.no_grad():
        ref = enc(blocks[0, 1, 0:1]) / 2 + enc(blocks[0, 1, 1:2]) / 2
    enc.train()
    model.eval()
    with torch.no_grad():
        z = model.encode_blocks(blocks)
    torch.testing.assert_close(z[0, 1], ref[0], rtol=1e-4, atol=1e-5)
    loss, logs = DPC(enc, num_blocks=3, block_len=2, pred_steps=1, total_steps=1)({"video": torch.rand(2, 6, 3,
                                                                                                      16, 16)})
    loss.backward()
    assert enc.conv1.weight.grad is not None and math.isfinite(logs["loss"])


def test_random_gray_copies_one_channel_per_frame():
    model = _tiny_dpc(random_gray=1.0)
    video = torch.rand(2, 8, 3, 4, 4)
    out = model._random_gray(video, torch.Generator().manual_seed(0))
    assert torch.equal(out[:, :, 0], out[:, :, 1]) and torch.equal(out[:, :, 1], out[:, :, 2])
    same = [bool((out[b, t, 0] == video[b, t, c]).all()) for b in range(2) for t in range(8) for c in range(3)]
    assert sum(same) == 16  # each frame is exactly one of its channels


def test_conv_gru_starts_from_zeros_and_keeps_shape():
    gru = ConvGRU(4, 6, dropout=0.0)
    h = gru(torch.rand(2, 4, 3, 3))
    assert h.shape == (2, 6, 3, 3)
    torch.testing.assert_close(gru(torch.ones(2, 4, 3, 3)), gru(torch.ones(2, 4, 3, 3), torch.zeros(2, 6, 3, 3)))


def _cfg(steps, *extra):
    return resolve_run_config(None, ["model.encoder=r2d3d18", "model.out_layer=layer2", "model.eval_layer=layer2",
                                     "data.clip_len=8", "objectives=[{name: dpc, num_blocks: 4, block_len: 2, "
                                     "pred_steps: 1, stages: [{until_step: 2, context: 3, pred_steps: 1}, "
                                     f"{{until_step: {steps}, context: 2, pred_steps: 2}}]}}]",
                                     "train.batch_size=2", "train.log_every=1", "train.device=cpu",
                                     f"train.steps={steps}", *extra])


def test_trains_and_resumes_with_the_curriculum_in_place(tmp_path, one_thread):
    from test_gim import _Stop, _StopAfter
    from test_trainer import TensorLoader

    straight = train(_cfg(4), tmp_path / "a", loader=TensorLoader(T=8, size=16), progress=False, echo=False)
    with pytest.raises(_Stop):  # killed after step 3's checkpoint
        train(_cfg(4, "train.ckpt_every=3"), tmp_path / "b", loader=_StopAfter(TensorLoader(T=8, size=16), 3),
              progress=False, echo=False)
    resumed = train(_cfg(4), tmp_path / "b", loader=TensorLoader(T=8, size=16), progress=False, echo=False)
    a, _, _ = model_from_checkpoint(straight["checkpoint"])
    b, _, _ = model_from_checkpoint(resumed["checkpoint"])
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(vb, va, rtol=0, atol=0, msg=k)
    logs = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["dpc/pred_steps"] for r in logs] == [1.0, 1.0, 2.0, 2.0]
