"""Greedy InfoMax: gradient isolation, per-module optimisers, the memory each mode keeps alive (counted from the
tensors autograd saves), pipelined convergence, resume in every mode, the checkpoint in propagation, bad input; and
the image-mode CPC loss against a loop reference."""

import contextlib
import json
import math

import pytest
import torch

from tool_module import load_tool
from vidssl.config import ConfigError
from vidssl.engine import (build_training_model, encoder_from_checkpoint, model_from_checkpoint, resolve_run_config,
                           train)
from vidssl.losses import info_nce
from vidssl.models.cpc import CPC, RowCPCHead, frames_as_images, patch_grid, patchify, row_cpc_loss
from vidssl.models.encoders import ResNetEncoder
from vidssl.models.gim import GIM, GIMResNet, encoder_modules
from vidssl.models.objective import StepContext

TOY = dict(patch=8, patch_stride=4, pred_steps=2, num_negatives=8)  # 24x24 images -> 5x5 grid of 8x8 patches


def _gim(mode="joint", total_steps=6, seed=0, arch="gim_resnet34", **kw):
    torch.manual_seed(seed)
    return GIM(GIMResNet(arch), mode=mode, total_steps=total_steps, **{**TOY, **kw})


def _ctx(model, step=0, lr=1e-2, opt="adam", seed=0):
    if opt == "adam":
        opts = model.configure_optimizers(lambda groups: torch.optim.Adam(groups, lr=lr))
    else:
        opts = model.configure_optimizers(lambda groups: torch.optim.SGD(groups, lr=lr))
    return StepContext(step=step, lr=lr, optimizers=opts, scalers={k: None for k in opts},
                       autocast=contextlib.nullcontext, generator=torch.Generator().manual_seed(seed),
                       all_reduce_gradients=lambda params: None)


def _batch(n=3, seed=0, size=24):
    return {"video": torch.rand(n, 1, 3, size, size, generator=torch.Generator().manual_seed(seed))}


def _snapshot(model, i):
    return [p.detach().clone() for p in model.module_parameters(i)]


def _moved(model, i, before):
    return any(not torch.equal(a, b) for a, b in zip(before, model.module_parameters(i)))


def test_no_gradient_crosses_a_module_boundary(one_thread):
    model = _gim()
    _, logs = model(_batch())
    x, grid = model._patches(_batch())
    out0, loss0, _ = model.module_loss(0, x, grid, torch.Generator().manual_seed(1))
    _, loss1, _ = model.module_loss(1, out0.detach(), grid, torch.Generator().manual_seed(2))
    grads = torch.autograd.grad(loss1, model.module_parameters(0), allow_unused=True)
    assert all(g is None for g in grads)  # module 1's loss reaches no parameter of module 0
    own = torch.autograd.grad(loss1, model.module_parameters(1), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in own)
    # and through the objective's own forward: module 0's gradient from the sum equals that from its loss alone
    g = torch.Generator().manual_seed(3)
    total, _ = model(_batch(), generator=g)
    g_sum = torch.autograd.grad(total, model.module_parameters(0))
    x, grid = model._patches(_batch())
    _, loss0, _ = model.module_loss(0, x, grid, torch.Generator().manual_seed(3))
    g_own = torch.autograd.grad(loss0, model.module_parameters(0))
    for a, b in zip(g_sum, g_own):
        torch.testing.assert_close(a, b)


def test_module_parameters_partition_the_encoder_and_heads():
    model = _gim()
    ids = [id(p) for i in range(3) for p in model.module_parameters(i)]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_each_optimiser_steps_only_its_module_even_with_momentum(one_thread):
    model = _gim("sequential", total_steps=6, module_steps=[2, 2, 2])
    ctx = _ctx(model)
    for step in range(2):  # module 0's phase: its Adam builds momentum
        ctx.step = step
        before = [_snapshot(model, i) for i in range(3)]
        model.training_step(_batch(seed=step), ctx)
        assert [_moved(model, i, before[i]) for i in range(3)] == [True, False, False]
    assert ctx.optimizers["module0"].state  # non-empty moments
    for step in range(2, 4):  # module 1's phase: module 0 (momentum, zero gradient) must not move
        ctx.step = step
        before = [_snapshot(model, i) for i in range(3)]
        logs = model.training_step(_batch(seed=step), ctx)
        assert logs["active_module"] == 1.0
        assert [_moved(model, i, before[i]) for i in range(3)] == [False, True, False]


