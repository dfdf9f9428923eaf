"""The optimizer families of a run: optimizers (SGD, ASGD, Adam), the averaging policy (NT-ASGD's
trigger and averager) and the learning-rate schedules. Each is a registered component family
(:data:`~reglm.config.kinds.FAMILIES`) whose configs any code that builds a run configuration
reads, so they live outside the training loop (``reglm.train``)."""
