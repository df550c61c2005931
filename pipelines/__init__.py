"""Entry points: the ``recvae`` command, experiments, tuning and the nightly retrain."""
