"""Packaging for axolotl-bnf-plugin.

The tested combination is pinned exactly (Python 3.11: torch 2.13.0 + axolotl 0.19.x); on Python >= 3.12
the newer Axolotl line (0.20/0.21) is admitted, since those releases need 3.12.
"""
from setuptools import find_packages, setup

setup(
    name="axolotl-bnf-plugin",
    version="0.1.0",
    description=(
        "Axolotl plugin: BNF (Bidirectional Negative Feedback) and ASFT (Aligned Supervised Fine-Tuning) "
        "with a fused, chunked linear + log-prob kernel that never materialises the logits."
    ),
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["axolotl_bnf_plugin", "axolotl_bnf_plugin.*"]),
    python_requires=">=3.11",
    install_requires=[
        "torch==2.13.0; python_version < '3.12'",
        "torch>=2.11,<2.14; python_version >= '3.12'",
        "axolotl==0.19.*; python_version < '3.12'",
        "axolotl>=0.19,<0.22; python_version >= '3.12'",
        "pydantic>=2.10,<3",
        "matplotlib>=3.8",
    ],
    extras_require={
        # deepspeed: the ZeRO-3 tests (same range as Axolotl's own `deepspeed` extra).
        "test": ["pytest==8.4.2", "pytest-timeout==2.4.0", "deepspeed>=0.18.6,<0.19"],
    },
    entry_points={"axolotl.plugins": ["bnf = axolotl_bnf_plugin:BNFPlugin"]},
)