def test_joint_per_module_backward_equals_the_official_summed_backward(one_thread):
    a, b = _gim(backward="summed"), _gim(backward="per_module")
    ca, cb = _ctx(a, opt="sgd"), _ctx(b, opt="sgd")
    for step in range(2):
        ca.step = cb.step = step
        la, lb = a.training_step(_batch(n=2, seed=step), ca), b.training_step(_batch(n=2, seed=step), cb)
        assert la["loss"] == pytest.approx(lb["loss"], rel=1e-6)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def _saved_bytes(fn):
    """Bytes autograd saves for backward while ``fn`` runs, and the most alive at once (saved tensors are freed when
    their graph is)."""
    state = {"alive": 0, "peak": 0, "total": 0}

    class Held:
        def __init__(self, t):
            self.t, self.n = t, t.numel() * t.element_size()
            state["alive"] += self.n
            state["total"] += self.n
            state["peak"] = max(state["peak"], state["alive"])

        def __del__(self):
            state["alive"] -= self.n

    with torch.autograd.graph.saved_tensors_hooks(Held, lambda h: h.t):
        fn()
    return state


def test_sequential_and_per_module_modes_free_earlier_activations(one_thread):
    batch = _batch(n=2)
    joint = _gim("joint", backward="summed")
    summed = _saved_bytes(lambda: joint.training_step(batch, _ctx(joint)))
    per_module = _gim("joint", backward="per_module")
    pm = _saved_bytes(lambda: per_module.training_step(batch, _ctx(per_module)))
    seq = _gim("sequential", total_steps=3)
    last = _saved_bytes(lambda: seq.training_step(batch, _ctx(seq, step=2)))  # module 2 active
    # module 2 trained alone on detached inputs: what sequential must keep, nothing more
    alone = _gim("sequential", total_steps=3)
    x, grid = alone._patches(batch)
    with torch.no_grad():
        x = alone.blocks[1](alone.blocks[0](x))
    only2 = _saved_bytes(lambda: alone.module_loss(2, x, grid, torch.Generator().manual_seed(0)))
    assert last["total"] == only2["total"] == last["peak"]  # frozen modules under no_grad saved nothing
    assert last["peak"] < 0.7 * summed["peak"]
    assert summed["peak"] == summed["total"]  # the official summed backward keeps every module's graph at once
    assert pm["total"] == summed["total"] and pm["peak"] < summed["peak"]  # same work, one graph alive at a time


def _plain_block(blk, x):
    """A pre-activation block as first written (out-of-place ReLUs and sum): the reference for the in-place one."""
    out = torch.relu(x)  # b c h w
    idt = x if blk.shortcut is None else blk.shortcut(out)  # b c' h' w'
    out = blk.conv2(torch.relu(blk.conv1(out)))  # b w h' w'
    return (blk.conv3(torch.relu(out)) if hasattr(blk, "conv3") else out) + idt  # b c' h' w'


def _plain_module(model, i, x):
    """Module ``i`` on NCHW input, stage by stage with :func:`_plain_block`."""
    blk = model.blocks[i]
    x = blk._enc[0].stem(x) if blk.with_stem else x  # n 64 p p
    for stage in blk._stages():
        for b in stage:
            x = _plain_block(b, x)  # n c h w
    return x


def _plain_head(codes, head, generator):
    """GIM's sampled-negatives loss as first written: the drawn future codes gathered (M n c), then scored."""
    import einops

    rows, losses = codes.shape[2], []
    for k in range(1, len(head.predictors) + 1):
        off = k + head.skip
        if off >= rows:
            continue
        fut = einops.rearrange(head.predictors[k - 1](codes[:, :, off:]), "b c r w -> (b r w) c")  # M c
        ctx = einops.rearrange(codes[:, :, : rows - off], "b c r w -> (b r w) c")  # M c
        idx = torch.randint(0, ctx.shape[0], (ctx.shape[0], head.num_negatives), generator=generator)  # M n
        pos = einops.einsum(ctx, fut, "m c, m c -> m")[:, None]  # M 1
        neg = einops.einsum(ctx, fut[idx], "m c, m n c -> m n")  # M n
        losses.append(info_nce(torch.cat([pos, neg], dim=1), 0)[0])
    return torch.stack(losses).mean()


def _assert_grads(params, reference):
    for p, g in zip(params, reference):
        torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=1e-6 * float(g.abs().max()) + 1e-15)


