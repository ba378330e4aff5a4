"""Losses as pure functions with shape docstrings, plus thin ``nn.Module`` wrappers."""

from vidssl.losses.walk import WalkLoss, palindrome_returns, transition_matrices, walk_loss

__all__ = ["WalkLoss", "palindrome_returns", "transition_matrices", "walk_loss"]
