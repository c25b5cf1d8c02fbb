"""The training engine shared by every command.

- ``pipeline``: stages of a run (teacher, baseline, method), data and network construction, results.csv;
- ``trainer``: the epoch loop of one stage (history.csv, checkpoints, bit-exact resume, evaluation);
- ``step``: the seams a method's step uses: the teacher, the DDP-wrapped pass, the optimiser updates;
- ``optim``: optimisers and schedules from the parameter groups a method declares;
- ``checkpoint``: safetensors weights + JSON sidecar, training state, ``load_model`` for published checkpoints;
- ``evaluation``, ``metrics``: accuracy of checkpoints and networks; ``export``: safetensors/TorchScript/ONNX;
- ``distributed``: DDP through torchrun; ``io``: atomic file writes.
"""
