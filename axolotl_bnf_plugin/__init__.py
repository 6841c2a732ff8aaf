"""BNF and ASFT preference alignment for Axolotl, on a fused linear + log-prob kernel.

Use it from an Axolotl config with `plugins: [axolotl_bnf_plugin.BNFPlugin]` and `rl: bnf` or
`rl: asft`; or call the core from any training loop: `kernels` (the fused op), `methods`, `step_loss`
(`batch_loss`), `initial_policy` and `reference` (the initial policy's log-probs) and `data.collator`
need only PyTorch, transformers and pydantic (`examples/own_training_loop.py`). Axolotl is imported by the
plugin, the trainer and the data loader only; the plugin class is imported on first use.
"""

__all__ = ["BNFPlugin"]
__version__ = "0.1.0"


def __getattr__(name):
    if name == "BNFPlugin":
        from .plugin import BNFPlugin

        return BNFPlugin
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
