"""Reparam training: one Trainer for every task, on DeepSpeed ZeRO."""
