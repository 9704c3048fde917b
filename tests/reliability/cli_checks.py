"""Runs ``ibis_jax.cli.main`` in process and checks the one-line error contract."""

from __future__ import annotations

from ibis_jax.cli import main


def one_line_error(capsys, argv: list[str], *, code: int = 1, names: str | tuple[str, ...] = ()) -> str:
    """Runs the command; asserts exit code ``code``, exactly one stderr line starting with
    ``ibis-jax``, no traceback, and each of ``names`` in it. Returns the line."""
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse usage errors exit
        rc = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == code, (argv, rc, err)
    assert len(lines) == 1, (argv, err)
    assert lines[0].startswith("ibis-jax") and "error:" in lines[0], lines[0]
    assert "Traceback" not in err
    for name in (names,) if isinstance(names, str) else names:
        assert name in lines[0], (name, lines[0])
    return lines[0]
