"""Pruning and quantization: the stages (ADMM, gradual, retrain, quantize), the learned masks of
HYDRA and HARP, the per-layer allocation of a target, quantization levels, and the plan of a
run's stages."""
