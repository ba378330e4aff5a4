"""Losses as pure functions with shape docstrings, plus thin ``nn.Module`` wrappers."""

from vidssl.losses.reconstruction import (colour_nll, colour_nll_log, huber_reconstruction, kmeans,
                                          log_bilinear_upsample, quantise_ab)
from vidssl.losses.cycle import CycleLoss, inlier_score, timecycle_loss, transformed_grid_loss
from vidssl.losses.walk import WalkLoss, palindrome_returns, transition_matrices, walk_loss

__all__ = ["CycleLoss", "inlier_score", "timecycle_loss", "transformed_grid_loss", "WalkLoss", "colour_nll", "colour_nll_log", "huber_reconstruction", "kmeans", "log_bilinear_upsample",
           "palindrome_returns", "quantise_ab", "transition_matrices", "walk_loss"]
