"""Files a run writes and users hand us: atomic, versioned checkpoints, and the safe loader that reads any
torch file or pickle without running code from it."""
