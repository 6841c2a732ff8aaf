"""Packaging for axolotl-bnf-plugin.

Requirements are ranges, the union of what Axolotl 0.19, 0.20 and 0.21 themselves require, so that
`pip install` into a working Axolotl environment keeps its torch, Axolotl and Hugging Face libraries
(Axolotl pins transformers / trl / peft / datasets exactly; it decides those). Axolotl 0.20 and 0.21 need
Python >= 3.12, so on Python 3.11 this resolves to Axolotl 0.19. The combinations CI tests are pinned
exactly in scripts/pins/ (Python 3.11: torch 2.13.0 CPU + Axolotl 0.19.0; Python 3.12: torch 2.13.0 +
Axolotl 0.21.0), which scripts/bootstrap.sh builds.
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
        # Axolotl 0.19: torch>=2.11,<=2.13; 0.20: >=2.13,<=2.14.0; 0.21: >=2.13,<2.15.
        "torch>=2.11,<2.15",
        "axolotl>=0.19,<0.22",
        # Pinned by Axolotl: 0.19 -> transformers 5.16.1, trl 1.9.0, peft 0.20.0, datasets 4.8.4,
        # accelerate 1.13.0; 0.20 -> 5.17.0, 1.13.0, 0.21.0, 4.8.4, 1.15.0; 0.21 -> 5.20.1, 1.14.1, 0.21.2,
        # 5.0.1, 1.15.0.
        "transformers>=5.16.1,<5.21",
        "trl>=1.9,<1.15",
        "peft>=0.20,<0.22",
        "datasets>=4.8.4,<5.1",
        "accelerate>=1.13,<1.16",
        "pydantic>=2.10,<3",
        "matplotlib>=3.8",
    ],
    extras_require={
        # deepspeed: the ZeRO-3 tests (the range of Axolotl 0.20/0.21's `deepspeed` extra; 0.19's is <0.19).
        "test": ["pytest>=8.4,<9", "pytest-timeout>=2.4", "pytest-xdist>=3.8", "deepspeed>=0.18.6,<0.20"],
    },
    entry_points={"axolotl.plugins": ["bnf = axolotl_bnf_plugin:BNFPlugin"]},
)
