"""The CLI's verbs, one module per family; each module's ``register`` adds its verbs to the
parser that ``tooling/cli.py`` builds."""
