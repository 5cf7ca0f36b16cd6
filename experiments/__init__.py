"""The experiments: one module per experiment, run from the repository root as

    python -m experiments.mqar --tiny          # (see each module's docstring)

and the pieces they share, one concept each: `runtime` (compile cache, stack dump on SIGTERM),
`windows` (token streams and their batches), `scoring` (loss and accuracy on fixed batches),
`task_models` (one model per mixer on a synthetic task), `gpu_lock` (one process at a time on a
shared GPU), `stats` (power-law fit, mean and std), `report` (environment record and result
files under `experiments/results/<experiment>/`), `paper` (the paper's numbers), `flags` (the
common flags). Training is the library's: `carve_jax.train.batch_loop`.
"""
