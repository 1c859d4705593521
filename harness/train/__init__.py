"""The one training loop every registry entry shares (and its optimizer, schedule and checkpoints)."""
