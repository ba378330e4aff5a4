"""Losses as pure functions with shape docstrings, plus thin ``nn.Module`` wrappers."""

from vidssl.losses.contrastive import (CMCLoss, InfoNCELoss, MemoryBank, MemoryBankLoss, MoCoLoss, MoCoQueue, NCELoss,
                                       NPairLoss, NTXentLoss, batch_shuffle, batch_unshuffle, cmc_loss, cmc_scores,
                                       contrastive_logs, estimate_log_normaliser, in_batch_scores, info_nce,
                                       memory_bank_nce, memory_bank_scores, moco_loss, moco_scores, momentum_update,
                                       nce_loss, npair_loss, nt_xent, nt_xent_scores)
from vidssl.losses.distributed import gather_no_grad, gather_with_grad
from vidssl.losses.reconstruction import (colour_nll, colour_nll_log, huber_reconstruction, kmeans,
                                          log_bilinear_upsample, quantise_ab)
from vidssl.losses.cycle import CycleLoss, inlier_score, timecycle_loss, transformed_grid_loss
from vidssl.losses.triplet import BatchHardTripletLoss, batch_hard_triplet, pairwise_distances
from vidssl.losses.walk import WalkLoss, palindrome_returns, transition_matrices, walk_loss

__all__ = ["CycleLoss", "inlier_score", "timecycle_loss", "transformed_grid_loss", "WalkLoss", "colour_nll", "colour_nll_log", "huber_reconstruction", "kmeans", "log_bilinear_upsample",
           "palindrome_returns", "quantise_ab", "transition_matrices", "walk_loss",
           # contrastive (vidssl.losses.contrastive, vidssl.losses.distributed)
           "CMCLoss", "InfoNCELoss", "MemoryBank", "MemoryBankLoss", "MoCoLoss", "MoCoQueue", "NCELoss", "NPairLoss",
           "NTXentLoss", "batch_shuffle", "batch_unshuffle", "cmc_loss", "cmc_scores", "contrastive_logs",
           "estimate_log_normaliser", "gather_no_grad", "gather_with_grad", "in_batch_scores", "info_nce",
           "memory_bank_nce", "memory_bank_scores", "moco_loss", "moco_scores", "momentum_update", "nce_loss",
           "npair_loss", "nt_xent", "nt_xent_scores",
           # triplet (vidssl.losses.triplet)
           "BatchHardTripletLoss", "batch_hard_triplet", "pairwise_distances"]
