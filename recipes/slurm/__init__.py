"""Slurm launch of ``recipes/train.py``: render an sbatch file from the composed Hydra config.

    python -m recipes.slurm experiment=gpt_175b_p4de trainer.num_nodes=16 [--submit]

See ``recipes/slurm/README.md``; :mod:`recipes.slurm.render` has the logic.
"""

from recipes.slurm.render import SlurmConfigError, SlurmOptions, compose, plan, render

__all__ = ["SlurmConfigError", "SlurmOptions", "compose", "plan", "render"]