@pytest.mark.parametrize("arch", ["gim_resnet34", "gim_resnet50"])
def test_memory_savings_keep_the_plain_computations_losses_and_gradients(arch, one_thread):
    """In-place ReLUs and residual sums, channels-last input, block-by-block modules, gradients freed before the
    forward and negatives scored from the M x M score matrix change no loss and no gradient (fixed seed, float
    tolerance) against the computation as first written, in every sequential module and in end-to-end CPC. In
    float64, so that a changed sum order cannot hide a changed formula (at init the gradients are small differences
    of near-equal scores, where float32 rounding alone moves them by ~1e-3 of their largest entry)."""
    batch = {"video": _batch(n=3)["video"].double()}
    for active in range(3):
        model = _gim("sequential", total_steps=3, seed=active, arch=arch).double()
        x, grid = patchify(frames_as_images(batch), patch=TOY["patch"], stride=TOY["patch_stride"])  # (n g) 3 p p
        with torch.no_grad():
            for i in range(active):
                x = _plain_module(model, i, x)  # (n g) C h w
        ref = _plain_head(patch_grid(_plain_module(model, active, x), grid), model.heads[active],
                          torch.Generator().manual_seed(5))
        params = model.module_parameters(active)
        grads = torch.autograd.grad(ref, params)
        ctx = _ctx(model, step=active, lr=0.0, opt="sgd", seed=5)
        logs = model.training_step(batch, ctx)
        assert logs["loss"] == pytest.approx(float(ref.detach()), rel=1e-6)
        _assert_grads(params, grads)
        ctx.generator = torch.Generator().manual_seed(5)  # the same negatives again
        model.training_step(batch, ctx)  # a second step: the gradients are this step's, not accumulated
        _assert_grads(params, grads)
    torch.manual_seed(0)
    cpc = CPC(GIMResNet(arch), pred_steps=TOY["pred_steps"], num_negatives=TOY["num_negatives"],
              patch=TOY["patch"], patch_stride=TOY["patch_stride"]).double()
    x, grid = patchify(frames_as_images(batch), patch=TOY["patch"], stride=TOY["patch_stride"])  # (n g) 3 p p
    x = cpc.encoder.stem(x)  # (n g) 64 p p
    for name in cpc.encoder.layers:
        for b in getattr(cpc.encoder, name):
            x = _plain_block(b, x)  # (n g) C h w
    ref = _plain_head(patch_grid(x, grid), cpc.head, torch.Generator().manual_seed(5))
    loss, _ = cpc(batch, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-7)
    params = list(cpc.parameters())
    for g, r in zip(torch.autograd.grad(loss, params), torch.autograd.grad(ref, params)):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-6 * float(r.abs().max()) + 1e-15)


def _bench_gim():
    """tools/bench_gim.py as a module (loaded once: the measured-peak test later patches torch.no_grad)."""
    return load_tool("bench_gim")


def _tensor_peak(fn):
    """Bytes: the most tensor memory alive at once while ``fn()`` runs, net of what existed before -- the profiler's
    count of the CPU allocator's calls, by tools/bench_gim.py's ``tensors`` column function, not assumed."""
    return _bench_gim().tensor_peak_bytes(fn)


def test_sequential_mode_frees_earlier_activations_measured_peak(one_thread, monkeypatch):
    """Measured tensor peaks (allocator calls, see _tensor_peak) of one training step with module 1 active, 16x16
    patches: the sequential step needs no more than module 1 trained alone on its cached input (plus that input),
    while a sequential step that keeps the frozen module 0's graph (no ``no_grad``) and the official joint step
    (every module's graph alive at once) both exceed it by at least module 0's saved maps."""
    kw = dict(patch=16, patch_stride=8, pred_steps=2, num_negatives=8)
    batch = _batch(n=2, size=48)  # 5x5 grid of 16x16 patches: module 0's maps (50, 64, 16, 16) are 3.3 MB each
    map0 = 50 * 64 * 16 * 16 * 4

    def seq_step():
        model = _gim("sequential", total_steps=3, **kw)
        ctx = _ctx(model, step=1)
        return lambda: model.training_step(batch, ctx)

    alone = _gim("sequential", total_steps=3, **kw)
    ctx = _ctx(alone, step=1)
    x, grid = alone._patches(batch)
    with torch.no_grad():
        x = alone.blocks[0](x)  # (n g) 64 16 16: module 1's input, cached

    def alone_step():
        _, loss, _ = alone.module_loss(1, x, grid, ctx.generator)
        loss.backward()
        ctx.optimizers["module1"].step()

    budget = _tensor_peak(alone_step) + x.numel() * x.element_size()
    seq = _tensor_peak(seq_step())
    joint = _gim("joint", **kw)
    joint_peak = _tensor_peak(lambda: joint.training_step(batch, _ctx(joint)))
    leaky_step = seq_step()
    monkeypatch.setattr(torch, "no_grad", contextlib.nullcontext)  # frozen module 0 now keeps its graph
    leaky = _tensor_peak(leaky_step)
    monkeypatch.undo()
    print(f"tensor peaks (MiB): sequential {seq / 2**20:.1f}, budget {budget / 2**20:.1f}, leaky {leaky / 2**20:.1f}, "
          f"joint {joint_peak / 2**20:.1f}, one module-0 map {map0 / 2**20:.1f}")
    assert seq <= 1.05 * budget, (seq, budget)
    assert leaky > budget + 3 * map0 and joint_peak > budget + 3 * map0, (leaky, joint_peak, budget, map0)


