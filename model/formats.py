"""Format tags of the files a model is saved in, in a module that imports nothing: model/checkpoint.py writes
and checks the checkpoint's tag, and service/bundle.py checks a checkpoint's header before serving it without
importing torch (which model/checkpoint.py brings in)."""

CHECKPOINT_FORMAT = "locca-checkpoint/1"
