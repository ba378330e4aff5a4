"""Losses as pure functions with shape docstrings, plus thin ``nn.Module`` wrappers."""

from vidssl.losses.reconstruction import (colour_nll, colour_nll_log, huber_reconstruction, kmeans,
                                          log_bilinear_upsample, quantise_ab)
from vidssl.losses.walk import WalkLoss, palindrome_returns, transition_matrices, walk_loss

__all__ = ["WalkLoss", "colour_nll", "colour_nll_log", "huber_reconstruction", "kmeans", "log_bilinear_upsample",
           "palindrome_returns", "quantise_ab", "transition_matrices", "walk_loss"]