def _stripes(n, seed, size=24):
    """Toy stream: every column constant down the image, so a patch's code predicts the codes below it."""
    g = torch.Generator().manual_seed(seed)
    cols = torch.rand(n, 3, 1, size // 8, generator=g).repeat_interleave(8, dim=-1)  # n 3 1 W
    return {"video": cols.expand(n, 3, size, size)[:, None].contiguous()}


def test_pipelined_with_two_workers_converges_on_a_toy_stream(one_thread):
    torch.manual_seed(0)
    enc = ResNetEncoder("resnet18", out_layer="layer2", stride8=False)
    model = GIM(enc, splits=["layer1", "layer2"], mode="pipelined", workers=2, negatives="batch_all", patch=16,
                patch_stride=8, pred_steps=1)
    assert model.groups == [[0], [1]]
    ctx = _ctx(model, lr=3e-3)
    logs = []
    for step in range(20):
        ctx.step = step
        logs.append(model.training_step(_stripes(4, step, size=48), ctx))
    assert logs[0]["groups_run"] == 1.0 and logs[1]["groups_run"] == 2.0  # module 1 waits one step for its input
    assert "m1/loss" not in logs[0] and "m1/loss" in logs[1]
    # chance is mi_bound 0 (loss = log N); a same-column patch at another row is a true look-alike, so the best
    # reachable loss is log 3 on this stream, not 0
    for m in ("m0", "m1"):
        late = sum(r[f"{m}/mi_bound_nats"] for r in logs[-3:]) / 3
        early = logs[0 if m == "m0" else 1][f"{m}/mi_bound_nats"]
        assert late > 0.7 and late > early + 0.5, (m, early, late)


def test_bad_input_names_the_key():
    enc = GIMResNet("gim_resnet34")
    with pytest.raises(ConfigError, match=r"splits: \['layer4'\] are not stages"):
        encoder_modules(enc, ["layer1", "layer4"])
    with pytest.raises(ConfigError, match="splits: the last module must end at the encoder's last stage"):
        encoder_modules(enc, ["layer1", "layer2"])
    with pytest.raises(ConfigError, match="splits: .* distinct stages in encoder order"):
        encoder_modules(enc, ["layer2", "layer1", "layer3"])
    with pytest.raises(ConfigError, match="workers: 4 pipelined workers for 3 modules"):
        resolve_run_config(None, ["model.encoder=gim_resnet34", "model.out_layer=layer3", "data.clip_len=1",
                                  "objectives=[{name: gim, mode: pipelined, workers: 4}]"])
    with pytest.raises(ConfigError, match="^module_steps: .* adding up to train.steps=10"):  # library use: bare
        GIM(enc, mode="sequential", module_steps=[3, 3, 3], total_steps=10)
    with pytest.raises(ConfigError, match=r"^objectives\.0\.module_steps: .* adding up to train.steps=10"):
        build_training_model(resolve_run_config(None, [  # from a recipe: the key as the config spells it
            "model.encoder=gim_resnet34", "model.out_layer=layer3", "data.clip_len=1", "train.steps=10",
            "objectives=[{name: gim, mode: sequential, module_steps: [3, 3, 3]}]"]))
    with pytest.raises(ConfigError, match="model.out_layer: 'layer4'; gim_resnet34 has stages"):
        build_training_model(resolve_run_config(None, ["model.encoder=gim_resnet34", "objectives=[{name: gim}]",
                                                       "data.clip_len=1"]))
    with pytest.raises(ValueError, match="smaller than one 16x16 patch; raise data.crop_size"):
        patchify(torch.rand(1, 3, 8, 8))


def test_splits_work_on_a_torchvision_resnet_with_batchnorm(one_thread):
    enc = ResNetEncoder("resnet18", out_layer="layer2", stride8=False, padding_mode="zeros")
    model = GIM(enc, splits=["layer1", "layer2"], mode="sequential", total_steps=2, **TOY)
    assert [b.names for b in model.blocks] == [["layer1"], ["layer2"]]
    assert any(p is enc.conv1.weight for p in model.module_parameters(0))
    ctx = _ctx(model, step=1)
    before = _snapshot(model, 0)
    bn_before = enc.bn1.running_mean.clone()
    model.training_step(_batch(size=32), ctx)
    assert not _moved(model, 0, before) and torch.equal(enc.bn1.running_mean, bn_before)  # frozen: eval-mode BN


def test_row_cpc_loss_matches_a_loop_reference():
    torch.manual_seed(0)
    codes = torch.randn(2, 4, 5, 3, dtype=torch.float64)
    preds = torch.nn.ModuleList(torch.nn.Conv2d(4, 4, 1, bias=False).double() for _ in range(2))
    loss, logs = row_cpc_loss(codes, preds, skip=1, negatives="batch_all")
    ref = []
    for k in (1, 2):
        off = k + 1
        fut = preds[k - 1](codes)  # b c r w
        ctx_items = [(b, r, w) for b in range(2) for r in range(5 - off) for w in range(3)]
        fut_items = [(b, r + off, w) for b, r, w in ctx_items]
        terms = []
        for i, (b, r, w) in enumerate(ctx_items):
            s = torch.stack([codes[b, :, r, w] @ fut[b2, :, r2, w2] for b2, r2, w2 in fut_items])
            terms.append(-(s[i] - torch.logsumexp(s, 0)))
        ref.append(torch.stack(terms).mean())
    torch.testing.assert_close(loss, torch.stack(ref).mean().float(), rtol=1e-5, atol=1e-6)
    assert logs["num_candidates"] == pytest.approx((18 + 12) / 2)  # B * rows left * W per horizon
    # equal codes: chance level log N for both policies
    flat = torch.ones(2, 4, 5, 3)
    head = RowCPCHead(4, pred_steps=1, negatives="batch_sampled", num_negatives=7)
    l2, lg = head(flat, torch.Generator().manual_seed(0))
    assert float(l2.detach()) == pytest.approx(math.log(8), rel=1e-5) and lg["mi_bound_nats"] == pytest.approx(0, abs=1e-5)


def test_temperature_scores_are_cosine_over_tau():
    codes = torch.randn(2, 4, 4, 3, generator=torch.Generator().manual_seed(0))
    preds = torch.nn.ModuleList([torch.nn.Conv2d(4, 4, 1, bias=False)])
    loss, _ = row_cpc_loss(codes * 100, preds, negatives="batch_all", temperature=0.5)
    scaled, _ = row_cpc_loss(codes, preds, negatives="batch_all", temperature=0.5)
    torch.testing.assert_close(loss, scaled)  # scale-free: cosine
    assert float(loss.detach()) < math.log(2 * 2 * 3) + 2 / 0.5  # bounded logits: |s| <= 1 / tau


def test_patchify_is_row_major():
    img = torch.arange(16.0).reshape(1, 1, 4, 4)
    patches, grid = patchify(img, patch=2, stride=2)
    assert grid == (2, 2) and patches[1, 0, 0, 0] == 2.0 and patches[2, 0, 0, 0] == 8.0


def _cfg(mode, steps, *extra):
    return resolve_run_config(None, ["model.encoder=gim_resnet34", "model.out_layer=layer3",
                                     "model.eval_layer=layer3", "data.clip_len=1",
                                     f"objectives=[{{name: gim, mode: {mode}, patch: 8, patch_stride: 4, "
                                     "pred_steps: 2, num_negatives: 8}]", "train.batch_size=2", "train.log_every=1",
                                     "train.device=cpu", "optim.lr=1e-3", f"train.steps={steps}", *extra])


@pytest.mark.parametrize("mode", ["joint", "sequential", "sequential_cache"])
def test_resume_continues_exactly(tmp_path, mode, one_thread):
    from test_trainer import TensorLoader

    seq = ["objectives.0.module_steps=[1, 2, 1]"] if mode.startswith("sequential") else []
    if mode == "sequential_cache":  # module 1: step 1 writes its one cached input, step 2 (the checkpoint) replays it
        mode, seq = "sequential", seq + ["objectives.0.cache=disk", "objectives.0.cache_batches=1"]
    straight = train(_cfg(mode, 4, *seq), tmp_path / "a", loader=TensorLoader(T=1, size=24), progress=False,
                     echo=False)
    # train 2 of 4 steps (a checkpoint at 2), then resume to 4
    cfg_b = _cfg(mode, 4, "train.ckpt_every=2", *seq)
    with pytest.raises(_Stop):
        train(cfg_b, tmp_path / "b", loader=_StopAfter(TensorLoader(T=1, size=24), 2), progress=False, echo=False)
    resumed = train(cfg_b, tmp_path / "b", loader=TensorLoader(T=1, size=24), progress=False, echo=False)
    a, _, _ = model_from_checkpoint(straight["checkpoint"])
    b, _, _ = model_from_checkpoint(resumed["checkpoint"])
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(vb, va, rtol=0, atol=0, msg=k)
    logs = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2, 3, 4]
    if mode == "sequential":
        assert [r["active_module"] for r in logs] == [0.0, 1.0, 1.0, 2.0]
    if "objectives.0.cache=disk" in seq:  # built, replayed, then module 2's built from module 1's after the resume
        assert [r.get("cache_hit") for r in logs] == [None, 0.0, 1.0, 0.0]
        assert not (tmp_path / "b" / "gim_cache").exists()  # removed after the final checkpoint


