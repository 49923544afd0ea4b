"""README's examples, run as written: every ``efedllm ...`` line of its bash blocks, and its Python snippet.

Only the placeholders are filled in, from what the commands themselves print: ADDR from ``efedllm
dht``, KEY from ``efedllm verify``, PEER_ID from the server started last (README's ``--weights-from
PEER_ID`` follows the compressed server it copies). Commands that run until stopped (``dht``,
``serve``, ``verify``, ``swarm up``) are started in the background and the test goes on once they
print that they are up; each is stopped with SIGTERM, and must exit cleanly, at the end or before a
command that starts a swarm of its own (``swarm up``, ``demo``); the Python snippet runs against
the hand-built swarm just before that. The others
must exit with 0 and print something. Everything runs on 127.0.0.1, in a temporary folder.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.swarm, pytest.mark.slow]
README = Path(__file__).resolve().parents[1] / "README.md"
EFEDLLM = str(Path(sys.executable).parent / "efedllm")
PLACEHOLDERS = ("ADDR", "PEER_ID", "KEY")
# command -> the line it prints once it is up (it then runs until stopped)
UP_MARKERS = {"dht": "efedllm dht: --initial-peers ", "serve": " serves blocks ", "verify": "efedllm verifier key: ",
              "swarm": '"initial_peers": ', "api": '{"url": '}
COMMAND_TIMEOUT = 900.0


def readme_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def readme_commands() -> list[list[str]]:
    """Every ``efedllm`` line of README's bash blocks, as argv (comments dropped)."""
    return [shlex.split(line, comments=True) for block in readme_blocks("bash") for line in block.splitlines()
            if line.startswith("efedllm ")]


class Background:
    """A command that runs until stopped; its output is collected line by line (and kept for failures)."""

    def __init__(self, argv: list[str], cwd: Path) -> None:
        self.argv, self.lines = argv, []
        self.process = subprocess.Popen([EFEDLLM, *argv[1:]], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, start_new_session=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, marker: str, timeout: float = COMMAND_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if marker in line:
                    return line
            assert self.process.poll() is None, f"{shlex.join(self.argv)} exited:\n" + "\n".join(self.lines[-40:])
            time.sleep(0.2)
        raise AssertionError(f"{shlex.join(self.argv)} did not print {marker!r} in {timeout} s:\n" + "\n".join(self.lines[-40:]))

    def stop(self) -> int | None:
        """SIGTERM, then the exit code (None: it had to be killed, with its whole process group)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            code = None
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # whatever it left behind (its p2p daemons)
        except ProcessLookupError:
            pass
        self.process.wait()
        return code


def stop_all(running: list[Background]) -> dict[str, int | None]:
    """Stops every background command, newest first; command -> its exit code."""
    codes = {shlex.join(process.argv): process.stop() for process in reversed(running)}
    running.clear()
    return codes


def fill(argv: list[str], values: dict[str, str]) -> list[str]:
    filled = []
    for argument in argv:
        for name in PLACEHOLDERS:
            if name in argument:
                assert name in values, f"{shlex.join(argv)} uses {name} before a command printed it"
                argument = argument.replace(name, values[name])
        filled.append(argument)
    return filled


def learn(argv: list[str], line: str, values: dict[str, str]) -> None:
    """The placeholder values that an up line tells."""
    if argv[1] == "dht":
        values["ADDR"] = line.split("--initial-peers ", 1)[1].strip()
    elif argv[1] == "serve":
        values["PEER_ID"] = line.split()[2]  # "efedllm server PEER serves blocks ..."
    elif argv[1] == "verify":
        values["KEY"] = line.split("key: ", 1)[1].strip()


def run_python_snippet(values: dict[str, str], cwd: Path) -> bool:
    """README's Python example against the swarm at ADDR; it must exit with 0 and print the answer."""
    (snippet,) = readme_blocks("python")
    done = subprocess.run([sys.executable, "-c", f"ADDR = {values['ADDR']!r}\n{snippet}"], cwd=cwd,
                          capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    assert done.returncode == 0 and done.stdout.strip(), (done.stdout[-2000:], done.stderr[-3000:])
    return True


def test_readme_commands_and_python_example_run_as_written(tmp_path):
    commands = readme_commands()
    assert len(commands) >= 15 and any(argv[1] == "dht" for argv in commands)
    values: dict[str, str] = {}
    running: list[Background] = []
    codes: dict[str, int | None] = {}
    snippet_ran = False
    try:
        for argv in commands:
            argv = fill(argv, values)
            if argv[1] in ("demo", "swarm"):  # a swarm of its own: the hand-built one is done with, and stops first
                snippet_ran = snippet_ran or run_python_snippet(values, tmp_path)
                codes.update(stop_all(running))
            if argv[1] in UP_MARKERS:
                started = Background(argv, tmp_path)
                running.append(started)
                learn(argv, started.wait_for(UP_MARKERS[argv[1]]), values)
                if argv[1] == "serve" and "--weights-from" in argv:
                    started.wait_for("received blocks")
                continue
            done = subprocess.run([EFEDLLM, *argv[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1"})
            assert done.returncode == 0 and (done.stdout + done.stderr).strip(), (shlex.join(argv), done.stdout[-2000:],
                                                                              done.stderr[-3000:])
        assert snippet_ran, "README's Python example needs the hand-built swarm, before `swarm up` or `demo`"
    finally:
        codes.update(stop_all(running))
    assert codes and all(code == 0 for code in codes.values()), codes
