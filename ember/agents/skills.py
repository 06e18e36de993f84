"""Agent Skills (agentskills.io): folders of instructions, scripts and resources that a model loads when it needs them.

A skill is a folder with a SKILL.md: YAML frontmatter (`name`, `description`, optional `license`,
`compatibility`, `metadata`, `allowed-tools`) and Markdown instructions. The model sees skills in three steps,
so twenty installed skills cost twenty short descriptions, not twenty manuals:
1. the catalog (each skill's name and description) in the description of the `activate_skill` tool;
2. a skill's instructions, the SKILL.md body, when it calls `activate_skill`, with a list of its files;
3. one file at a time with `read_skill_file`; with the sandbox, the skill folders are also lent read-only at
   /skills/<name>, so that their scripts run there.

Loading is lenient, as the spec's guide for clients advises (a name that breaks a naming rule loads, with a
warning; a skill without a description is skipped); `validate` is strict, for skill authors.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from xml.sax.saxutils import escape

import yaml

from ember.agents.tools import Tool, function_tool

log = logging.getLogger("ember.skills")

SKILL_FILE = "SKILL.md"
SANDBOX_ROOT = "/skills"  # where the sandbox sees skill folders: /skills/<name>
NAME_RULE = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")
MAX_NAME, MAX_DESCRIPTION, MAX_COMPATIBILITY = 64, 1024, 500
KNOWN_FIELDS = {"name", "description", "license", "compatibility", "metadata", "allowed-tools"}
SKIPPED_FOLDERS = {"node_modules", "__pycache__"}  # and every hidden folder
MAX_DEPTH, MAX_FOLDERS = 4, 2000  # bounds on one root's search, as a home folder may be huge
MAX_LISTED_FILES = 100
MAX_FILE_CHARS = 64_000


class SkillError(ValueError):
    """A SKILL.md that cannot be loaded at all."""


@dataclass(frozen=True)
class Skill:
    name: str
    description: str
    directory: Path
    license: str | None = None
    compatibility: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    allowed_tools: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()  # where it breaks the spec but still loads

    def instructions(self) -> str:
        """The SKILL.md body, read now, so that an edit shows on the next activation."""
        return split_frontmatter(read_text(self.directory / SKILL_FILE))[1]

    def files(self) -> list[str]:
        """The skill's other files, relative to its folder, sorted; hidden and cache folders are left out."""
        found = []
        for folder, subfolders, names in os.walk(self.directory):
            subfolders[:] = sorted(d for d in subfolders if not skipped(d))
            relative = Path(folder).relative_to(self.directory)
            found += [str(relative / n) for n in names if not n.startswith(".")]
        return sorted(f for f in found if f != SKILL_FILE)


def skipped(folder_name: str) -> bool:
    return folder_name.startswith(".") or folder_name in SKIPPED_FOLDERS


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark some editors write is no text
    except UnicodeDecodeError as e:
        raise SkillError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from e


def split_frontmatter(text: str) -> tuple[str, str]:
    """(the YAML between the opening and closing '---' lines, the Markdown body after them, stripped)."""
    lines = text.splitlines(keepends=True)
    if not lines or lines[0].strip() != "---":
        raise SkillError("SKILL.md must start with YAML frontmatter: a '---' line, name and description, '---'")
    for end in range(1, len(lines)):
        if lines[end].strip() == "---":
            return "".join(lines[1:end]), "".join(lines[end + 1 :]).strip()
    raise SkillError("the frontmatter has no closing '---' line")


