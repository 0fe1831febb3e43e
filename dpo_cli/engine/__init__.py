"""The training engine: `loop.train` runs every training stage's steps over a backend (`backends.py`:
one process, or DeepSpeed ZeRO across ranks) in a run dir prepared by `rundir.py`."""
