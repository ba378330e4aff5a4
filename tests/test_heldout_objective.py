"""tools/heldout_objective.py: the random-init baseline is scored in the trained model's curriculum stage."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from tool_module import load_tool
from vidssl.engine import build_training_model, model_from_checkpoint, train


def _tool():
    return load_tool("heldout_objective")


class _Counter(nn.Module):
    def __init__(self, start: int) -> None:
        super().__init__()
        self.register_buffer("step", torch.tensor(start))
        self.register_buffer("other", torch.tensor(start))


def test_align_schedules_copies_only_step_buffers_and_refuses_other_architectures():
    tool = _tool()
    trained = nn.Sequential(nn.Linear(2, 2), _Counter(7))
    fresh = nn.Sequential(nn.Linear(2, 2), _Counter(0))
    assert tool.align_schedules(trained, fresh) == ["1.step"]
    assert int(fresh[1].step) == 7 and int(fresh[1].other) == 0  # only the schedule counter moves
    with pytest.raises(ValueError, match="1.step"):
        tool.align_schedules(trained, nn.Sequential(nn.Linear(2, 2)))


def test_random_init_is_scored_in_the_trained_curriculum_stage(tmp_path, one_thread):
    from test_dpc import _cfg
    from test_trainer import TensorLoader

    tool = _tool()
    run = train(_cfg(4), tmp_path / "run", loader=TensorLoader(T=8, size=16), progress=False, echo=False)
    trained, cfg, _ = model_from_checkpoint(run["checkpoint"])
    torch.manual_seed(cfg.train.seed)
    fresh = build_training_model(cfg)
    batch = next(iter(TensorLoader(T=8, size=16)))
    before = tool.mean_logs(fresh, [batch], seed=0)
    assert before["dpc/pred_steps"] == 1.0  # a fresh model sits in the first stage (1 predicted block)
    assert tool.align_schedules(trained, fresh) == ["objectives.dpc.step"]
    after = tool.mean_logs(fresh, [batch], seed=0)
    assert after["dpc/pred_steps"] == tool.mean_logs(trained, [batch], seed=0)["dpc/pred_steps"] == 2.0


def test_static_batches_repeat_each_clips_first_frame(one_thread):
    from vidssl.engine import resolve_run_config

    tool = _tool()
    cfg = resolve_run_config(None, ["data.source=synthetic", "data.clip_len=3", "data.crop_size=32",
                                    "data.synth_videos=2", "data.synth_frames=6", "data.synth_size=[48, 48]"])
    moving = tool.heldout_batches(cfg, num_batches=1, batch_size=2, seed=0)[0]["video"]  # b t c h w
    static = tool.heldout_batches(cfg, num_batches=1, batch_size=2, seed=0, static=True)[0]["video"]
    assert static.shape == moving.shape
    assert not torch.equal(moving[:, 1], moving[:, 0])  # the synthetic clip moves ...
    for t in range(static.shape[1]):
        assert torch.equal(static[:, t], moving[:, 0])  # ... its static version is frame 0 throughout
