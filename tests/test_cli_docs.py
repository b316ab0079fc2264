"""Man pages and shell completions (packaging/cli): generated from the parser and the schema.

They are committed so the packages need no generator; these tests regenerate
them and fail when the parser or the schema changed without a regeneration
(`.venv/bin/python packaging/cli/generate.py`).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tierd import cli

REPO = Path(__file__).resolve().parent.parent
CLI = REPO / "packaging" / "cli"
GENERATED = ("tierd.8", "tierd.yaml.5", "completions/tierd", "completions/_tierd")


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Test extras (pyproject.toml), pinned; a .deb build has neither and checks the rest.
    pytest.importorskip("argparse_manpage", minversion="4.8")
    pytest.importorskip("shtab", minversion="1.13")
    out = tmp_path_factory.mktemp("cli")
    subprocess.run([sys.executable, str(CLI / "generate.py"), str(out)], check=True)
    return out


@pytest.mark.parametrize("name", GENERATED)
def test_committed_file_is_what_the_generator_writes(name: str, regenerated: Path) -> None:
    assert (CLI / name).read_text() == (regenerated / name).read_text(), \
        f"packaging/cli/{name} is stale: run .venv/bin/python packaging/cli/generate.py"


def subcommands() -> list[str]:
    return list(cli.COMMANDS)


@pytest.mark.parametrize("command", subcommands())
def test_tierd_8_documents_every_subcommand_and_option(command: str) -> None:
    page = (CLI / "tierd.8").read_text()
    assert f"tierd {command}" in page.replace("\\-", "-")
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    for action in sub._actions:
        for option in action.option_strings:
            if option not in ("-h", "--help"):
                assert option.replace("-", r"\-") in page, (command, option)


def test_tierd_yaml_5_documents_every_key() -> None:
    from tierd.config_schema import SCHEMA

    page = (CLI / "tierd.yaml.5").read_text()

    def keys(schema: dict, prefix: str) -> list[str]:
        found = []
        for name, sub in schema["properties"].items():
            found += keys(sub, f"{prefix}{name}.") if sub["type"] == "object" \
                else [f"{prefix}{name}"]
        return found

    for key in keys(SCHEMA, ""):
        assert f"\\fB{key}\\fR" in page.replace("\\-", "-"), key
    assert "dry_run: false" in page.replace("\\-", "-")  # the one-line switch


@pytest.mark.skipif(shutil.which("man") is None, reason="needs man-db")
@pytest.mark.parametrize("name", ["tierd.8", "tierd.yaml.5"])
def test_man_renders_the_page_without_warnings(name: str) -> None:
    done = subprocess.run(["man", "--warnings", "-l", str(CLI / name)], capture_output=True,
                          text=True, check=False, env={"MANWIDTH": "80", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert "tierd" in done.stdout


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_completion_completes_subcommands_and_options() -> None:
    script = f"""
source {CLI / 'completions/tierd'}
COMP_WORDS=(tierd ""); COMP_CWORD=1; _shtab_tierd; echo "${{COMPREPLY[@]}}"
COMP_WORDS=(tierd run --); COMP_CWORD=2; _shtab_tierd; echo "${{COMPREPLY[@]}}"
"""
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    first, second = done.stdout.splitlines()
    assert set(first.split()) >= set(cli.COMMANDS)
    assert "--dry-run" in second.split() and "--once" in second.split()


def test_readme_opens_for_an_operator_with_the_lab_under_development() -> None:
    readme = (REPO / "README.md").read_text()
    first_screen = "\n".join(readme.splitlines()[:80])
    for needed in ("## Requirements", "apt-get install ./tierd_", "tierd status", "DRY RUN",
                   "dry_run: false", "numa_balancing=2"):
        assert needed in first_screen, needed
    development = readme.split("## Development", 1)
    assert "make demo" not in development[0] and "make test" not in development[0]
    assert "make demo" in development[1] and "make test" in development[1]
    # The switch it shows is the one the shipped config documents.
    (switch,) = {line.strip() for line in readme.splitlines() if line.startswith("sed -i")}
    shipped = (REPO / "config" / "tierd.yaml").read_text()
    assert switch.split(" && ")[0] in shipped
