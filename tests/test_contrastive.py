"""Contrastive losses (vidssl.losses.contrastive): slow loop references, closed forms, numerics, MoCo queue and memory
bank state, bad input, and a 2-process gloo run against the single-process loss over the concatenated batch."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from vidssl.losses import (CMCLoss, InfoNCELoss, MemoryBank, MemoryBankLoss, MoCoLoss, MoCoQueue, NCELoss, NPairLoss,
                           NTXentLoss, batch_shuffle, batch_unshuffle, cmc_loss, estimate_log_normaliser,
                           gather_no_grad, gather_with_grad, in_batch_scores, info_nce, memory_bank_nce,
                           memory_bank_scores, moco_loss, momentum_update, nce_loss, npair_loss, nt_xent)

from contrastive_ddp_worker import BATCH, CASES, WORLD, global_inputs  # tests/contrastive_ddp_worker.py

pytestmark = pytest.mark.usefixtures("one_thread")

WORKER = Path(__file__).with_name("contrastive_ddp_worker.py")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def unit(x):
    """Rows of x as float64 unit vectors (Python lists)."""
    x = x.double()
    return [(r / r.norm()).tolist() for r in x]


def dot(u, v):
    return sum(a * b for a, b in zip(u, v))


def xent_row(row, positives, candidates):
    """-log(sum_pos exp / sum_candidates exp) of one row, naive float64."""
    return -math.log(sum(math.exp(row[j]) for j in positives) / sum(math.exp(row[j]) for j in candidates))


# --------------------------------------------------------------------------------------------------- InfoNCE


def test_info_nce_matches_loop():
    B, N = 4, 7
    s = torch.randn(B, N, generator=gen(0)) * 3
    S = s.double().tolist()
    every = range(N)
    idx = torch.tensor([0, 3, 6, 2])
    loss, n = info_nce(s, idx)
    assert n == N
    assert float(loss) == pytest.approx(sum(xent_row(S[i], [int(idx[i])], every) for i in range(B)) / B, rel=1e-5)
    loss0, _ = info_nce(s, 0)
    assert float(loss0) == pytest.approx(sum(xent_row(S[i], [0], every) for i in range(B)) / B, rel=1e-5)
    diag, _ = info_nce(s)  # default target: the diagonal
    assert float(diag) == pytest.approx(sum(xent_row(S[i], [i], every) for i in range(B)) / B, rel=1e-5)

    valid = torch.rand(B, N, generator=gen(1)) > 0.4
    valid[torch.arange(B), idx] = True
    lv, nv = info_nce(s, idx, valid=valid)
    cands = [[j for j in every if valid[i, j]] for i in range(B)]
    assert float(lv) == pytest.approx(sum(xent_row(S[i], [int(idx[i])], cands[i]) for i in range(B)) / B, rel=1e-5)
    assert nv == pytest.approx(math.exp(sum(math.log(len(c)) for c in cands) / B))

    pos = torch.zeros(B, N, dtype=torch.bool)
    pos[0, [1, 2]] = pos[1, 4] = pos[2, [0, 5, 6]] = pos[3, 3] = True
    lp, _ = info_nce(s, pos)
    ref = sum(xent_row(S[i], pos[i].nonzero()[:, 0].tolist(), every) for i in range(B)) / B
    assert float(lp) == pytest.approx(ref, rel=1e-5)


def test_uniform_scores_give_exactly_log_n():
    for B, N in [(1, 1), (3, 3), (5, 17), (8, 1536)]:
        loss, n = info_nce(torch.full((B, N), 2.5))
        assert n == N
        assert float(loss) == pytest.approx(math.log(N), abs=1e-6)
    valid = torch.ones(3, 6, dtype=torch.bool)
    valid[0, 4:] = valid[1, 5] = False  # 4, 5, 6 candidates
    loss, n = info_nce(torch.zeros(3, 6), valid=valid)
    assert float(loss) == pytest.approx((math.log(4) + math.log(5) + math.log(6)) / 3, abs=1e-6)
    assert math.log(n) - float(loss) == pytest.approx(0.0, abs=1e-6)  # chance level: no nats captured


def test_confident_correct_positive_gives_zero_loss():
    loss, logs = InfoNCELoss()(40.0 * torch.eye(6, 9))
    assert float(loss) < 1e-12
    assert logs["top1"] == 1.0 and logs["mi_bound_nats"] == pytest.approx(math.log(9))
    assert set(logs) == {"loss", "mi_bound_nats", "top1", "num_candidates"}
    wrong, logs = InfoNCELoss()(40.0 * torch.eye(6, 9), 8)
    assert float(wrong) == pytest.approx(40.0, rel=1e-4) and logs["top1"] == 0.0
    z = torch.eye(4, 8)  # orthogonal samples, identical views
    assert float(nt_xent(z, z, temperature=0.01)[0]) < 1e-12


def test_in_batch_scores_is_the_diagonal_of_a_dense_matrix():
    q, k = torch.randn(3, 5, generator=gen(2)), torch.randn(3, 5, generator=gen(3))
    scores, target = in_batch_scores(q, k, temperature=0.5, normalize=True)
    Q, K = unit(q), unit(k)
    assert torch.equal(target, torch.arange(3))
    for i in range(3):
        for j in range(3):
            assert float(scores[i, j]) == pytest.approx(dot(Q[i], K[j]) / 0.5, rel=1e-5)
    x = torch.randn(2, 3)
    assert gather_with_grad(x) is x and torch.equal(gather_no_grad(x), x)  # one process: identities


# ---------------------------------------------------------------------------------------------------- NT-Xent


def ref_nt_xent(z_a, z_b, tau):
    """SimCLR's Algorithm 1, one pair at a time."""
    z = unit(torch.cat([z_a, z_b]))
    B = z_a.shape[0]

    def ell(i, j):
        return -math.log(math.exp(dot(z[i], z[j]) / tau) /
                         sum(math.exp(dot(z[i], z[k]) / tau) for k in range(2 * B) if k != i))
    return sum(ell(k, B + k) + ell(B + k, k) for k in range(B)) / (2 * B)


