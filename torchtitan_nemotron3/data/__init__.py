"""Pretraining data: blends, packed rows and the pretraining dataloader."""
