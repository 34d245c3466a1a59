"""Franca: nested Matryoshka clustering for visual representation learning."""