class _Stop(Exception):
    pass


class _StopAfter:
    """A loader that raises after ``n`` batches (a run killed after its checkpoint)."""

    def __init__(self, loader, n):
        self.loader, self.n, self.skipped = loader, n, 0

    def set_epoch(self, epoch):
        self.loader.set_epoch(epoch)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for i, b in enumerate(self.loader):
            if i >= self.n:
                raise _Stop()
            yield b


def test_checkpoint_round_trip_into_propagate(tmp_path, one_thread):
    from test_trainer import TensorLoader

    summary = train(_cfg("sequential", 3), tmp_path / "run", loader=TensorLoader(T=1, size=24), progress=False,
                    echo=False)
    enc, model_cfg, _, step = encoder_from_checkpoint(summary["checkpoint"])
    assert step == 3 and model_cfg.encoder == "gim_resnet34"
    full, _, _ = model_from_checkpoint(summary["checkpoint"])
    for k, v in full.encoder.state_dict().items():
        torch.testing.assert_close(enc.state_dict()[k], v, rtol=0, atol=0)
    from vidssl.cli import main

    davis = tmp_path / "davis"
    assert main(["data", "synth", "--out", str(davis), "--format", "davis", "--videos", "1", "--val-videos", "1",
                 "--frames", "3", "--size", "32", "32"]) == 0
    assert main(["propagate", "--checkpoint", str(tmp_path / "run"), "--davis-root", str(davis), "--year", "2017",
                 "--split", "val", "--out", str(tmp_path / "prop"), "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "prop" / "metrics.json").read_text())
    assert metrics["extra_info"]["step"] == 3 and metrics["extra_info"]["source"] == "checkpoint"


def test_pipelined_resumes_with_an_empty_pipeline(tmp_path, one_thread):
    from test_trainer import TensorLoader

    cfg = _cfg("pipelined", 4, "train.ckpt_every=2")
    with pytest.raises(_Stop):
        train(cfg, tmp_path / "run", loader=_StopAfter(TensorLoader(T=1, size=24), 2), progress=False, echo=False)
    train(cfg, tmp_path / "run", loader=TensorLoader(T=1, size=24), progress=False, echo=False)
    logs = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2, 3, 4]
    # the in-flight activations are not checkpointed: after the resume the last group waits one step again
    assert [r["groups_run"] for r in logs] == [1.0, 2.0, 1.0, 2.0]


def test_cuts_inside_a_stage_partition_the_encoder_and_compose_to_it():
    enc = GIMResNet("gim_resnet34")
    blocks = encoder_modules(enc, ["layer1.1", "layer2.1", "layer3"])
    assert [b.segments for b in blocks] == [[("layer1", 0, 2)], [("layer1", 2, 3), ("layer2", 0, 2)],
                                            [("layer2", 2, 4), ("layer3", 0, 6)]]
    assert [b.with_stem for b in blocks] == [True, False, False]
    ids = [id(p) for b in blocks for p in b.parameters_of()]
    assert len(ids) == len(set(ids)) == len(list(enc.parameters()))
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        y = x
        for b in blocks:
            y = b(y)
        torch.testing.assert_close(y, enc(x))
    model = GIM(enc, splits=["layer1.1", "layer2.1", "layer3"], total_steps=3, **TOY)
    assert [h.predictors[0].in_channels for h in model.heads] == [64, 128, 256]
    with pytest.raises(ConfigError, match="splits: 'layer1.3': layer1 has blocks 0..2"):
        encoder_modules(enc, ["layer1.3", "layer3"])
    with pytest.raises(ConfigError, match="must name distinct stages in encoder order"):
        encoder_modules(enc, ["layer2", "layer1.1", "layer3"])


def test_sequential_step_keeps_no_graph_of_frozen_modules_and_frees_their_outputs(one_thread):
    """The frozen modules run under no_grad (no parameter of theirs is reached by the backward, none gets a
    gradient) and nothing of theirs is saved for backward; the active module's own saved tensors are all that
    autograd holds."""
    model = _gim("sequential", total_steps=3)
    batch = _batch(n=2)
    ctx = _ctx(model, step=2)
    alive = _saved_bytes(lambda: model.training_step(batch, ctx))
    assert all(p.grad is None for i in (0, 1) for p in model.module_parameters(i))
    assert all(p.grad is not None for p in model.module_parameters(2))
    alone = _gim("sequential", total_steps=3)
    x, grid = alone._patches(batch)
    with torch.no_grad():
        x = alone.blocks[1](alone.blocks[0](x))
    only2 = _saved_bytes(lambda: alone.module_loss(2, x, grid, torch.Generator().manual_seed(0)))
    assert alive["total"] == only2["total"]


def test_code_stats_flag_collapsed_codes():
    from vidssl.models.gim import code_stats

    spread = code_stats(torch.randn(4, 16, 3, 3, generator=torch.Generator().manual_seed(0)))
    assert abs(spread["code_cos"]) < 0.1
    one_way = torch.rand(16)[None, :, None, None] * torch.rand(4, 1, 3, 3) * 1000  # one direction, any length
    assert code_stats(one_way)["code_cos"] == pytest.approx(1.0, abs=1e-5)


def _module2_codes_after(lr, steps=6):
    """Module 2's code stats after ``steps`` joint steps of the sample recipe's head (cosine / 0.1, every row-below
    position a negative) on smooth random 32x32 images, Adam at ``lr`` without warm-up."""
    torch.manual_seed(0)
    model = GIM(GIMResNet("gim_resnet34"), pred_steps=1, negatives="batch_all", temperature=0.1,
                backward="per_module", total_steps=1)
    ctx = _ctx(model, lr=lr)
    first = None
    for step in range(steps):
        img = torch.rand(4, 3, 4, 4, generator=torch.Generator().manual_seed(step))
        img = torch.nn.functional.interpolate(img, size=(32, 32), mode="bilinear")[:, None]  # b 1 3 32 32
        logs = model.training_step({"video": (img - 0.5) / 0.25}, ctx)
        first = first or logs["m2/code_norm"]
    return logs["m2/code_cos"], logs["m2/code_norm"] / first


def test_the_sample_recipe_lr_does_not_collapse_the_last_module(one_thread):
    """configs/gim_sample.yaml once ran Adam at 5e-4: with scale-free cosine scores and no BatchNorm, the first
    sign-like Adam steps blew module 2's codes up to one direction (norm x100, pairwise cosine 1.000 within 6 steps,
    loss stuck at log N). The recipe's lr (even without its warm-up) must keep them apart; 5e-4 must still show
    the collapse, or this test has lost its teeth."""
    from pathlib import Path

    import yaml

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "gim_sample.yaml").read_text())
    cos, growth = _module2_codes_after(float(cfg["optim"]["lr"]))
    assert cos < 0.99 and growth < 5, (cos, growth)
    cos_hi, growth_hi = _module2_codes_after(5e-4)
    assert cos_hi > 0.999 and growth_hi > 10, (cos_hi, growth_hi)


