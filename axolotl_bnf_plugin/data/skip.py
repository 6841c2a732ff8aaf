"""The exception that drops one row: every reader raises it, the loader counts its reason per data set."""


class Skip(Exception):
    """This row cannot become a training example; `args[0]` is the reason counted in the report."""