@pytest.mark.parametrize("B,D,tau", [(1, 2, 0.1), (3, 16, 1.0), (5, 4, 0.5)])
def test_nt_xent_matches_loop(B, D, tau):
    z_a, z_b = torch.randn(B, D, generator=gen(B)), torch.randn(B, D, generator=gen(B + 10))
    loss, n = nt_xent(z_a, z_b, temperature=tau)
    assert n == 2 * B - 1
    assert float(loss) == pytest.approx(ref_nt_xent(z_a, z_b, tau), rel=1e-5)
    assert float(nt_xent(z_b, z_a, temperature=tau)[0]) == pytest.approx(float(loss), rel=1e-6)  # symmetric
    _, logs = NTXentLoss(temperature=tau)(z_a, z_b)
    assert logs["loss"] == pytest.approx(float(loss)) and logs["num_candidates"] == 2 * B - 1


def test_nt_xent_collinear_embeddings_give_log_2b_minus_1():
    z = torch.ones(4, 3)
    assert float(nt_xent(z, 2 * z, temperature=0.2)[0]) == pytest.approx(math.log(7), abs=1e-6)


# ------------------------------------------------------------------------------------------------------- NCE


def ref_nce(pos, noise, log_pn_pos, log_pn_noise, log_z):
    """Gutmann & Hyvarinen's J with h = exp(s) / (exp(s) + k Pn Z), naive float64."""
    B, k = len(noise), len(noise[0])
    total = 0.0
    for b in range(B):
        h = math.exp(pos[b]) / (math.exp(pos[b]) + k * math.exp(log_pn_pos[b]) * math.exp(log_z))
        total -= math.log(h)
        for j in range(k):
            hn = math.exp(noise[b][j]) / (math.exp(noise[b][j]) + k * math.exp(log_pn_noise[b][j]) * math.exp(log_z))
            total -= math.log(1 - hn)
    return total / B


def test_nce_matches_loop_and_closed_form():
    B, k = 4, 6
    pos, noise = torch.randn(B, generator=gen(4)), torch.randn(B, k, generator=gen(5))
    lp_pos, lp_noise = -3 * torch.rand(B, generator=gen(6)), -3 * torch.rand(B, k, generator=gen(7))
    loss = nce_loss(pos, noise, lp_pos, lp_noise, log_normaliser=0.7)
    ref = ref_nce(pos.tolist(), noise.tolist(), lp_pos.tolist(), lp_noise.tolist(), 0.7)
    assert float(loss) == pytest.approx(ref, rel=1e-5)
    # G = 0 everywhere (s = log Z + log(k Pn)): every term is log 2
    log_pn = -math.log(100)
    s = torch.full((B,), 0.7 + math.log(k) + log_pn)
    assert float(nce_loss(s, s[:, None].expand(B, k), log_pn, log_pn, log_normaliser=0.7)) == \
        pytest.approx((1 + k) * math.log(2), rel=1e-6)


