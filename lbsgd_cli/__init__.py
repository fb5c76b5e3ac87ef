"""lbsgd: Accurate, Large Minibatch SGD (Goyal et al., 2017) as a command-line experiment runner.

Modules, one concern each:
  rules        the paper's rules as pure functions (linear scaling, warmup, schedule, Remarks)
  choices      the values of every choice key as Enums (no Hydra: rules and optim import them)
  config       the structured config schema, the keys that do not change the result, one spelling per value
  validation   early checks of a composed config (signs, ranges, consistency); they read, never rewrite
  source       the DataSource protocol, ImageFolder trees, stratified subsets, normalisation
  data         load_data, embedded digits and small images in memory, the per-epoch shuffle split among workers
  streaming    ImageNet-sized files decoded by workers (reduced-size JPEGs, data.decode=gpu), device prefetch
  models       networks and the paper's initialisation
  ghost_bn     BatchNorm over n samples per worker
  optim        parameter groups, PyTorch's SGD, the paper's eq. (10) form, LARS
  engine       one training step (train_step, StepPlan) and evaluation: shared by every command
  parallel     one process, DDP or FSDP2 behind one interface (wrapping, FSDP2 sharding, gradient sync,
               full state dicts)
  distributed  torchrun / SLURM process groups, reductions, peer failures, SLURM requeue
  train        the training loop (lbsgd train)
  divergence   the first non-finite loss, found without a per-step host sync
  rundir       the run directory: lock, resume or start, checkpoints, run info, summary
  checkpoint   atomic checkpoints and reading them back
  metrics      metrics.jsonl, TensorBoard, peak device memory, progress
  stage_checkpointing  activation checkpointing per ResNet stage (memory.checkpointing), BN statistics kept
  noise_scale  the gradient noise scale B_simple (beyond the paper)
  restore      checkpoint -> model: the network a training or quantized checkpoint holds (eval, quantize)
  evaluate     lbsgd eval: BN recompute, half-precision weights, eval.json
  offload      CPU and model offloading (accelerate hooks) for evaluation
  quantize     b-bit affine quantization: the seminar's formulas, ranges, packing (torch only)
  quantized_checkpoint  the integer checkpoint format (lbsgd-quantized-v1)
  quantize_run lbsgd quantize: the table of settings
  int8         real int8 kernels (torchao pt2e + inductor)
  report       lbsgd plot: the paper's tables and figures from run directories alone (a package:
               runs, studies, tables, figures, command)
  errors       one-line user errors and exit statuses
  cli          the `lbsgd` command
"""

__version__ = "0.1.0"