def _cache_pair(tmp_path, seed=0):
    """A sequential GIM without and one with the disk cache (same weights), each with one persistent context."""
    kw = dict(module_steps=[1, 4, 3], cache_batches=2)
    plain, cached = _gim("sequential", total_steps=8, seed=seed, **kw), _gim(
        "sequential", total_steps=8, seed=seed, cache="disk", cache_dir=str(tmp_path / "cache"), **kw)
    return (plain, _ctx(plain, lr=1e-3)), (cached, _ctx(cached, lr=1e-3))


def _step(model, ctx, step, batch):
    import dataclasses

    return model.training_step(batch, dataclasses.replace(ctx, step=step,
                                                          generator=torch.Generator().manual_seed(step)))


def test_disk_cache_trains_exactly_as_recomputing_on_the_cached_batches(tmp_path, one_thread):
    """module_steps [1, 4, 3], cache_batches 2: module 1 caches the inputs of steps 1-2 and replays them at 3-4
    (whatever the stream draws); module 2 makes its inputs from module 1's cached ones (steps 5-6) and replays at
    step 7. Parameters and losses equal, bit for bit, recomputing the frozen modules on those same batches."""
    (plain, pctx), (cached, cctx) = _cache_pair(tmp_path)
    b = [_batch(n=2, seed=s) for s in range(3)]
    noise = _batch(n=2, seed=99)
    fed_plain = [b[0], b[1], b[2], b[1], b[2], b[1], b[2], b[1]]
    fed_cached = [b[0], b[1], b[2], noise, noise, noise, noise, noise]
    hits = []
    folder = tmp_path / "cache"
    for step in range(8):
        lp = _step(plain, pctx, step, fed_plain[step])
        lc = _step(cached, cctx, step, fed_cached[step])
        assert lc["loss"] == lp["loss"], step
        hits.append(lc.get("cache_hit"))
        for i in range(3):
            for a, c in zip(plain.module_parameters(i), cached.module_parameters(i)):
                torch.testing.assert_close(c, a, rtol=0, atol=0, msg=f"step {step} module {i}")
    assert hits == [None, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    # every file is kept for a resume until the run ends (module 2's from module 1's: both of each)
    assert sorted(str(f.relative_to(folder)) for f in folder.rglob("*.safetensors")) == [
        "module1/rank0_000000.safetensors", "module1/rank0_000001.safetensors",
        "module2/rank0_000000.safetensors", "module2/rank0_000001.safetensors"]
    (folder / "module1" / ".rank0_000002.safetensors.x.safetensors.tmp").write_bytes(b"cut short")
    cached.on_train_end(None)
    assert not folder.exists()


def test_disk_cache_remakes_files_of_other_weights(tmp_path, one_thread):
    """A cache folder left by another run (other frozen weights) is not read: its files are remade."""
    (_, _), (first, fctx) = _cache_pair(tmp_path, seed=0)
    (plain, pctx), (second, sctx) = _cache_pair(tmp_path, seed=1)
    b = [_batch(n=2, seed=s) for s in range(3)]
    for step in range(3):
        _step(first, fctx, step, b[step])  # leaves module 1's two cached inputs
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 2
    fed = [b[0], b[2], b[1], b[2]]  # other batches than the first run cached at steps 1-2
    for step in range(4):
        lp = _step(plain, pctx, step, fed[step])
        lc = _step(second, sctx, step, fed[step] if step < 3 else _batch(n=2, seed=99))
        assert lc["loss"] == lp["loss"] and lc.get("cache_hit") == [None, 0.0, 0.0, 1.0][step]


def test_disk_cache_bad_input():
    enc = GIMResNet("gim_resnet34")
    with pytest.raises(ConfigError, match="cache: 'disk' with mode 'joint'"):
        GIM(enc, mode="joint", cache="disk")
    with pytest.raises(ConfigError, match=r"objectives\.0\.cache: disk caches the frozen modules of mode sequential"):
        resolve_run_config(None, ["model.encoder=gim_resnet34", "model.out_layer=layer3", "data.clip_len=1",
                                  "objectives=[{name: gim, mode: joint, cache: disk}]"])
    with pytest.raises(ConfigError, match=r"objectives\.0\.cache_batches: must be >= 1"):
        resolve_run_config(None, ["model.encoder=gim_resnet34", "model.out_layer=layer3", "data.clip_len=1",
                                  "objectives=[{name: gim, mode: sequential, cache: disk, cache_batches: 0}]"])
    model = _gim("sequential", total_steps=2, module_steps=[1, 1], splits=["layer1", "layer3"], cache="disk")
    ctx = _ctx(model)
    model.training_step(_batch(n=2), ctx)  # module 0 reads no cache
    with pytest.raises(RuntimeError, match="cache: disk needs a folder: set cache_dir"):
        _step(model, ctx, 1, _batch(n=2))


def test_disk_cache_resume_into_an_earlier_phase_reads_the_files_the_run_used(tmp_path, one_thread):
    """Checkpoint in module 1's phase, crash after module 2 started (it built its input from module 1's cached one):
    the resumed run replays module 1's cached input, not the stream's batch, and ends where an uninterrupted run
    ends, bit for bit."""
    from test_trainer import TensorLoader

    extra = ["objectives.0.module_steps=[1, 3, 2]", "objectives.0.cache=disk", "objectives.0.cache_batches=1",
             "train.ckpt_every=3"]
    straight = train(_cfg("sequential", 6, *extra), tmp_path / "a", loader=TensorLoader(num_clips=12, T=1, size=24),
                     progress=False, echo=False)
    cfg = _cfg("sequential", 6, *extra)
    with pytest.raises(_Stop):  # steps 0-4 ran (checkpoint after step 2, in module 1's phase), module 2 built its
        train(cfg, tmp_path / "b", loader=_StopAfter(TensorLoader(num_clips=12, T=1, size=24), 5),  # input at 4
              progress=False, echo=False)
    assert (tmp_path / "b" / "gim_cache" / "module2" / "rank0_000000.safetensors").is_file()
    resumed = train(cfg, tmp_path / "b", loader=TensorLoader(num_clips=12, T=1, size=24), progress=False, echo=False)
    a, _, _ = model_from_checkpoint(straight["checkpoint"])
    b, _, _ = model_from_checkpoint(resumed["checkpoint"])
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(vb, va, rtol=0, atol=0, msg=k)
    logs = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r.get("cache_hit") for r in logs] == [None, 0.0, 1.0, 1.0, 1.0, 1.0]  # after the resume: all read back
    assert not (tmp_path / "a" / "gim_cache").exists() and not (tmp_path / "b" / "gim_cache").exists()