def test_nce_gradient_is_the_analytic_one():
    pos = torch.tensor([1.5, -0.5], requires_grad=True)
    noise = torch.tensor([[0.2, -1.0, 2.0], [0.0, 0.5, -2.0]], requires_grad=True)
    log_pn, log_z, k, B = math.log(0.05), 1.2, 3, 2
    nce_loss(pos, noise, log_pn, log_pn, log_normaliser=log_z).backward()
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    shift = math.log(k * math.exp(log_pn) * math.exp(log_z))
    for b in range(B):
        assert float(pos.grad[b]) == pytest.approx(-(1 - sig(pos[b].item() - shift)) / B, rel=1e-5)
        for j in range(k):
            assert float(noise.grad[b, j]) == pytest.approx(sig(noise[b, j].item() - shift) / B, rel=1e-5)
    loss, logs = NCELoss(log_normaliser=log_z)(pos, noise, log_pn, log_pn)
    assert logs["p_data_pos"] == pytest.approx(sum(sig(p - shift) for p in pos.tolist()) / B, rel=1e-5)


# ------------------------------------------------------------------------------------------------------ MoCo


def test_moco_loss_matches_loop():
    B, D, K, T = 3, 6, 8, 0.07
    q, k = torch.randn(B, D, generator=gen(8)), torch.randn(B, D, generator=gen(9))
    queue = F.normalize(torch.randn(K, D, generator=gen(10)), dim=1)
    loss, n = moco_loss(q, k, queue, temperature=T)
    Q, Kk, QQ = unit(q), unit(k), queue.double().tolist()
    ref = 0.0
    for i in range(B):
        row = [dot(Q[i], Kk[i]) / T] + [dot(Q[i], QQ[j]) / T for j in range(K)]
        ref += xent_row(row, [0], range(K + 1))
    assert n == K + 1 and float(loss) == pytest.approx(ref / B, rel=1e-5)


def test_moco_queue_fifo_order_and_pointer_wraparound():
    queue = MoCoQueue(dim=2, queue_size=6, generator=gen(0))
    init = queue.queue.clone()
    assert torch.allclose(init.norm(dim=1), torch.ones(6))
    batches = [torch.full((2, 2), float(i)) for i in range(1, 5)]
    ptrs = []
    for keys in batches:
        queue.dequeue_and_enqueue(keys)
        ptrs.append(int(queue.queue_ptr))
    assert ptrs == [2, 4, 0, 2]
    # slots 0-1: batch 4 (overwrote batch 1 after the wrap), 2-3: batch 2, 4-5: batch 3
    assert queue.queue[:, 0].tolist() == [4, 4, 2, 2, 3, 3]
    with pytest.raises(ValueError, match="queue_size=6"):
        queue.dequeue_and_enqueue(torch.ones(4, 2))
    with pytest.raises(ValueError, match="queue_size=5"):
        MoCoQueue(dim=2, queue_size=5).dequeue_and_enqueue(torch.ones(2, 2))


def test_momentum_update_values():
    torch.manual_seed(0)
    q_enc, k_enc = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), nn.Sequential(nn.Linear(3, 4),
                                                                                    nn.BatchNorm1d(4))
    q_enc(torch.randn(5, 3))  # moves the query encoder's running statistics
    before = {n: p.clone() for n, p in k_enc.named_parameters()}
    bn_before = k_enc[1].running_mean.clone()
    momentum_update(k_enc, q_enc, 0.9, copy_buffers=False)
    for n, p in k_enc.named_parameters():
        assert torch.allclose(p, 0.9 * before[n] + 0.1 * dict(q_enc.named_parameters())[n])
        assert p.grad is None
    assert torch.equal(k_enc[1].running_mean, bn_before)
    momentum_update(k_enc, q_enc, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(k_enc.state_dict().values(), q_enc.state_dict().values()))
    with pytest.raises(ValueError, match="m must"):
        momentum_update(k_enc, q_enc, 1.5)
    with pytest.raises(ValueError, match="names or shapes"):
        momentum_update(nn.Linear(3, 5), nn.Linear(3, 4), 0.9)


