"""`python -m dllm_plugin.gpu_check`: does this machine train every family, how fast, and what fits?

workloads.py (the family registry, modes, plans) -> runner.py (one run through the real
loader and Trainer) + measure.py (memory, FLOPs, matmul peak) -> checks.py, memory_model.py
-> suite.py (one device) -> report.py; data_parallel.py runs jobs through the launcher;
__main__.py parses arguments, starts one worker per GPU and sets the exit status.
"""
