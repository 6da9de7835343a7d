"""Evaluation: accuracy under attack, the sanity checks of those figures, and the one report that
training and ``eval.py`` print."""
