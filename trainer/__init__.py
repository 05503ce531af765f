"""Everything that has gradients: model math (plain torch), data, masking, loops, checkpoints."""
