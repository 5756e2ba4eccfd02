"""Data: datasets and transforms (digits, ImageFolder, token-labeling targets)."""