def test_moco_module_scores_then_enqueues_without_key_gradients():
    loss_fn = MoCoLoss(dim=4, queue_size=6, temperature=0.2, generator=gen(0))
    q = torch.randn(3, 4, generator=gen(1), requires_grad=True)
    k = torch.randn(3, 4, generator=gen(2), requires_grad=True)
    ref, _ = moco_loss(q, k, loss_fn.queue.queue.clone(), temperature=0.2)
    loss, logs = loss_fn(q, k)
    loss.backward()  # the enqueue must not break the graph
    assert float(loss.detach()) == pytest.approx(float(ref.detach())) and logs["num_candidates"] == 7
    assert k.grad is None and q.grad is not None
    assert torch.allclose(loss_fn.queue.queue[:3], F.normalize(k.detach(), dim=1)) and int(loss_fn.queue.queue_ptr) == 3
    loss_fn.eval()
    loss_fn(q, k)
    assert int(loss_fn.queue.queue_ptr) == 3  # no enqueue outside training


def test_batch_shuffle_single_process_is_an_invertible_permutation():
    x = torch.arange(8.0)[:, None].repeat(1, 3)
    shuffled, idx_unshuffle = batch_shuffle(x, generator=gen(0))
    assert not torch.equal(shuffled, x) and sorted(shuffled[:, 0].tolist()) == x[:, 0].tolist()
    assert torch.equal(batch_unshuffle(shuffled, idx_unshuffle), x)


# ----------------------------------------------------------------------------------------------- memory bank


def test_memory_bank_proximal_update_rule():
    bank = MemoryBank(6, 3, momentum=0.25, generator=gen(0))
    old = bank.bank.clone()
    idx, f = torch.tensor([4, 1]), F.normalize(torch.randn(2, 3, generator=gen(1)), dim=1)
    bank.update(idx, f)
    for row, i in enumerate(idx.tolist()):
        mix = [0.25 * a + 0.75 * b for a, b in zip(old[i].tolist(), f[row].tolist())]
        norm = math.sqrt(sum(v * v for v in mix))
        assert bank.bank[i].tolist() == pytest.approx([v / norm for v in mix], rel=1e-5)
    untouched = [0, 2, 3, 5]
    assert torch.equal(bank.bank[untouched], old[untouched])


def test_memory_bank_scores_full_and_sampled():
    N, D, B, tau = 9, 4, 3, 0.07
    bank = F.normalize(torch.randn(N, D, generator=gen(0)), dim=1)
    f, idx = torch.randn(B, D, generator=gen(1)), torch.tensor([2, 0, 8])
    scores, target = memory_bank_scores(f, bank, idx, temperature=tau)
    Fu, V = unit(f), bank.double().tolist()
    ref = sum(xent_row([dot(Fu[i], V[j]) / tau for j in range(N)], [int(idx[i])], range(N)) for i in range(B)) / B
    assert float(info_nce(scores, target)[0]) == pytest.approx(ref, rel=1e-5)

    sampled, t0 = memory_bank_scores(f, bank, idx, temperature=tau, num_negatives=N - 1, generator=gen(2))
    assert t0 == 0 and sampled.shape == (B, N)
    full = scores
    for i in range(B):
        assert float(sampled[i, 0]) == pytest.approx(float(full[i, idx[i]]), rel=1e-6)  # the positive first
        others = {round(float(full[i, j]), 4) for j in range(N) if j != idx[i]}
        assert {round(float(v), 4) for v in sampled[i, 1:]} <= others  # negatives are never the positive
    with pytest.raises(ValueError, match="num_negatives=9"):
        memory_bank_scores(f, bank, idx, num_negatives=N)


def test_memory_bank_nce_matches_loop_and_normaliser_estimate():
    N, D, B, m, tau = 50, 4, 3, 5, 0.5
    bank = F.normalize(torch.randn(N, D, generator=gen(0)), dim=1)
    f, idx = torch.randn(B, D, generator=gen(1)), torch.tensor([3, 7, 49])
    scores, _ = memory_bank_scores(f, bank, idx, temperature=tau, num_negatives=m, generator=gen(2))
    log_z = estimate_log_normaliser(scores, N)
    assert log_z == pytest.approx(math.log(N * sum(math.exp(v) for v in scores.flatten().tolist()) / scores.numel()))
    loss = memory_bank_nce(f, bank, idx, log_normaliser=log_z, num_negatives=m, temperature=tau, generator=gen(2))
    S = scores.double().tolist()
    lp = [[-math.log(N)] * m for _ in range(B)]
    ref = ref_nce([r[0] for r in S], [r[1:] for r in S], [-math.log(N)] * B, lp, log_z)
    assert float(loss) == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("objective,num_negatives", [("softmax", None), ("softmax", 4), ("nce", 4)])
