"""Training stages (pretrain, finetune, distill) on the shared engine."""
