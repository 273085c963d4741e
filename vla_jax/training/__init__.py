"""Training machinery used by train.py: train state, optimizer and trainable masks (`state`), loss,
metrics and the jitted sharded step (`step`), the step loop (`loop`), analytic FLOPs and metric
records (`metrics`), metric writers and progress bar (`writers`), run set-up from an ml_collections
config (`run`), synthetic batches (`synthetic`)."""
