"""The registry layer both features stand on: which version, its files, its base, its experiment,
its description sections, who holds an alias and whether a verdict lets a version take it.

Nothing here imports the hook service or the evaluators; both import this.
"""
