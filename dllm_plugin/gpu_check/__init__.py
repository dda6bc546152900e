"""`python -m dllm_plugin.gpu_check`: does this machine train every family, how fast, and what fits?"""
