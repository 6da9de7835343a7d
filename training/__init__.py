"""Training: the loop that runs a stage, its state and schedule, the training methods (natural, PGD,
FGSM-RS, free) and their losses (CE, TRADES, MART), the run folder, TensorBoard, multi-process
helpers, and the training command line with its resume plan (``training.command``)."""
