"""Everything that has gradients, and the commands that train or evaluate it: model math (plain
torch), data and masking, engines, checkpoints, and one module per stage (prepare, ict, pretrain,
finetune, evaluate). docs/ARCHITECTURE.md maps each module."""
