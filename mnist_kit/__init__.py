"""The machinery around the lesson in lightning_mnist.py, one module per concern; none imports the lesson.

- data: MNIST held in memory as tensors, its loaders, and the checks of its files
- digits: your own pictures of digits, prepared as MNIST's were (--predict, prepare_digit)
- pictures: TensorBoard's pictures (ValidationPictures, the learning-rate finder's curve)
- checkpoints: checkpoints written whole (AtomicCheckpointIO), the best found by what each stores,
  a continued run's state restored wherever its folder has moved (RunCheckpoint)
- stopping: the callbacks that stop a run (StopOnSignal, StopWhenDiverged)
- signals: the stop signals and Stopped
- runs: a run's folder, its model's arguments, its Trainer's set-up checks, its progress bar
- lr_finder: --lr-find
- report: the results, and where a stop signal stopped a run
- command_line: main(), and its boundary: one `error:` line for a mistake, a report for a stop
- flags: the command line's flags and their checks (imports no torch)
- files, errors: reading the user's files safely, and the one-line error (import no torch)
"""
