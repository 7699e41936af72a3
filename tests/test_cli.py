"""The ``deployer`` command line: commands, help, exit statuses, one-line errors."""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

import pytest
from twisted.internet.defer import Deferred

from deployer.__main__ import (
    COMMANDS,
    Command,
    Console,
    Failed,
    UsageError,
    Work,
    build_parser,
    guarded,
    main,
    run,
)
from tests.helpers import fired

ROOT = Path(__file__).resolve().parent.parent


def console() -> tuple[Console, io.StringIO, io.StringIO]:
    out, err = io.StringIO(), io.StringIO()
    return Console(out, err), out, err


def inline(work: Work, prog: str, err: TextIO) -> int:
    """A runner without a reactor, for work that does not need one."""
    return int(fired(Deferred.fromCoroutine(guarded(work, None, prog, err))))


def echo_command(behaviour: str = "ok") -> Command:
    """A command as small as a new one can be."""

    def arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("word")

    def prepare(args: argparse.Namespace, environ: Mapping[str, str], c: Console) -> Work:
        if args.word == "bad":
            raise UsageError("bad is not a word")
        if behaviour == "prepare-crash":
            raise KeyError("boom")

        async def work(reactor: Any) -> int:
            if behaviour == "crash":
                raise ZeroDivisionError("division by zero")
            if behaviour == "fail":
                raise Failed("the daemon said no")
            c.out.write(args.word + "\n")
            return 0

        return work

    return Command("echo", "print a word", "Print WORD.", arguments, prepare)


def test_help_lists_every_command_and_the_exit_statuses(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"], environ={})
    assert e.value.code == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert f"    {command.name}" in out and command.help in out
    assert "one of: trigger, status, resume" in out
    assert "exit status: 0 success, 1 failure" in out and "2 usage error" in out


@pytest.mark.parametrize("name", [c.name for c in COMMANDS])
def test_each_command_has_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([name, "--help"], environ={})
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: deployer {name} ")
    assert "exit status:" in out


def test_only_existing_commands_are_listed() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert sorted(sub.choices) == sorted(c.name for c in COMMANDS) == [
        "resume", "status", "trigger"]


def test_a_new_command_is_one_command_object() -> None:
    c, out, err = console()
    assert run(["echo", "hello"], {}, c, commands=[echo_command()], runner=inline) == 0
    assert (out.getvalue(), err.getvalue()) == ("hello\n", "")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "deployer: the following arguments are required: COMMAND (see: deployer --help)"),
        (["nope"], "deployer: argument COMMAND: invalid choice: 'nope' (choose from 'echo')"
                   " (see: deployer --help)"),
        (["echo"], "deployer echo: the following arguments are required: word"
                   " (see: deployer echo --help)"),
        (["echo", "a", "--x"], "deployer echo: unrecognized arguments: --x"
                               " (see: deployer echo --help)"),
        (["echo", "bad"], "deployer echo: bad is not a word (see: deployer echo --help)"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(argv: list[str], message: str) -> None:
    c, out, err = console()
    assert run(argv, {}, c, commands=[echo_command()], runner=inline) == 2
    assert (out.getvalue(), err.getvalue()) == ("", message + "\n")


@pytest.mark.parametrize(
    ("behaviour", "message"),
    [
        ("fail", "deployer echo: the daemon said no"),
        ("crash", "deployer echo: unexpected error: ZeroDivisionError: division by zero"),
        ("prepare-crash", "deployer echo: unexpected error: KeyError: 'boom'"),
    ],
)
def test_failures_are_one_line_and_exit_1(behaviour: str, message: str) -> None:
    c, out, err = console()
    assert run(["echo", "x"], {}, c, commands=[echo_command(behaviour)], runner=inline) == 1
    assert (out.getvalue(), err.getvalue()) == ("", message + "\n")


def test_an_interrupt_exits_130(monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(*args: Any, **kw: Any) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr("deployer.__main__.run", interrupted)
    with pytest.raises(SystemExit) as e:
        main(["trigger", "x"], environ={})
    assert e.value.code == 130
    assert capsys.readouterr().err == "deployer: interrupted\n"


@pytest.mark.parametrize("timeout", ["inf", "nan", "-1", "0"])
def test_trigger_refuses_a_timeout_that_is_not_a_positive_number(timeout: str) -> None:
    c, _, err = console()
    assert run(["trigger", "myorg/foo", "--timeout", timeout], {}, c, runner=inline) == 2
    assert err.getvalue() == ("deployer trigger: --timeout must be a positive number of"
                              " seconds (see: deployer trigger --help)\n")


def test_the_installed_console_script() -> None:
    """``deployer`` (the console script) and ``python -m deployer`` are the same command."""
    script = Path(sys.executable).parent / "deployer"
    commands = [[sys.executable, "-m", "deployer"]] + ([[str(script)]] if script.exists() else [])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for command in commands:
        done = subprocess.run([*command, "trigger", "--url", "ftp://x", "myorg/foo"],
                              capture_output=True, text=True, timeout=60, env=env, check=False)
        assert done.returncode == 2, command
        assert done.stdout == ""
        assert done.stderr == ("deployer trigger: --url 'ftp://x' must be an http:// or"
                               " https:// URL (see: deployer trigger --help)\n")