def test_memory_bank_loss_module_updates_only_the_batch_entries(objective, num_negatives):
    loss_fn = MemoryBankLoss(10, 4, objective=objective, num_negatives=num_negatives, generator=gen(0))
    old = loss_fn.memory.bank.clone()
    f, idx = torch.randn(3, 4, generator=gen(1), requires_grad=True), torch.tensor([1, 5, 7])
    loss, logs = loss_fn(f, idx)
    loss.backward()  # after the bank update
    assert f.grad is not None and math.isfinite(logs["loss"])
    changed = (loss_fn.memory.bank != old).any(dim=1).nonzero()[:, 0].tolist()
    assert changed == [1, 5, 7]
    if objective == "nce":
        first = logs["log_normaliser"]
        assert loss_fn(f, idx)[1]["log_normaliser"] == first  # estimated once, then frozen
    with pytest.raises(ValueError, match="num_negatives"):
        MemoryBankLoss(10, 4, objective="nce")


# ------------------------------------------------------------------------------------------------ N-pair, CMC


def test_npair_matches_loop():
    B, D, lam = 4, 5, 0.01
    a, p = torch.randn(B, D, generator=gen(0)), torch.randn(B, D, generator=gen(1))
    A, P = a.double().tolist(), p.double().tolist()
    ref = sum(math.log(1 + sum(math.exp(dot(A[i], P[j]) - dot(A[i], P[i])) for j in range(B) if j != i))
              for i in range(B)) / B
    reg = 0.25 * lam * (sum(dot(r, r) for r in A) / B + sum(dot(r, r) for r in P) / B)
    loss, n = npair_loss(a, p, l2_reg=lam)
    assert n == B and float(loss) == pytest.approx(ref + reg, rel=1e-5)
    assert float(npair_loss(a, p, l2_reg=0.0)[0]) == pytest.approx(ref, rel=1e-5)
    _, logs = NPairLoss(l2_reg=lam)(a, p)
    assert logs["l2"] == pytest.approx(reg, rel=1e-5) and logs["loss"] == pytest.approx(ref + reg, rel=1e-5)


def test_cmc_matches_loop_in_batch_and_with_banks():
    B, D, tau = 4, 6, 0.3
    z1, z2 = torch.randn(B, D, generator=gen(0)), torch.randn(B, D, generator=gen(1))
    U1, U2 = unit(z1), unit(z2)

    def direction(anchor, cands, positive):  # mean over rows of -log softmax at the positive
        return sum(xent_row([dot(anchor[i], c) / tau for c in cands], [positive[i]], range(len(cands)))
                   for i in range(B)) / B
    loss, n = cmc_loss(z1, z2, temperature=tau)
    assert n == B
    assert float(loss) == pytest.approx(direction(U1, U2, range(B)) + direction(U2, U1, range(B)), rel=1e-5)

    bank1, bank2 = (F.normalize(torch.randn(7, D, generator=gen(s)), dim=1) for s in (2, 3))
    idx = torch.tensor([6, 0, 3, 2])
    loss_b, n_b = cmc_loss(z1, z2, temperature=tau, banks=(bank1, bank2), indices=idx)
    ref = direction(U1, bank2.double().tolist(), idx.tolist()) + direction(U2, bank1.double().tolist(), idx.tolist())
    assert n_b == 7 and float(loss_b) == pytest.approx(ref, rel=1e-5)

    module = CMCLoss(temperature=tau, bank_size=7, dim=D, generator=gen(4))
    old = [b.bank.clone() for b in module.banks]
    loss_m, logs = module(z1.requires_grad_(), z2, idx)
    loss_m.backward()
    assert logs["loss"] == pytest.approx(logs["loss_12"] + logs["loss_21"])
    assert all((b.bank != o).any(dim=1).sum() == B for b, o in zip(module.banks, old))
    with pytest.raises(ValueError, match="indices"):
        cmc_loss(z1, z2, banks=(bank1, bank2))


