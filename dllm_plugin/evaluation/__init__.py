"""Did the fine-tune work? Held-out ELBO, answer accuracy and lm-evaluation-harness.

- elbo.py: the held-out NLL bound per answer token with its standard error;
- accuracy.py: normalised exact match and token F1 of sampled answers;
- held_out.py: what a training job measures on its held-out split, and when;
- lm_eval_model.py: the `dllm` model type for lm-eval (imports lm-eval: optional extra);
- lm_eval_cli.py: `python -m dllm_plugin.evaluation.lm_eval_cli`, lm-eval's CLI with it;
- lm_eval_tasks.py: `eval_tasks`, lm-eval tasks run on the trained model after training.

Nothing here knows a method: the per-method parts are class methods of the method's
Trainer (`model_view`, `nll_bound`) and its sampler (methods.py); see
docs/architecture.md, "Evaluation".
"""
