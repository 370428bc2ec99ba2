"""The README and docs/ are the manual: every relative link must reach a file and, with #anchor, one
of its headings; the quick start keeps exactly two commands, the second of which is what CI runs; every
output path they and the config's comments name exists after a run."""
import re
from pathlib import Path

from main_2D_DP import main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation other than - and _ dropped, spaces -> -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # '# comment' in code is no heading
    return {slug(line.lstrip("#")) for line in text.splitlines() if re.match(r"#{1,6} ", line)}


def test_relative_links_reach_a_file_and_heading():
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target} (no file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{page.name}: {target} (no heading)")
    assert not broken, broken
    assert len(PAGES) > 5 and sum(len(LINK.findall(p.read_text())) for p in PAGES) > 20  # the check saw links


def test_quick_start_has_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", quick, flags=re.S)
    assert len(commands) == 2 and all("\n" not in c for c in commands), commands
    assert "main_2D_DP.py" in commands[0] and "pytest" in commands[1]
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


# An output path, as the docs name it (in backticks) and configs/config.yaml's comments (bare): relative
# to the experiment folder, starting with one of its folders, or starting with <target_dir>/ or
# <output.target_dir>/ (beside the experiments: ledger, data descriptions) or <experiment>/; or a report.
# Other placeholders (<split>, <name>, ...) and * stand for any name: at least one file must match.
OUTPUT = re.compile(r"(?:<(?:output\.)?target_dir>/|<experiment>/)?"
                    r"(?:private|checkpoints|predictions|results|external|inference)/[^\s`,;:()]*"
                    r"|<(?:output\.)?target_dir>/[^\s`,;:()]*|report(?:_<split>|\*)?\.html")
# written by other commands than train and predict, or only on failure: named, not checked
ELSEWHERE = {"external/": "predict --data", "inference/": "predict --images",
             "private/training_pixels.json": "predict --images", "private/audit/": "audit, train --audit-canaries",
             "private/stopped_batch_rank": "a non-finite loss", "private/data_description/": "data describe",
             "private/privacy_ledger/": "the ledger of an earlier version (ledger --migrate)"}


def named_outputs() -> dict[str, set[str]]:
    """Every output path the docs and the config's comments name, with the files naming it."""
    found: dict[str, set[str]] = {}
    for page in PAGES:
        for span in re.findall(r"`([^`\n]+)`", page.read_text()):
            if OUTPUT.fullmatch(span):
                found.setdefault(span, set()).add(page.name)
    for line in (ROOT / "configs" / "config.yaml").read_text().splitlines():
        for match in OUTPUT.finditer(line.partition("#")[2]):
            found.setdefault(match.group(0), set()).add("config.yaml")
    return found


def test_every_output_path_the_docs_name_exists_after_a_run(tiny_config):
    path = tiny_config(training={"epochs": 1}, evaluation={"bootstrap": 20, "permutations": 20})
    target = path.parent / "experiments"
    exp = target / "tiny"
    assert main(["train", "--config", str(path)]) == 0
    assert main(["predict", str(exp)]) == 0 and main(["predict", str(exp), "--split", "valid"]) == 0

    named = named_outputs()
    assert {"private/last.pt", "checkpoints/best.pt", "private/summary.json", "private/predictions/<split>.csv",
            "results/<split>_metrics.json", "report.html"} <= set(named), sorted(named)  # the pattern sees them
    missing = []
    for name, pages in sorted(named.items()):
        relative = re.sub(r"^(<(output\.)?target_dir>|<experiment>)/", "", name)
        if relative.startswith(tuple(ELSEWHERE)):
            continue
        base = target if name.startswith(("<target_dir>", "<output.target_dir>")) else exp
        pattern = re.sub(r"<[^>]+>", "*", relative).rstrip("/")
        hits = list(base.glob(pattern))
        if not any(hit.is_dir() if name.endswith("/") else hit.exists() for hit in hits):
            missing.append(f"{name} ({', '.join(sorted(pages))})")
    assert not missing, f"named but not written by train + predict: {missing}"
