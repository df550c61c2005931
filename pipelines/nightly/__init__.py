"""The nightly retraining job (``recvae retrain``): validate new partitions, train a challenger,
compare it with the champion on the same fresh split, promote it only if it is not worse, and
notify the serving layer.

Modules: ``settings`` (the TOML config), ``lake`` (partitions and lazy scans), ``checks``
(partition validation), ``dataset`` (training matrix and split), ``warm_start``, ``gate``
(evaluation and decision), ``registry`` (MLflow), ``notify`` (serving reload), ``lock``
(single run), ``job`` (the run itself) and ``simulate`` (a replay of ml-latest-small).
Nothing heavy is imported here, so ``pipelines.nightly.lock`` stays cheap to import.
"""
