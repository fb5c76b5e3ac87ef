"""lbsgd: Accurate, Large Minibatch SGD (Goyal et al., 2017) as a command-line experiment runner.

Modules, one concern each:
  rules        the paper's rules as pure functions (linear scaling, warmup, schedule, Remarks)
  config       the structured config schema and its validation
  data         embedded digits, ImageFolder trees, the per-epoch shuffle split among workers
  models       networks and the paper's initialisation
  ghost_bn     BatchNorm over n samples per worker
  optim        parameter groups, PyTorch's SGD and the paper's eq. (10) form
  distributed  torchrun / SLURM process groups and reductions
  train        the training loop
  checkpoint   atomic checkpoints
  metrics      metrics.jsonl, TensorBoard, progress
  cli          the `lbsgd` command
"""

__version__ = "0.1.0"
