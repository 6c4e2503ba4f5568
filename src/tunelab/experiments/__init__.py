"""Many runs of the stages below, and looks inside one: compare (techniques side by side), sweep (a
hyperparameter search), profile (a few steps under torch.profiler). Every trial runs in its own process
(trials.py). Only the command line imports this package."""
