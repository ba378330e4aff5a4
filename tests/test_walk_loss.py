"""CRW loss: against a slow loop implementation, closed-form values, row-stochasticity, learning on one clip."""

import math

import pytest
import torch
import torch.nn.functional as F

from vidssl.losses import palindrome_returns, transition_matrices, walk_loss
from vidssl.models import CRW, build_encoder, grid_patches, jitter_patches


def slow_walk_loss(q: torch.Tensor, temperature: float, min_length: int = 2) -> torch.Tensor:
    """Loop reference: explicit per-sample, per-step matrices and per-node cross-entropy."""
    B, T, N, _ = q.shape
    per_k = []
    for k in range(min_length, T):
        total = 0.0
        for b in range(B):
            fwd = [torch.softmax(q[b, t] @ q[b, t + 1].T / temperature, dim=1) for t in range(T - 1)]
            bwd = [torch.softmax(q[b, t + 1] @ q[b, t].T / temperature, dim=1) for t in range(T - 1)]
            M = torch.eye(N, dtype=q.dtype)
            for t in range(k):
                M = M @ fwd[t]
            for t in reversed(range(k)):
                M = M @ bwd[t]
            for i in range(N):
                total = total - torch.log(M[i, i] + 1e-20)
        per_k.append(total / (B * N))
    return torch.stack(per_k).mean()


def test_matches_slow_loop():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(2, 5, 6, 8, generator=g, dtype=torch.float64), dim=-1)
    loss, logs = walk_loss(q, temperature=0.1, edge_dropout=0.0)
    ref = slow_walk_loss(q, 0.1)
    assert torch.allclose(loss, ref, rtol=1e-10, atol=1e-12)
    assert set(k for k in logs if k.startswith("xent_")) == {"xent_2", "xent_3", "xent_4"}


def test_uniform_affinities_give_log_n():
    q = torch.ones(3, 4, 7, 16)  # every node identical -> every transition uniform
    loss, _ = walk_loss(q, temperature=0.05, edge_dropout=0.0)
    assert loss.item() == pytest.approx(math.log(7), rel=1e-6)


def test_identical_frames_distinct_nodes_near_zero():
    nodes = torch.eye(10)  # orthogonal embeddings
    q = nodes.expand(2, 4, 10, 10).clone()
    loss, logs = walk_loss(q, temperature=0.01, edge_dropout=0.0)
    assert loss.item() < 1e-6
    assert logs["acc_3"] == 1.0


def test_transitions_and_returns_row_stochastic():
    q = F.normalize(torch.randn(2, 5, 9, 4), dim=-1)
    P, Pb = transition_matrices(q, temperature=0.07, edge_dropout=0.3, generator=torch.Generator().manual_seed(1))
    assert P.shape == (2, 4, 9, 9)
    torch.testing.assert_close(P.sum(-1), torch.ones(2, 4, 9))
    torch.testing.assert_close(Pb.sum(-1), torch.ones(2, 4, 9))
    for Q in palindrome_returns(P, Pb, min_length=1):
        torch.testing.assert_close(Q.sum(-1), torch.ones(2, 9))


def test_edge_dropout_changes_loss_and_is_seeded():
    q = F.normalize(torch.randn(2, 4, 9, 8), dim=-1)
    a, _ = walk_loss(q, temperature=0.1, edge_dropout=0.5, generator=torch.Generator().manual_seed(3))
    b, _ = walk_loss(q, temperature=0.1, edge_dropout=0.5, generator=torch.Generator().manual_seed(3))
    c, _ = walk_loss(q, temperature=0.1, edge_dropout=0.0)
    assert a.item() == b.item() and a.item() != c.item()


def test_too_short_clip_is_an_error():
    with pytest.raises(ValueError, match="T=2"):
        walk_loss(torch.randn(1, 2, 4, 3), temperature=0.1)


def test_grid_patches_layout():
    video = torch.arange(2 * 3 * 1 * 8 * 8, dtype=torch.float32).reshape(2, 3, 1, 8, 8)
    p = grid_patches(video, patch_size=4, patch_stride=2)
    assert p.shape == (2, 3, 9, 1, 4, 4)
    torch.testing.assert_close(p[1, 2, 4, 0], video[1, 2, 0, 2:6, 2:6])  # centre node = rows 2..5, cols 2..5
    torch.testing.assert_close(p[0, 0, 5, 0], video[0, 0, 0, 2:6, 4:8])  # row 1, col 2


def test_jitter_full_scale_is_identity():
    p = torch.randn(5, 3, 8, 8)
    out = jitter_patches(p, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    torch.testing.assert_close(out, p, atol=1e-5, rtol=0)


def test_crw_loss_falls_when_overfitting_one_clip():
    torch.manual_seed(0)
    enc = build_encoder("resnet18", out_layer="layer2")
    model = CRW(enc, patch_size=16, patch_stride=8, temperature=0.1, edge_dropout=0.0, patch_jitter=None)
    g = torch.Generator().manual_seed(0)
    base = torch.rand(1, 3, 40, 40, generator=g)
    # a texture translating by 2 px per frame
    video = torch.stack([torch.roll(base, shifts=(2 * t, 2 * t), dims=(2, 3)) for t in range(4)], dim=1)[:, :, :, 4:36, 4:36]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(25):
        loss, _ = model({"video": video})
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_crw_step_on_cuda_with_a_cuda_generator():
    """The trainer seeds a generator on the model's device; patch jitter and edge dropout must draw from it."""
    dev = torch.device("cuda")
    model = CRW(build_encoder("resnet18"), temperature=0.05, edge_dropout=0.1).to(dev)
    g = torch.Generator(device=dev).manual_seed(0)
    loss, logs = model({"video": torch.randn(2, 4, 3, 128, 128, device=dev)}, generator=g)
    loss.backward()
    assert torch.isfinite(loss) and loss.device.type == "cuda"


def test_walk_is_float32_under_bf16_autocast():
    """The walk (T-1 matrix products and their logs) runs in float32 whatever autocast asks for."""
    q = F.normalize(torch.randn(2, 4, 9, 8, generator=torch.Generator().manual_seed(4)), dim=-1).bfloat16()
    ref, _ = walk_loss(q.float(), temperature=0.05, edge_dropout=0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = walk_loss(q, temperature=0.05, edge_dropout=0.0)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
