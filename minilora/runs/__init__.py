"""Run plumbing (machinery): run directories, crash-safe checkpoints, atomic files, tensor trees as JSON.

rundir.py: a run's directory, checked and locked, and what minilora may replace in it; identity.py: what a
resumed run may not change; train_state.py: checkpoints a run resumes from; files.py: atomic, checked writes;
tensor_tree.py: nested state split into tensors and JSON; cli_args.py: the command line's argument types;
preflight.py: what training refuses before it starts (imported by itself: it needs the models' layers)."""
from .files import atomic_write, atomic_write_json, atomic_write_text, replace_dir, temp_name, write_all, write_file
from .identity import fingerprint, identity
from .rundir import (LOCK, MARKER, RunDir, RunDirError, RunLockedError, check_run_dir, owned, remove_dead_temps,
                     unfinished)
from .train_state import CheckpointError, RunCheckpoints, TrainingDiverged, find_checkpoint, read_state
