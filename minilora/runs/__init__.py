"""Run plumbing (machinery): run directories, crash-safe checkpoints, atomic files, tensor trees as JSON.

rundir.py: a run's directory, checked and locked; train_state.py: checkpoints a run resumes from;
files.py: atomic writes; tensor_tree.py: nested state split into tensors and JSON."""
from .files import atomic_write, atomic_write_json, atomic_write_text, replace_dir
from .rundir import (LOCK, MARKER, RunDir, RunDirError, RunLockedError, check_run_dir, fingerprint, identity,
                     remove_dead_temps, temp_name)
from .train_state import CheckpointError, RunCheckpoints, TrainingDiverged, find_checkpoint, read_state
