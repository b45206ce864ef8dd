"""Training for distillation: loss terms (`losses`), the objective (`objective`), data (`data`) and
a plain PyTorch loop with DDP, exact resume and metrics (`trainer`). The `distill` pass
(`passes/distill.py`) and `moeconv distill` are built on these."""
from moeconv.train.losses import (ce_loss, hidden_mse, kl_loss, load_balance_loss, router_kl, router_topk_ce,
                                  z_loss)
from moeconv.train.objective import DistillObjective, LossWeights, ObjectiveSpec
from moeconv.train.trainer import DistInfo, StepEvent, TrainConfig, Trainer, TrainResult, init_distributed

__all__ = ["ce_loss", "hidden_mse", "kl_loss", "load_balance_loss", "router_kl", "router_topk_ce", "z_loss",
           "DistillObjective", "LossWeights", "ObjectiveSpec", "DistInfo", "StepEvent", "TrainConfig", "Trainer",
           "TrainResult", "init_distributed"]
