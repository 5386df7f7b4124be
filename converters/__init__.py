"""Readers of foreign checkpoint formats that write Flax checkpoints."""