def parse_frontmatter(text: str) -> dict[str, Any]:
    """The frontmatter as a mapping. Skills written for other clients often hold plain values with a colon
    (`description: Use when: ...`), which YAML rejects and their parsers accept: those are quoted and retried."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as first:
        try:
            data = yaml.safe_load(quote_values_with_colons(text))
        except yaml.YAMLError:
            raise SkillError(f"the frontmatter is not YAML: {first}") from first
    if not isinstance(data, dict):
        raise SkillError("the frontmatter must be a YAML mapping of fields (name: ..., description: ...)")
    return data


def quote_values_with_colons(text: str) -> str:
    plain_with_colon = re.compile(r"^([A-Za-z][\w-]*):[ \t]+([^'\"|>\s].*:\s.*?)\s*$", re.MULTILINE)
    return plain_with_colon.sub(lambda m: f"{m[1]}: {json.dumps(m[2])}", text)


def load_skill(directory: str | Path) -> Skill:
    """The skill in `directory`, leniently: rules it breaks become `warnings`; a SkillError when it is unusable."""
    directory = Path(directory).resolve()
    path = directory / SKILL_FILE
    if not path.is_file():
        raise SkillError(f"{directory} has no {SKILL_FILE}")
    data = parse_frontmatter(split_frontmatter(read_text(path))[0])
    warnings = []

    description = data.get("description")
    if not isinstance(description, str) or not description.strip():
        raise SkillError("the frontmatter has no description: the model picks skills by their descriptions")
    description = " ".join(description.split())
    if len(description) > MAX_DESCRIPTION:
        warnings.append(f"the description has {len(description)} characters, over the limit of {MAX_DESCRIPTION}")

    name = data.get("name")
    if name is None:
        name = directory.name
        warnings.append(f"the frontmatter has no name; using the folder's, {name!r}")
    if not isinstance(name, str) or not name or "/" in name or name.startswith(".") or not name.isprintable():
        raise SkillError(f"the name {name!r} cannot name a skill (nor its folder in the sandbox)")
    warnings += name_problems(name, directory.name)

    compatibility = data.get("compatibility")
    if compatibility is not None and (not isinstance(compatibility, str) or len(compatibility) > MAX_COMPATIBILITY):
        warnings.append(f"compatibility must be text of at most {MAX_COMPATIBILITY} characters")
        compatibility = str(compatibility)[:MAX_COMPATIBILITY]
    metadata = data.get("metadata") or {}
    if not isinstance(metadata, dict):
        warnings.append("metadata must be a mapping of keys to values")
        metadata = {}
    allowed_tools = data.get("allowed-tools") or ""
    if not isinstance(allowed_tools, str):
        warnings.append("allowed-tools must be one space-separated string")
        allowed_tools = ""
    warnings += [f"unknown field {key!r}" for key in data if key not in KNOWN_FIELDS]
    license_ = data.get("license")
    return Skill(
        name=name,
        description=description,
        directory=directory,
        license=None if license_ is None else str(license_),
        compatibility=compatibility,
        metadata={str(k): str(v) for k, v in metadata.items()},
        allowed_tools=tuple(allowed_tools.split()),
        warnings=tuple(warnings),
    )


def name_problems(name: str, folder: str) -> list[str]:
    problems = []
    if len(name) > MAX_NAME:
        problems.append(f"the name has {len(name)} characters, over the limit of {MAX_NAME}")
    if not NAME_RULE.fullmatch(name):
        problems.append(f"the name {name!r} must be lowercase letters, digits and single hyphens, not at either end")
    if name != folder:
        problems.append(f"the name {name!r} does not match its folder's name {folder!r}")
    return problems


def skill_folders(root: Path) -> Iterator[Path]:
    """Folders holding a SKILL.md at or under `root`: `root` itself when it is a skill, else searched up to
    MAX_DEPTH levels and MAX_FOLDERS folders, not inside a skill nor into hidden or cache folders."""
    if (root / SKILL_FILE).is_file():
        yield root
        return
    seen = 0
    for folder, subfolders, names in os.walk(root):
        seen += 1
        if seen > MAX_FOLDERS:
            log.warning("stopped searching %s for skills after %d folders", root, MAX_FOLDERS)
            return
        here = Path(folder)
        if SKILL_FILE in names and here != root:
            subfolders.clear()
            yield here
            continue
        depth = len(here.relative_to(root).parts)
        subfolders[:] = [] if depth >= MAX_DEPTH else sorted(d for d in subfolders if not skipped(d))


class SkillLibrary:
    """The skills an agent may use, by name."""

    def __init__(self, skills: Iterable[Skill]) -> None:
        self.skills: dict[str, Skill] = {}
        self.active: set[str] = set()  # the skills activated so far, whose allowed-tools are pre-approved
        for skill in skills:
            if skill.name in self.skills:
                raise ValueError(
                    f"two skills are named {skill.name!r}: {self.skills[skill.name].directory} and {skill.directory}"
                )
            self.skills[skill.name] = skill

    @classmethod
    def discover(cls, roots: Iterable[str | Path]) -> SkillLibrary:
        """The skills under `roots` (each a skill folder or a folder of skills). A skill that cannot be loaded is
        skipped with a logged error, a rule it breaks is logged as a warning, and when two share a name the one
        found first (earlier root) wins, as the later one is logged as shadowed."""
        skills: dict[str, Skill] = {}
        for root in roots:
            root = Path(root).expanduser()
            if not root.is_dir():
                raise ValueError(f"skills folder {str(root)!r} does not exist")
            folders = list(skill_folders(root.resolve()))
            for folder in folders:
                try:
                    skill = load_skill(folder)
                except (SkillError, OSError) as e:
                    log.error("skipped the skill in %s: %s", folder, e)
                    continue
                first = skills.setdefault(skill.name, skill)
                if first is skill:
                    for warning in skill.warnings:
                        log.warning("skill %s (%s): %s", skill.name, folder, warning)
                elif first.directory != skill.directory:  # the same folder given twice is no clash
                    log.warning("skill %s in %s is shadowed by the one in %s", skill.name, folder, first.directory)
            if not folders:
                raise ValueError(f"no skills under {str(root)!r}: a skill is a folder with a {SKILL_FILE}")
        return cls(skills.values())

    def __len__(self) -> int:
        return len(self.skills)

    def __iter__(self) -> Iterator[Skill]:
        return iter(self.skills.values())

    def get(self, name: str) -> Skill:
        if name not in self.skills:
            raise ValueError(f"no skill named {name!r}; the skills are: {', '.join(self.skills) or 'none'}")
        return self.skills[name]

    def sandbox_folders(self) -> dict[Path, str]:
        """What a Sandbox lends read-only so that skills' scripts run there: {skill folder: /skills/<name>}."""
        return {skill.directory: f"{SANDBOX_ROOT}/{skill.name}" for skill in self}

    def catalog(self) -> str:
        """Each skill's name and description, as the model sees them before it activates one."""
        entries = [
            f"  <skill>\n    <name>{escape(s.name)}</name>\n    <description>{escape(s.description)}</description>\n"
            "  </skill>"
            for s in self
        ]
        return "<available_skills>\n" + "\n".join(entries) + "\n</available_skills>"

    def activate(self, name: str, in_sandbox: bool = False) -> str:
        """A skill's instructions, where its files are, and which files it has (listed, not read)."""
        skill = self.get(name)
        self.active.add(name)
        files = skill.files()
        listed = "\n".join(f"  <file>{escape(f)}</file>" for f in files[:MAX_LISTED_FILES])
        if len(files) > MAX_LISTED_FILES:
            listed += f"\n  ({len(files) - MAX_LISTED_FILES} more files not listed)"
        if in_sandbox:
            folder = f"{SANDBOX_ROOT}/{skill.name}"
            where = (
                f"This skill's folder is {folder} in the sandbox (read-only), and paths in the skill are relative "
                "to it"
                + (f" ({files[0]} is {folder}/{files[0]})" if files else "")
                + ": run its scripts with run_shell or run_python, from /workspace, the working directory."
            )
        else:
            where = "Paths in the skill are relative to its folder: read its files with read_skill_file."
        parts = [f'<skill_content name="{escape(skill.name)}">', skill.instructions(), "", where]
        if skill.compatibility:
            parts.append(f"Compatibility: {skill.compatibility}")
        if files:
            parts.append(f"<skill_resources>\n{listed}\n</skill_resources>")
        parts.append("</skill_content>")
        return "\n".join(parts)

    def allowed_tools(self) -> set[str]:
        """The tools that the activated skills' `allowed-tools` name: run without asking (`ToolApprovals`)."""
        return {tool for name in self.active for tool in self.skills[name].allowed_tools}

    def read(self, name: str, path: str) -> str:
        """One file of a skill, by its path relative to the skill's folder (or under /skills/<name>/)."""
        skill = self.get(name)
        inside = f"{SANDBOX_ROOT}/{skill.name}/"
        relative = path[len(inside) :] if path.startswith(inside) else path
        target = (skill.directory / relative).resolve()
        if not target.is_relative_to(skill.directory):
            raise ValueError(f"{path!r} is outside the skill's folder; give a path relative to it")
        if not target.is_file():
            files = skill.files()
            shown = ", ".join(files[:20]) + (", ..." if len(files) > 20 else "")
            raise ValueError(f"skill {name!r} has no file {relative!r}; its files: {shown or 'none but SKILL.md'}")
        data = target.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{relative!r} is a binary file ({len(data)} bytes), not text") from None
        if len(text) > MAX_FILE_CHARS:
            return text[:MAX_FILE_CHARS] + f"\n[cut: the file has {len(text)} characters; shown: {MAX_FILE_CHARS}]"
        return text

    def tools(self, in_sandbox: bool = False) -> list[Tool]:
        """activate_skill (the catalog in its description; names constrained to the skills') and read_skill_file.
        `in_sandbox`: the agent also has a Sandbox lending `sandbox_folders()`, so activation says where."""
        if not self.skills:
            return []  # no catalog, no tool: an empty choice only confuses a model
        names = Literal[tuple(self.skills)]  # type: ignore[valid-type]

        async def activate_skill(name: str) -> str:
            return self.activate(name, in_sandbox)

        async def read_skill_file(skill: str, path: str) -> str:
            return self.read(skill, path)

        activate_skill.__annotations__["name"] = names  # an enum in the schema: no skill can be made up
        read_skill_file.__annotations__["skill"] = names
        activate_description = (
            "Load a skill: instructions for a specific kind of task, with its scripts and reference files. When "
            "the task matches a skill's description, call this with the skill's name first, then follow what it "
            f"says.\n{self.catalog()}"
        )
        read_description = (
            "Read one file of a skill (a reference, a template, a script's source), by its path relative to the "
            "skill's folder, as activate_skill lists them."
        )
        return [
            function_tool(activate_skill, description=activate_description),
            function_tool(read_skill_file, description=read_description),
        ]


def validate(directory: str | Path) -> list[str]:
    """Every way the skill in `directory` breaks the spec (empty when it follows it): for skill authors."""
    try:
        return list(load_skill(directory).warnings)
    except (SkillError, OSError) as e:
        return [str(e)]
