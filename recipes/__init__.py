"""Training recipes for lightning-mics, configured by Hydra (``conf/``).

- ``train.py``: the Lightning Trainer entry point (``python recipes/train.py experiment=...``);
  ``build(cfg)`` makes the LightningModule, LightningDataModule and Trainer without launching.
- ``fabric_train.py``: the same configs with a Fabric loop.
- ``config.py``: config checks (``validate_config``) and the run plan.
- ``gpt.py``, ``bert.py``: the models; ``lit.py``: their LightningModule.
- ``data.py``: local text (tokenized once, memory-mapped) and synthetic data;
  ``datamodules.py``: their LightningDataModules.
- ``callbacks.py``, ``strategies.py``: throughput/MFU and run summary; the strategy group.
- ``slurm/``, ``pcluster/``: launching on Slurm and AWS ParallelCluster.
"""
