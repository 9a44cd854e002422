"""Training, by where the code runs.

stage.py runs on the driver (plan the phases, one TorchTrainer fit, LoRA merge); loop.py runs inside
Ray Train workers (one DeepSpeed engine per phase); batches.py, memory.py, metrics.py and
lora_merge.py are what both use.
"""
