"""Agent Skills: SKILL.md parsing (strict and lenient), discovery, the tools, their scripts in the real sandbox,
the same tools over real MCP, and the `ember skills` CLI."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ember.agents.approvals import ToolApprovals, Verdict
from ember.agents.mcp_tools import mcp_tools
from ember.agents.sandbox import Sandbox
from ember.agents.skills import SkillError, SkillLibrary, load_skill, validate
from ember.agents.tools import Toolbox, ToolResult
from ember.server.launch import free_port

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "skills"
needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")


def make_skill(
    parent: Path, folder: str, frontmatter: str, body: str = "Do the thing.", files: dict[str, str] | None = None
) -> Path:
    directory = parent / folder
    directory.mkdir(parents=True)
    (directory / "SKILL.md").write_text(f"---\n{frontmatter}\n---\n{body}\n")
    for name, text in (files or {}).items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text)
    return directory


def call(toolbox: Toolbox, tool: str, **arguments: str) -> ToolResult:
    return asyncio.run(toolbox.call(tool, json.dumps(arguments)))


def test_a_skill_loads_with_every_field_and_its_body(tmp_path: Path) -> None:
    frontmatter = (
        "name: pdf-tools\ndescription: >\n  Fill PDF forms.\n  Use for PDFs.\nlicense: MIT\n"
        "compatibility: needs qpdf\nmetadata:\n  author: someone\n  version: 1.0\nallowed-tools: Bash(qpdf:*) Read"
    )
    directory = make_skill(tmp_path, "pdf-tools", frontmatter, "# PDF\n\nStep one.", {"scripts/fill.py": "print(1)"})
    (directory / "SKILL.md").write_bytes(b"\xef\xbb\xbf" + (directory / "SKILL.md").read_bytes())  # a BOM
    skill = load_skill(directory)
    assert (skill.name, skill.description, skill.license, skill.compatibility) == (
        "pdf-tools",
        "Fill PDF forms. Use for PDFs.",
        "MIT",
        "needs qpdf",
    )
    assert skill.metadata == {"author": "someone", "version": "1.0"}
    assert skill.allowed_tools == ("Bash(qpdf:*)", "Read")
    assert skill.warnings == () and validate(directory) == []
    assert skill.instructions() == "# PDF\n\nStep one." and skill.files() == ["scripts/fill.py"]


@pytest.mark.parametrize(
    ("folder", "frontmatter", "warning"),
    [
        ("other", "name: pdf\ndescription: d", "does not match its folder's name 'other'"),
        ("PDF", "name: PDF\ndescription: d", "must be lowercase letters, digits and single hyphens"),
        ("a--b", "name: a--b\ndescription: d", "must be lowercase letters, digits and single hyphens"),
        ("x" * 65, f"name: {'x' * 65}\ndescription: d", "65 characters, over the limit of 64"),
        ("nameless", "description: d", "no name; using the folder's, 'nameless'"),
        ("pdf", "name: pdf\ndescription: d\ntriggers: [pdf]", "unknown field 'triggers'"),
        ("pdf", f"name: pdf\ndescription: {'d' * 1025}", "1025 characters, over the limit of 1024"),
        ("pdf", "name: pdf\ndescription: d\nmetadata: [a, b]", "metadata must be a mapping"),
    ],
)
def test_a_broken_naming_rule_loads_with_a_warning_that_validate_reports(
    tmp_path: Path, folder: str, frontmatter: str, warning: str
) -> None:
    directory = make_skill(tmp_path, folder, frontmatter)
    assert any(warning in w for w in load_skill(directory).warnings)
    assert any(warning in problem for problem in validate(directory))


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("no frontmatter at all", "must start with YAML frontmatter"),
        ("---\nname: x\ndescription: d\n", "no closing '---' line"),
        ("---\nname: x\n---\nbody", "has no description"),
        ("---\nname: x\ndescription: '  '\n---\n", "has no description"),
        ("---\nname: [x\ndescription: d\n---\n", "the frontmatter is not YAML"),
        ("---\n- a list\n---\n", "must be a YAML mapping"),
        ("---\nname: ../up\ndescription: d\n---\n", "cannot name a skill"),
    ],
)
def test_an_unusable_skill_md_is_an_error(tmp_path: Path, text: str, error: str) -> None:
    (tmp_path / "SKILL.md").write_text(text)
    with pytest.raises(SkillError, match=error.replace("[", r"\[")):
        load_skill(tmp_path)
    assert error in validate(tmp_path)[0]


def test_a_plain_value_with_a_colon_is_read_as_other_clients_read_it(tmp_path: Path) -> None:
    directory = make_skill(tmp_path, "pdf", "name: pdf\ndescription: Use this skill when: the user asks about PDFs")
    assert load_skill(directory).description == "Use this skill when: the user asks about PDFs"


def test_discovery_searches_nested_folders_but_not_hidden_ones_and_the_first_root_wins(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first, second = tmp_path / "project", tmp_path / "user"
    make_skill(first / "writing", "review", "name: review\ndescription: project review")
    make_skill(first, ".hidden", "name: hidden\ndescription: d")
    make_skill(first / "node_modules", "dep", "name: dep\ndescription: d")
    make_skill(first, "broken", "name: broken")
    make_skill(first / "review-outer", "inner", "name: inner\ndescription: d")  # not a skill: no SKILL.md above
    make_skill(second, "review", "name: review\ndescription: user review")
    make_skill(second, "deploy", "name: deploy\ndescription: d", files={"references/GUIDE.md": "guide"})
    with caplog.at_level(logging.WARNING, logger="ember.skills"):
        library = SkillLibrary.discover([first, second, second / "deploy"])  # deploy twice: no clash
    assert sorted(s.name for s in library) == ["deploy", "inner", "review"]
    assert library.get("review").description == "project review"
    messages = [r.getMessage() for r in caplog.records]
    assert any("skipped the skill in" in m and "has no description" in m for m in messages)
    assert sum("shadowed" in m for m in messages) == 1 and any("user/review is shadowed" in m for m in messages)
    with pytest.raises(ValueError, match="does not exist"):
        SkillLibrary.discover([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no skills under"):
        SkillLibrary.discover([tmp_path / "empty"])
    with pytest.raises(ValueError, match="no skill named 'nope'; the skills are: inner, review, deploy"):
        library.get("nope")


def test_activation_gives_instructions_and_files_and_reads_stay_inside_the_skill(tmp_path: Path) -> None:
    directory = make_skill(
        tmp_path,
        "notes",
        "name: notes\ndescription: Take <notes> & keep them",
        "Read references/STYLE.md first.",
        {"references/STYLE.md": "Short sentences.", "assets/big.txt": "x" * 70_000},
    )
    (directory / "assets" / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    (tmp_path / "secret.txt").write_text("host secret")
    (directory / "link.txt").symlink_to(tmp_path / "secret.txt")
    toolbox = Toolbox(SkillLibrary.discover([tmp_path]).tools())
    spec = toolbox.tools["activate_skill"].spec()["function"]
    assert "<description>Take &lt;notes&gt; &amp; keep them</description>" in spec["description"]
    assert spec["parameters"]["properties"]["name"] == {"const": "notes", "type": "string"}

    activated = call(toolbox, "activate_skill", name="notes")
    assert not activated.is_error and activated.content.startswith('<skill_content name="notes">\n')
    assert "Read references/STYLE.md first." in activated.content and "read_skill_file" in activated.content
    listed = "<file>assets/big.txt</file>\n  <file>assets/logo.png</file>\n  <file>link.txt</file>\n"
    assert listed + "  <file>references/STYLE.md</file>\n</skill_resources>" in activated.content
    assert call(toolbox, "read_skill_file", skill="notes", path="references/STYLE.md") == ToolResult("Short sentences.")
    assert call(toolbox, "read_skill_file", skill="notes", path="/skills/notes/references/STYLE.md").content == (
        "Short sentences."
    )
    big = call(toolbox, "read_skill_file", skill="notes", path="assets/big.txt").content
    assert big.startswith("x" * 64_000) and big.endswith("[cut: the file has 70000 characters; shown: 64000]")
    refused = {
        "../secret.txt": "'../secret.txt' is outside the skill's folder",
        str(tmp_path / "secret.txt"): "is outside the skill's folder",
        "link.txt": "'link.txt' is outside the skill's folder",  # a link out of the folder is no way out
        "assets/logo.png": "'assets/logo.png' is a binary file (10 bytes), not text",
        "missing.md": "skill 'notes' has no file 'missing.md'; its files: assets/big.txt, assets/logo.png",
    }
    for path, error in refused.items():
        result = call(toolbox, "read_skill_file", skill="notes", path=path)
        assert result.is_error and error in result.content, result
    other = call(toolbox, "activate_skill", name="other")
    assert other.is_error and "Input should be 'notes'" in other.content


def test_an_activated_skills_allowed_tools_run_without_asking(tmp_path: Path) -> None:
    """allowed-tools pre-approves tools once its skill is activated (through the tool, as the model does), and
    only those: any other call is still put to the person, whose "always" approves that tool from then on."""
    make_skill(tmp_path, "calc", "name: calc\ndescription: Compute things.\nallowed-tools: run_python read_skill_file")
    make_skill(tmp_path, "other", "name: other\ndescription: Other things.\nallowed-tools: run_shell")
    library = SkillLibrary.discover([tmp_path])
    asked: list[tuple[str, str]] = []
    verdicts = iter(["no", "always"])

    async def ask(name: str, arguments: str) -> Verdict:
        asked.append((name, arguments))
        return next(verdicts)

    approvals = ToolApprovals(ask, ["activate_skill"], library)

    def approved(name: str) -> bool:
        return asyncio.run(approvals(name, '{"code": "1"}'))

    assert approved("activate_skill") and not approved("run_python")  # allowed by the user; asked, declined
    assert not call(Toolbox(library.tools()), "activate_skill", name="calc").is_error
    assert approved("run_python") and approved("read_skill_file")  # the active skill's allowed-tools
    assert approved("run_shell") and approved("run_shell")  # asked once: "always"
    assert asked == [("run_python", '{"code": "1"}'), ("run_shell", '{"code": "1"}')]
    assert library.allowed_tools() == {"run_python", "read_skill_file"}  # "other" was never activated


def test_an_empty_library_offers_no_tools() -> None:
    assert SkillLibrary([]).tools() == []


@needs_bwrap
def test_a_skill_script_runs_in_the_sandbox_from_its_read_only_folder(tmp_path: Path) -> None:
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    (workspace / "data.csv").write_text("city,population\nParis,2100000\nLyon,520000\n")
    library = SkillLibrary.discover([EXAMPLES])
    assert "/skills/csv-summary/scripts/summarize.py" in library.activate("csv-summary", in_sandbox=True)
    with Sandbox(workspace, read_only=library.sandbox_folders()) as sandbox:
        ran = asyncio.run(sandbox.run_shell("python3 /skills/csv-summary/scripts/summarize.py data.csv"))
        assert ran.exit_code == 0, ran.stderr
        assert ran.stdout.splitlines() == [
            "2 rows, 2 columns",
            "city: text, 2 distinct; most common: 'Paris' x1, 'Lyon' x1",
            "population: numeric, count 2, min 520000, max 2100000, mean 1.31e+06",
        ]
        write = asyncio.run(sandbox.run_shell("touch /skills/csv-summary/new"))
        assert write.exit_code != 0 and "Read-only file system" in write.stderr
    with pytest.raises(ValueError, match="give an absolute path of its own"):
        Sandbox(workspace, read_only={EXAMPLES: "/workspace"})
    with pytest.raises(ValueError, match="it is not a folder"):
        Sandbox(workspace, read_only={tmp_path / "missing": "/data"})


@needs_bwrap
def test_ember_mcp_skills_serves_the_same_tools_over_real_mcp(tmp_path: Path) -> None:
    library = SkillLibrary.discover([EXAMPLES])
    local = Toolbox(library.tools(in_sandbox=True))

    async def over_mcp() -> tuple[list[dict], ToolResult, ToolResult, ToolResult]:
        command = f"{sys.executable} -m ember.cli mcp skills {EXAMPLES} --sandbox --workspace {tmp_path}"
        async with mcp_tools([command]) as tools:
            remote = Toolbox(tools)
            return (
                remote.specs(),
                await remote.call("activate_skill", '{"name": "csv-summary"}'),
                await remote.call("read_skill_file", '{"skill": "csv-summary", "path": "../../README.md"}'),
                await remote.call("run_shell", '{"command": "ls /skills/csv-summary/scripts"}'),
            )

    specs, activated, refused, listed = asyncio.run(over_mcp())
    assert specs[:2] == local.specs() and [s["function"]["name"] for s in specs[2:]] == ["run_python", "run_shell"]
    assert activated == call(local, "activate_skill", name="csv-summary")
    assert refused.is_error and "is outside the skill's folder" in refused.content
    assert listed == ToolResult("summarize.py")


def ember(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ember.cli", *args], capture_output=True, text=True, timeout=60)


def test_cli_lists_and_validates_skills(tmp_path: Path) -> None:
    listed = ember("skills", "list", str(EXAMPLES))
    assert listed.returncode == 0 and "csv-summary" in listed.stdout and "Summarize a CSV file" in listed.stdout
    assert ember("skills", "validate", str(EXAMPLES)).stdout == f"ok   {EXAMPLES / 'csv-summary'}\n"
    make_skill(tmp_path, "Bad_Name", "name: Bad_Name\ndescription: d")
    make_skill(tmp_path, "empty", "name: empty")
    failed = ember("skills", "validate", str(tmp_path))
    assert failed.returncode == 1
    assert failed.stdout.splitlines() == [
        f"FAIL {tmp_path / 'Bad_Name'}",
        "     - the name 'Bad_Name' must be lowercase letters, digits and single hyphens, not at either end",
        f"FAIL {tmp_path / 'empty'}",
        "     - the frontmatter has no description: the model picks skills by their descriptions",
    ]
    warned = ember("skills", "list", str(tmp_path))  # lenient: the bad name loads, with a warning
    assert warned.returncode == 0 and "Bad_Name" in warned.stdout
    assert "ember: skill Bad_Name" in warned.stderr and "skipped the skill in" in warned.stderr
    for args, message in [
        (["skills", "list", str(tmp_path / "missing")], "does not exist"),
        (["skills", "validate", str(tmp_path / "missing")], "no skills under"),
        (["agent", "hi", "--skill", "csv-summary"], "--skill activates a skill found with --skills"),
        (["agent", "hi", "--skills", str(EXAMPLES), "--skill", "nope"], "no skill named 'nope'"),
    ]:
        done = ember(*args)
        assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith("ember: error: "), done.stderr
        assert message in done.stderr and "Traceback" not in done.stderr


@needs_bwrap
def test_ember_mcp_serves_over_streamable_http_on_loopback(tmp_path: Path) -> None:
    port = free_port()
    command = [sys.executable, "-m", "ember.cli", "mcp", "skills", str(EXAMPLES), "--sandbox", "--port", str(port)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(300):  # bounded: 30 s for the server to listen
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            time.sleep(0.1)

        async def over_http() -> tuple[list[str], ToolResult]:
            async with mcp_tools([f"http://127.0.0.1:{port}/mcp"]) as tools:
                remote = Toolbox(tools)
                return list(remote.tools), await remote.call("run_shell", '{"command": "ls /skills"}')

        names, listed = asyncio.run(over_http())
        assert names == ["activate_skill", "read_skill_file", "run_python", "run_shell"]
        assert listed == ToolResult("csv-summary")
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert process.stderr is not None and f"at http://127.0.0.1:{port}/mcp" in process.stderr.read()
