"""BNF and ASFT preference alignment for Axolotl, on a fused linear + log-prob kernel.

Use it from an Axolotl config with `plugins: [axolotl_bnf_plugin.BNFPlugin]` and `rl: bnf` or
`rl: asft`; or call `axolotl_bnf_plugin.methods` and `axolotl_bnf_plugin.kernels` from any training loop
(those two need only PyTorch and pydantic; the plugin class is imported on first use).
"""

__all__ = ["BNFPlugin"]
__version__ = "0.1.0"


def __getattr__(name):
    if name == "BNFPlugin":
        from .plugin import BNFPlugin

        return BNFPlugin
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
