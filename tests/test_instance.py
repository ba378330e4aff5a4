"""Instance discrimination (SimCLR / MoCo v2 / memory bank): candidate counts, chance level, the momentum encoder,
config errors, exact resume (queue and bank included) and the frames forward reads."""

import math

import pytest
import torch
import torch.nn.functional as F

from vidssl.config import ConfigError
from vidssl.engine import model_from_checkpoint, resolve_run_config, train
from vidssl.models.instance import InstanceDiscrimination, InstanceParams, augment_views
from vidssl.models.objective import BuildContext

from tiny_encoder import TinyEncoder  # tests/tiny_encoder.py
from test_trainer import TensorLoader

B, SIZE = 4, 16


def clips(b=B, t=2, seed=0):
    return torch.rand(b, t, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def make(negatives, **kw):
    torch.manual_seed(0)
    kw.setdefault("queue_size", 8)
    if negatives == "queue":
        kw.setdefault("bn_splits", 2)  # one process, BatchNorm encoder: MoCo's per-GPU BN as 2 sub-batches
    kw.setdefault("bank_size", 10)
    return InstanceDiscrimination(TinyEncoder(), negatives=negatives, input_mean=(0.0, 0.0, 0.0),
                                  input_std=(1.0, 1.0, 1.0), **kw).train()


def batch_of(b=B, t=2, seed=0):
    return {"video": clips(b, t, seed), "index": torch.arange(b) * 2}


@pytest.mark.parametrize("negatives, kw, n", [
    ("batch", {}, 2 * B - 1),  # the other 2B - 1 views
    ("queue", {"queue_size": 8}, 8 + 1),  # its key and the K queued keys
    ("memory_bank", {"bank_size": 10}, 10),  # every bank entry (the own entry is the positive)
    ("memory_bank", {"bank_size": 10, "num_negatives": 5}, 5 + 1),  # positive + m sampled
    ("memory_bank", {"bank_size": 10, "num_negatives": 5, "bank_loss": "nce"}, 5 + 1),
])
def test_finite_loss_logs_and_candidate_count(one_thread, negatives, kw, n):
    m = make(negatives, **kw)
    loss, logs = m(batch_of(), generator=torch.Generator().manual_seed(1))
    loss.backward()
    assert math.isfinite(float(loss.detach())) and logs["num_candidates"] == n
    assert 0.0 <= logs["top1"] <= 1.0
    if kw.get("bank_loss") == "nce":  # the NCE loss; the bound is the softmax monitor over the same candidates
        assert math.isfinite(logs["log_normaliser"]) and logs["mi_bound_nats"] <= math.log(n)
    else:
        assert logs["mi_bound_nats"] == pytest.approx(math.log(n) - float(loss.detach()))
    assert m.encoder.net[0].weight.grad is not None and m.head.fc1.weight.grad is not None


@pytest.mark.parametrize("negatives, n", [("batch", 2 * B - 1), ("queue", 9), ("memory_bank", 10)])
def test_equal_embeddings_give_exactly_log_n(one_thread, negatives, n):
    """A head that maps everything to one vector (zero last-layer weights) and queue/bank rows equal to it: all
    scores tie, so the loss is the chance level log N and the MI bound 0 -- for the candidate count N claimed."""
    m = make(negatives)
    with torch.no_grad():
        m.head.fc2.weight.zero_()
        m.head.fc2.bias.copy_(torch.linspace(-1, 1, m.head.fc2.bias.numel()))
        if negatives == "queue":
            m.key_head.fc2.weight.zero_()
            m.key_head.fc2.bias.copy_(m.head.fc2.bias)
            m.queue.queue.copy_(F.normalize(m.head.fc2.bias, dim=0).expand_as(m.queue.queue))
        if negatives == "memory_bank":
            m.memory.bank.copy_(F.normalize(m.head.fc2.bias, dim=0).expand_as(m.memory.bank))
    loss, logs = m(batch_of(), generator=torch.Generator().manual_seed(1))
    assert float(loss.detach()) == pytest.approx(math.log(n), abs=1e-5)
    assert logs["mi_bound_nats"] == pytest.approx(0.0, abs=1e-5)


def test_momentum_encoder_follows_the_optimiser_step_and_gets_no_gradient(one_thread):
    m = make("queue", momentum=0.9)
    assert all(not p.requires_grad for p in [*m.key_encoder.parameters(), *m.key_head.parameters()])
    trainable = [p for p in m.parameters() if p.requires_grad]
    assert not {id(p) for p in m.key_encoder.parameters()} & {id(p) for p in trainable}
    opt = torch.optim.SGD(trainable, lr=0.5)
    loss, _ = m(batch_of(), generator=torch.Generator().manual_seed(1))
    opt.zero_grad()
    loss.backward()
    assert all(p.grad is None for p in m.key_encoder.parameters())
    opt.step()  # the query side moves; the key side is updated at the next training forward (MoCo's order)
    q_after = {k: v.detach().clone() for k, v in m.encoder.named_parameters()}
    k_before = {k: v.detach().clone() for k, v in m.key_encoder.named_parameters()}
    assert any(not torch.equal(q_after[k], k_before[k]) for k in q_after)
    m(batch_of(seed=1), generator=torch.Generator().manual_seed(2))
    for k, v in m.key_encoder.named_parameters():
        torch.testing.assert_close(v, 0.9 * k_before[k] + 0.1 * q_after[k], rtol=0, atol=1e-6, msg=k)
    m.eval()  # eval: no momentum step, no enqueue
    frozen = {k: v.clone() for k, v in m.state_dict().items()}
    m(batch_of(seed=2), generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(v, frozen[k]) for k, v in m.state_dict().items())


def test_queue_is_fifo_of_normalised_keys(one_thread):
    m = make("queue", queue_size=8)
    before = m.queue.queue.clone()
    m(batch_of(), generator=torch.Generator().manual_seed(1))
    assert int(m.queue.queue_ptr) == B
    torch.testing.assert_close(m.queue.queue[:B].norm(dim=1), torch.ones(B))
    assert not torch.equal(m.queue.queue[:B], before[:B]) and torch.equal(m.queue.queue[B:], before[B:])
    m(batch_of(seed=1), generator=torch.Generator().manual_seed(2))
    assert int(m.queue.queue_ptr) == 0  # wrapped after K / B batches


def test_bank_update_touches_only_the_batch_items(one_thread):
    m = make("memory_bank", bank_size=10)
    before = m.memory.bank.clone()
    m(batch_of(), generator=torch.Generator().manual_seed(1))
    changed = (m.memory.bank != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [0, 2, 4, 6]
    torch.testing.assert_close(m.memory.bank.norm(dim=1), torch.ones(10))


def test_config_errors_name_the_key(one_thread):
    with pytest.raises(ConfigError, match="queue_size"):  # 6 is no multiple of the batch of 4
        make("queue", queue_size=6)(batch_of(), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ConfigError, match="queue_size"):  # fewer queued negatives than one batch
        make("queue", queue_size=2)(batch_of(), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ConfigError, match="num_negatives"):  # more negatives asked than the bank holds
        make("memory_bank", bank_size=10, num_negatives=10)
    with pytest.raises(ConfigError, match="batch_size"):  # one clip: no in-batch negative
        make("batch")(batch_of(b=1), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ConfigError, match="bank_size"):  # an item beyond the bank
        make("memory_bank", bank_size=5)(batch_of(), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ConfigError, match="objectives.0.negatives"):
        resolve_run_config(None, ["objectives=[{name: instance, negatives: everything}]", "data.clip_len=2"])
    with pytest.raises(ConfigError, match="objectives.0.num_negatives"):
        resolve_run_config(None, ["objectives=[{name: instance, negatives: memory_bank, bank_loss: nce}]",
                                  "data.clip_len=2"])
    with pytest.raises(ConfigError, match="data.clip_len"):  # frames 0 and 3 need clips of 4
        resolve_run_config(None, ["objectives=[{name: instance, frames: [0, 3]}]", "data.clip_len=2"])
    from vidssl.engine import build_training_model

    with pytest.raises(ConfigError, match=r"^objectives\.0\.queue_size: 100 must be a multiple of the global batch 8"):
        build_training_model(resolve_run_config(None, ["objectives=[{name: instance, queue_size: 100}]",
                                                       "data.clip_len=2", "train.batch_size=8"]))  # at build
    model = build_training_model(resolve_run_config(  # second objective: its index names the key at step time
        None, ["objectives=[{name: instance, negatives: batch}, {name: instance, queue_size: 8, bn_splits: 1}]",
               "data.clip_len=2", "train.batch_size=4", "data.crop_size=32"]))
    with pytest.raises(ConfigError, match=r"^objectives\.1\.bn_splits: 1 in a single process"):
        model.objectives["instance_1"]({"video": torch.rand(4, 2, 3, 32, 32)})
    with pytest.raises(ConfigError, match=r"^objectives\.0\.bank_size: the memory bank needs >= 2"):  # in __init__
        build_training_model(resolve_run_config(None, [
            "objectives=[{name: instance, negatives: memory_bank, bank_size: 1}]", "data.clip_len=2"]))
    with pytest.raises(ConfigError, match=r"^queue_size: 6 must be a multiple"):  # library use: the argument's name
        InstanceDiscrimination(TinyEncoder(), queue_size=6)({"video": torch.rand(4, 2, 3, 32, 32)})


@pytest.mark.parametrize("frames", [(0, 1), (2, 0)])
def test_declared_clip_length_is_what_forward_reads(one_thread, frames):
    """NaN in every frame but the two views leaves the loss unchanged; a change in a view frame changes it; a clip one
    frame short is refused."""
    n = InstanceDiscrimination.data_needs(InstanceParams(frames=frames)).clip_len
    assert n == max(frames) + 1
    m = make("batch", frames=frames)

    def loss_of(video):
        return float(m({"video": video}, generator=torch.Generator().manual_seed(0))[0].detach())

    for t in (n, n + 2):
        base = clips(t=t, seed=t)
        ref = loss_of(base)
        unread = base.clone()
        unread[:, [i for i in range(t) if i not in frames]] = float("nan")
        assert loss_of(unread) == ref
        for i in frames:
            changed = base.clone()
            changed[:, i] = torch.rand(B, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(50 + i))
            assert loss_of(changed) != ref
    with pytest.raises(ValueError, match="clip_len"):
        m({"video": clips(t=n - 1)}, generator=torch.Generator().manual_seed(0))


def test_augment_views_stays_in_range_and_is_seeded():
    x = torch.rand(6, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    a = augment_views(x, generator=torch.Generator().manual_seed(1))
    b = augment_views(x, generator=torch.Generator().manual_seed(1))
    c = augment_views(x, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1 and a.shape == x.shape
    grey = augment_views(x, generator=torch.Generator().manual_seed(1), flip_prob=0, jitter_prob=0,
                         grayscale_prob=1, blur_prob=0)
    assert torch.allclose(grey[:, 0], grey[:, 1]) and torch.allclose(grey[:, 1], grey[:, 2])
    ident = augment_views(x, generator=torch.Generator().manual_seed(1), flip_prob=0, jitter_prob=0,
                          grayscale_prob=0, blur_prob=0)
    assert torch.equal(ident, x)


def test_queue_refuses_leaky_batchnorm_in_one_process(one_thread):
    """One process, a BatchNorm encoder, bn_splits 1: the keys' BN statistics would leak the positive -> refused
    when training (naming the key); eval forwards and bn_splits >= 2 are fine."""
    m = make("queue", bn_splits=1)
    with pytest.raises(ConfigError, match=r"bn_splits: 1 in a single process.*leak the positive"):
        m(batch_of(), generator=torch.Generator().manual_seed(1))
    m.eval()(batch_of(), generator=torch.Generator().manual_seed(1))
    make("queue", bn_splits=2)(batch_of(), generator=torch.Generator().manual_seed(1))


def test_bn_splits_shuffle_keys_across_sub_batches(one_thread):
    """With bn_splits 2 the query sub-batches are clips {0, 1} and {2, 3}; the key encoder sees the second views in
    a permuted order, so its sub-batches mix clips (BN statistics of a key never come from its query's sub-batch
    alone), and the unshuffled keys line up with their queries again."""
    m = make("queue", bn_splits=2, view_augment=False)
    m.encoder.seen.clear(), m.key_encoder.seen.clear()
    b = batch_of(seed=3)
    b["video"][:, 1] = b["video"][:, 0]  # second view = first view (no augmentation): rows can be matched
    m(b, generator=torch.Generator().manual_seed(5))
    q_chunks, k_chunks = m.encoder.seen, m.key_encoder.seen
    assert len(q_chunks) == len(k_chunks) == 2 and all(len(c) == B // 2 for c in q_chunks + k_chunks)

    def rows(chunk):  # which clips a sub-batch holds
        return frozenset(int((b["video"][:, 0] - x).abs().flatten(1).sum(1).argmin()) for x in chunk)

    assert {rows(c) for c in q_chunks} == {frozenset({0, 1}), frozenset({2, 3})}
    assert {rows(c) for c in k_chunks} != {rows(c) for c in q_chunks}  # keys' BN sub-batches are mixed


class IndexedLoader(TensorLoader):
    """TensorLoader whose batches carry the dataset item ``index`` (the memory bank's key)."""

    def __iter__(self):
        order = torch.randperm(len(self.clips), generator=torch.Generator().manual_seed(100 + self.epoch))
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield {"video": self.clips[idx], "index": idx}


def _cfg(negatives, steps):
    obj = {"queue": "{name: instance, negatives: queue, queue_size: 4, momentum: 0.9, bn_splits: 2}",
           "memory_bank": "{name: instance, negatives: memory_bank, bank_size: 8, temperature: 0.07}"}[negatives]
    return resolve_run_config(None, ["model.out_layer=layer1", "model.eval_layer=layer1", "data.clip_len=2",
                                     f"objectives=[{obj}]", "train.batch_size=2", "train.log_every=1",
                                     "optim.name=sgd", "optim.lr=0.1", "train.device=cpu", "train.ckpt_every=2",
                                     f"train.steps={steps}"])


@pytest.mark.parametrize("negatives", ["queue", "memory_bank"])
def test_resume_is_bit_identical_including_queue_and_bank(one_thread, tmp_path, negatives):
    def run(steps, out):
        return train(_cfg(negatives, steps), out, loader=IndexedLoader(num_clips=8, batch_size=2, T=2, size=32),
                     progress=False, echo=False)

    straight = run(4, tmp_path / "a")
    run(2, tmp_path / "b")
    half, _, _ = model_from_checkpoint(tmp_path / "b" / "checkpoints" / "step_00000002")
    resumed = run(4, tmp_path / "b")
    a, _, _ = model_from_checkpoint(straight["checkpoint"])
    b, _, _ = model_from_checkpoint(resumed["checkpoint"])
    sa, sb, sh = a.state_dict(), b.state_dict(), half.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=0, atol=0, equal_nan=True, msg=k)
    state = ("objectives.instance.queue.queue" if negatives == "queue" else "objectives.instance.memory.bank")
    assert state in sa and not torch.equal(sa[state], sh[state])  # the buffer moved after the resume
    if negatives == "queue":
        assert "objectives.instance.key_encoder.conv1.weight" in sa and "objectives.instance.queue.queue_ptr" in sa
        assert not torch.equal(sa["objectives.instance.key_encoder.conv1.weight"],
                               sh["objectives.instance.key_encoder.conv1.weight"])


def test_build_context_supplies_data_normalisation_and_bank_size(tmp_path):
    from vidssl.data.config import DataConfig

    frames = tmp_path / "frames"
    for v in ("a", "b", "c"):
        (frames / v).mkdir(parents=True)
        for i in range(3):
            from PIL import Image

            Image.new("RGB", (16, 16), (i * 40, 10, 200)).save(frames / v / f"{i:05d}.jpg")
    data = DataConfig(source="frames", root=str(frames), clips_per_video=5, clip_len=2, mean=(0.5, 0.5, 0.5))
    m = InstanceDiscrimination.from_params(TinyEncoder(), InstanceParams(negatives="memory_bank"),
                                           BuildContext(data=data))
    assert m.memory.bank.shape == (3 * 5, 128) and m.input_mean == (0.5, 0.5, 0.5)
