"""Does the model answer better, and what does it forget: generations scored by the user's verifier functions
(`verifiers`, `generate`) and the log-likelihood of a held-out text (`retention`), at the start of training and
at every evaluation, under any `rl:` (`callback`)."""
