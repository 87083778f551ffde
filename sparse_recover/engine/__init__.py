"""The stage engines between the commands and the math.

`stageio` reads and writes a run directory's stages (checkpoints, masks, calibration windows, logs);
`prune`, `dsnot`, `finetune`, `merge`, `evaluate` and `audit` compute one stage each from typed
configs. Commands validate, ask `RunDir.guard` whether to compute, and call one engine; scripts and
tests call the engines directly. The math (pruning/, refine/, adapters/, sparsity/) never sees a run
directory.
"""
