"""lbsgd: Accurate, Large Minibatch SGD (Goyal et al., 2017) as a command-line experiment runner.

The module map, the one place it is kept (docs/layout.md links here for the rest of the repository's layout).
Modules, one concern each, with the paper's sections they implement in brackets:
  rules           the paper's rules as pure functions: linear scaling, warmup, step schedule, Remarks 2-4
                  (peak_lr, lr_at)                                                       [§2.1, §2.2, §3, §5.1]
  choices         the values of every choice key as Enums (no Hydra: rules and optim import them)
  config          the structured config schema, the keys that do not change the result (no_effect), one
                  spelling per value (normalise_train, normalise_quantize)
  validation      early checks of a composed config (signs, ranges, consistency); they read, never rewrite
  device_defaults `auto` precision, channels_last and deterministic: the device's fast or bit-exact mode,
                  resolved once when a command starts
  data            the data package (its docstring maps its modules): a batch runs one way, source -> sampler
                  -> loader -> engine; load_data, in-memory / streaming / CIFAR / digits sources, the per-epoch
                  shuffle split among workers (TrainLoader), decoding, bad files          [§3 Remark 4, §5.1]
  models          networks and the paper's initialisation: He, FC ~ N(0, 0.01^2), zero-gamma              [§5.1]
  ghost_bn        BatchNorm over each worker's n samples (eager kernels, and the formula torch.compile traces)
                                                                                                          [§2.3]
  optim           parameter groups, PyTorch's SGD, the paper's eq. (10) form, LARS           [§3 Remark 2, §5.1]
  engine          one SGD step over passes of workers (train_step, StepPlan) and evaluation (evaluate): shared
                  by every command                                                              [§2, §2.3, §3]
  parallel        one process, DDP or FSDP2 behind one interface: wrapping, FSDP2 sharding, gradient sync of
                  the last pass, full state dicts, val shares                                         [§3, §4]
  distributed     torchrun / SLURM process groups, reductions, peer failures, SLURM requeue                [§4]
  train           the training loop (lbsgd train): train(), one epoch                                      [§2]
  preemption      signals turned into a checkpoint at an iteration boundary, caught from the process's first
                  line (a preemption while starting, rendezvousing or training)
  divergence      the first non-finite loss: a device flag read where the loop syncs anyway, no per-step host
                  sync                                                                                    [§2.2]
  rundir          the run directory: lock, resume or start (RunState), config difference, run info, summary
  checkpoint      atomic checkpoints and reading them back (weights_only=True: data only), a full disk
  metrics         metrics.jsonl, TensorBoard, peak device memory, progress
  stage_checkpointing  activation checkpointing per ResNet stage (memory.checkpointing), BN statistics kept
  noise_scale     the gradient noise scale B_simple                                            [beyond the paper]
  restore         checkpoint -> model: the network a training or quantized checkpoint holds (eval, quantize)
  evaluate        lbsgd eval: BN recompute, half-precision weights, eval.json                             [§5.3]
  offload         CPU and model offloading (accelerate hooks) for evaluation                        [the seminar]
  quantize        b-bit affine quantization: the seminar's formulas, ranges, packing (torch only)   [the seminar]
  quantized_checkpoint  the integer checkpoint format (lbsgd-quantized-v1)
  quantize_run    lbsgd quantize: the table of settings
  int8            real int8 kernels (torchao pt2e + inductor)
  report          lbsgd plot: the paper's tables and figures from run directories alone (a package: runs,
                  studies, tables, figures, command)                      [§5.2-5.3, Tables 1-2, Figs. 1-4]
  plan            lbsgd plan: time per iteration (compute, exposed allreduce, loader wait) and time to train
                  on 8..N GPUs from an alpha-beta model, checked against published runs        [§4, §5.5, Figs. 7-8]
  sweep           every point of `lbsgd train -m` composed, validated and checked against its data set before
                  any runs: a bad point refuses the whole sweep in one line
  output_dir      a refused command leaves nothing behind: the folders on the way to its output that it made
  errors          one-line user errors and exit statuses
  cli             the `lbsgd` command
"""

__version__ = "0.1.0"
