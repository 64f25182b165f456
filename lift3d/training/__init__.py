"""Training: one Accelerate loop (``loop``, ``train(cfg)``) for every stage in
``stages``, configured by ``config``, with pickle-free state
(``state``) in a run folder that belongs to one run (``checkpoints``)."""
