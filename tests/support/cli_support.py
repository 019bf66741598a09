"""Checks shared by the CLI tests: bad input is one readable line and exit code 2."""
from tunelens.plugin.cli import SUBCOMMANDS, main


def assert_one_line_error(capsys, argv, *needles):
    """`tunelens ARGV` exits 2 with exactly one stderr line naming every needle."""
    command = next(arg for arg in argv if arg in SUBCOMMANDS)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"tunelens {command}: error: "), err
    for needle in needles:
        assert needle in err[0], err[0]
