"""Load and performance tools: the figures in the README come from here."""
