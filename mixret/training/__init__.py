"""Training: the loop every trainer runs on, checkpoints, and the trainers (pretrain and its objectives, finetune,
the matcher, the sentence-transformers baseline). Import its modules by their path (mixret.training.finetune, ...)."""