# ---------------------------------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("name", ["nt_xent", "info_nce", "moco", "npair", "cmc", "bank", "nce"])
def test_bf16_under_autocast_gives_the_fp32_loss(name):
    """Scores are computed in float32 inside: a bf16 similarity matmul would be off by ~1e-3 relative."""
    za, zb = (torch.randn(6, 32, generator=gen(s)).bfloat16() for s in (0, 1))
    bank = F.normalize(torch.randn(12, 32, generator=gen(2)), dim=1)
    idx = torch.arange(6)
    fns = {"nt_xent": lambda a, b: nt_xent(a, b, temperature=0.07)[0],
           "info_nce": lambda a, b: info_nce(*in_batch_scores(a, b, temperature=0.05, normalize=True))[0],
           "moco": lambda a, b: moco_loss(a, b, bank, temperature=0.07)[0],
           "npair": lambda a, b: npair_loss(a, b)[0],
           "cmc": lambda a, b: cmc_loss(a, b)[0],
           "bank": lambda a, b: info_nce(*memory_bank_scores(a, bank, idx))[0],
           "nce": lambda a, b: nce_loss(a[:, 0], a[:, 1:6], -3.0, -3.0, log_normaliser=-2.0)}  # a: scores here
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = fns[name](za, zb)
    ref = fns[name](za.float(), zb.float())
    assert low.dtype == torch.float32
    assert float(low) == pytest.approx(float(ref), rel=1e-5, abs=1e-6)


def test_large_logits_stay_finite():
    z = F.normalize(torch.randn(4, 8, generator=gen(0)), dim=1)
    loss, _ = nt_xent(z, z, temperature=1e-3)  # logits up to 1000: exp would overflow
    assert math.isfinite(float(loss))


def test_bad_input_names_the_argument():
    s = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="valid excludes"):
        info_nce(s, torch.tensor([0, 1]), valid=torch.tensor([[False, True, True], [True, True, True]]))
    with pytest.raises(ValueError, match="target=3"):
        info_nce(s, 3)
    with pytest.raises(ValueError, match="noise_scores"):
        nce_loss(torch.zeros(2), torch.zeros(3, 4), 0.0, 0.0)
    with pytest.raises(ValueError, match="z_a and z_b"):
        nt_xent(torch.zeros(2, 3), torch.zeros(3, 3))


# -------------------------------------------------------------------------------------------------------- DDP


def test_two_gloo_processes_match_one_process_over_the_concatenated_batch(tmp_path):
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    res = subprocess.run([sys.executable, str(WORKER), str(tmp_path)], env={**env, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    inputs = global_inputs()
    for name, loss_fn in CASES.items():
        w = inputs["w"].clone().requires_grad_()
        x_a, x_b = inputs["x_a"].clone().requires_grad_(), inputs["x_b"].clone().requires_grad_()
        loss = loss_fn(x_a @ w, x_b @ w, False)  # one process, the whole batch
        loss.backward()
        for r, out in enumerate(ranks):
            rows = slice(r * BATCH, (r + 1) * BATCH)
            torch.testing.assert_close(out[name]["loss"], loss.detach(), msg=name)
            torch.testing.assert_close(out[name]["w_grad"], w.grad, msg=name)
            # a rank's input gradient sums every rank's loss; DDP's averaging divides by the world size
            torch.testing.assert_close(out[name]["x_a_grad"] / WORLD, x_a.grad[rows], msg=name)
            torch.testing.assert_close(out[name]["x_b_grad"] / WORLD, x_b.grad[rows], msg=name)

    keys = F.normalize(inputs["x_a"][:, :4], dim=1)  # both ranks' keys, rank order
    queue = MoCoQueue(4, 4 * WORLD * BATCH, generator=gen(1))
    for _ in range(5):
        queue.dequeue_and_enqueue(keys)
    bank = MemoryBank(10, 4, momentum=0.3, generator=gen(2))
    bank.update(inputs["bank_idx"], keys)
    states = [out["state"] for out in ranks]
    for r, st in enumerate(states):
        torch.testing.assert_close(st["queue"], queue.queue)
        assert int(st["queue_ptr"]) == int(queue.queue_ptr) == WORLD * BATCH
        torch.testing.assert_close(st["bank"], bank.bank)
        torch.testing.assert_close(st["unshuffled"], inputs["x_a"][r * BATCH:(r + 1) * BATCH])
    assert torch.equal(states[0]["idx_unshuffle"], states[1]["idx_unshuffle"])  # one permutation, from rank 0
    shuffled = torch.cat([st["shuffled"] for st in states])
    assert torch.equal(shuffled[states[0]["idx_unshuffle"]], inputs["x_a"])  # a permutation of the global batch
    assert not torch.equal(states[0]["shuffled"], inputs["x_a"][:BATCH])
