"""lbsgd: Accurate, Large Minibatch SGD (Goyal et al., 2017) as a command-line experiment runner.

Modules, one concern each:
  rules        the paper's rules as pure functions (linear scaling, warmup, schedule, Remarks)
  choices      the values of every choice key as Enums (no Hydra: rules and optim import them)
  config       the structured config schema, the keys that do not change the result, validation
  data         the data package; a batch runs one way: source -> sampler -> loader -> engine
    load         load_data: data.name / data.in_memory -> the source
    source       the DataSource protocol, ImageFolder trees, stratified subsets, normalisation
    in_memory    small images decoded once into tensors, pad-and-crop and flip on the device
    digits       scikit-learn's 8x8 digits, in memory
    cifar        torchvision's CIFAR batches read without running their pickles, in memory
    streaming    ImageNet-sized files decoded by loader workers, device prefetch
    transforms   §5.1's crops of one file (reduced-size JPEGs), data.decode=gpu's device decode
    decode       libjpeg-turbo decoding (simplejpeg), PIL where it cannot
    bad_data     broken files: one line naming the file, or data.skip_bad=true to skip and count
    sampling     Remark 4: one shuffle per epoch, this process's share, per-sample seeds (BatchPlan)
    loader       TrainLoader (the plans -> the source's batches) and the val shares
  models       networks and the paper's initialisation
  ghost_bn     BatchNorm over n samples per worker
  optim        parameter groups, PyTorch's SGD, the paper's eq. (10) form, LARS
  engine       one training step (train_step, StepPlan) and evaluation: shared by every command
  parallel     one process, DDP or FSDP2 behind one interface (wrapping, gradient sync, state dicts)
  distributed  torchrun / SLURM process groups, reductions, peer failures, SLURM requeue
  train        the training loop (lbsgd train)
  divergence   the first non-finite loss, found without a per-step host sync
  rundir       the run directory: lock, resume or start, checkpoints, run info, summary
  checkpoint   atomic checkpoints and reading them back
  metrics      metrics.jsonl, TensorBoard, progress
  memory       activation checkpointing per ResNet stage, FSDP2 sharding and full state dicts
  noise_scale  the gradient noise scale B_simple (beyond the paper)
  evaluate     lbsgd eval: checkpoint -> model, BN recompute
  offload      CPU and model offloading (accelerate hooks) for evaluation
  quantize     b-bit affine quantization and integer checkpoints
  quantize_run lbsgd quantize: the table of settings
  int8         real int8 kernels (torchao pt2e + inductor)
  plot         lbsgd plot: the paper's tables and figures from run directories
  errors       one-line user errors and exit statuses
  cli          the `lbsgd` command
"""

__version__ = "0.1.0"
