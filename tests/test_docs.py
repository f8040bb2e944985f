"""The README and docs/ are the contract users read: they must match the code and the recorded measurements."""
import json
import re
import subprocess
from pathlib import Path

from cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"


def test_readme_starts_with_the_two_commands_and_says_how_long_the_tests_take():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    assert [line.split()[:2] for line in first_block.strip().splitlines()] == [["make", "run"], ["make", "test"]]
    assert re.search(r"`make test` takes about \d+ minutes", README)


def test_the_cli_table_lists_every_flag():
    cli = (DOCS / "cli.md").read_text()
    table = cli[cli.index("| flag |"):cli.index("The `--json` object")]
    for action in build_parser()._actions:
        for flag in action.option_strings:
            if flag not in ("-h", "--help"):
                assert f"`{flag}" in table, flag


def test_the_cpu_table_names_the_machine_and_matches_the_recorded_runs():
    """Absolute CPU speeds vary 2-3x between machines: a number without its machine and date misleads."""
    recorded = json.loads((ROOT / "bench" / "results" / "cli-decode-cpu.json").read_text())
    measured = (DOCS / "benchmarks.md").read_text()
    section = measured[measured.index("## Measured so far"):]
    cpu_name = recorded["cpu"].split(" (")[0]
    assert cpu_name in section and f"{recorded['threads']} threads" in section
    assert recorded["date"][:10] in section
    for row in recorded["rows"]:
        assert f"| {row['decode_tok_s']:.1f} |" in section, row["name"]
    for value in recorded["ratios"].values():
        assert f"| {value:.2f} |" in section


def test_every_relative_link_of_the_readme_and_docs_leads_to_a_file():
    pages = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
    assert {p.name for p in pages} >= {"cli.md", "python.md", "failures.md", "checkpoint-format.md"}
    for page in pages:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith("http"):
                assert (page.parent / target).exists(), f"{page.name}: {target}"
    linked = set(re.findall(r"\]\(docs/([^)]+)\)", README))
    assert linked == {p.name for p in DOCS.glob("*.md")}  # every page is reachable from the README


def test_no_project_file_points_outside_the_repository():
    """The design notes live outside this repository; the README holds the contract users read."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:  # not a git checkout (a source copy): read what is there
        tracked = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts]
    needle = "DESIGN" + ".md"  # spelled apart, so that this file does not match itself
    for name in tracked:
        path = ROOT / name
        if path.suffix in (".py", ".md", ".sh", ".toml", ".txt", "") and path.is_file():
            assert needle not in path.read_text(errors="ignore"), name
