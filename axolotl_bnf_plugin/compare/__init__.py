"""Preference methods side by side on one config: the likelihood probe every run logs the same way
(`probe.py`, `probe_set.py`, `callback.py`), the command that trains each method and reports them together
(`run.py`, `configs.py`, `report.py`; `python -m axolotl_bnf_plugin.compare`), and a toy built to provoke
likelihood displacement (`toy.py`). See docs/compare.md.
"""