def test_disk_cache_files_of_another_precision_or_unreadable_are_remade(tmp_path, one_thread):
    """A file made under bf16 autocast is not read by an fp32 run (and the other way round); a corrupt file is
    remade, not trusted."""
    import dataclasses

    (_, _), (model, ctx) = _cache_pair(tmp_path)
    b = [_batch(n=2, seed=s) for s in range(2)]
    bf16 = dataclasses.replace(ctx, autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    _step(model, bf16, 0, b[0])
    assert _step(model, bf16, 1, b[1])["cache_hit"] == 0.0
    f = tmp_path / "cache" / "module1" / "rank0_000000.safetensors"
    from safetensors import safe_open

    with safe_open(str(f), framework="pt") as h:
        assert h.get_tensor("x").dtype == torch.bfloat16
    # step 3 replays module 1's file 0 (module_steps [1, 4, 3], cache_batches 2): under fp32 it is remade, then read
    assert _step(model, ctx, 3, b[1])["cache_hit"] == 0.0
    with safe_open(str(f), framework="pt") as h:
        assert h.get_tensor("x").dtype == torch.float32
    assert _step(model, ctx, 3, b[1])["cache_hit"] == 1.0
    f.write_bytes(b"not a safetensors file")
    assert _step(model, ctx, 3, b[1])["cache_hit"] == 0.0
