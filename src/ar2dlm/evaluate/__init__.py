"""Quality: eval tasks, the sandbox that runs generated code, the lm-eval model and ar2dlm's local lm-eval tasks."""
