"""Edits a chat model writes in its reply, read and vetted before anything touches the worktree.

Two shapes: a fenced whole file, and aider-style SEARCH/REPLACE blocks. Measured with
Qwen2.5-Coder 1.5B on ten small tasks, whole files won (10/10 against 4/10: the small model put
new code in SEARCH, or replaced the functions it quoted), so the adapter asks for whole files by
default and reads both. A whole Python file that holds only some of the file's functions and
classes (small models often answer with just the one they changed) replaces those and keeps the
rest. The path comes alone on the line before the block, in the fence's info string (`path=x`),
inside a line of prose ("File to write: x", "I changed `x` to:"), or as a comment on the block's
first line (`# x.py`); a block naming no file is placed only when the files shown leave one choice.

Vetting, so that the local model never writes what the task did not ask for:
- an existing file is matched case-insensitively (`Shapes.py` edits `shapes.py`);
- an edit of an existing file that drops definitions, top-level constants, the `__main__` block or
  most of its lines (unless the task asks to remove or rename), or leaves a "rest of the code"
  placeholder, is refused; so is a SEARCH text that is not in the file. These refusals are fatal:
  nothing is written and the attempt fails;
- a new file is written only when the task names it (its path or its file name); a file whose
  content is an instruction's placeholder is refused. These files are dropped and listed.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")
SEARCH = re.compile(r"^\s*<{5,9}\s*SEARCH\b.*$")
DIVIDER = re.compile(r"^\s*={5,9}\s*$")
REPLACE = re.compile(r"^\s*>{5,9}\s*REPLACE\b.*$")
INFO_PATH = re.compile(r"""^(?:path|file|filename|title)=["']?([^"'\s]+)["']?$""")
PATH = re.compile(r"^(?:~?/)?[\w.@+-]+(?:/[\w.@+-]+)*$")  # absolute ones too, to refuse them by name
EXTENSION = re.compile(r"[^./]\.[A-Za-z][A-Za-z0-9]{0,7}$")
NOT_PATHS = frozenset({"e.g", "i.e", "etc", "vs"})
LABEL = re.compile(r"^(?:[\w -]{0,30}\b)?(?:file(?:name)?|path)(?:\s+to\s+\w+)?\s*:\s*(\S+)\s*$", re.I)
DEFINITION = re.compile(r"^\s*(?:export\s+)?(?:async\s+)?(?:def|class|function|func|fn)\s+([A-Za-z_]\w*)"
                        r"|^([A-Z][A-Z0-9_]*)\s*=", re.M)  # definitions, and constants at the top level
COMMENT = re.compile(r"^\s*(?:#|//|--|/\*|<!--)\s*(.*?)\s*(?:\*/|-->)?\s*$")
MAIN_GUARD = re.compile(r"""__name__\s*==\s*["']__main__["']""")
ELIDED = re.compile(r"^\s*(?:#|//|/\*|<!--|\.\.\.)[^\n]*\b(?:existing|rest of|unchanged|remain\w*|same as|previous"
                    r"|other (?:code|functions|methods))\b", re.I | re.M)
SHRINK_OK = re.compile(r"\b(remove|delete|drop|shorten|simplif\w*|trim|clean\w*|strip|replace the (?:whole|entire))\b",
                       re.I)
REMOVAL = re.compile(r"\b(renam\w*|remov\w*|delet\w*|drop\w*|mov\w*|replac\w*|merg\w*|inlin\w*)\b", re.I)


@dataclass
class Edit:
    path: str  # as the model wrote it
    content: str | None = None  # a whole file
    blocks: list[tuple[str, str]] = field(default_factory=list)  # SEARCH/REPLACE pairs, in order


@dataclass
class Reply:
    edits: list[Edit]
    broken: list[dict]  # {path, reason}: blocks that never close
    prose: str


def _clean(token: str) -> str:
    return token.strip("*_`'\"()[]<>,;:!?").rstrip(".")


def _pathlike(token: str, known: set[str]) -> bool:
    if not token or token.lower() in NOT_PATHS or not PATH.match(token):
        return False
    return "/" in token or bool(EXTENSION.search(token)) or token.lower() in known


def path_in_line(line: str, known: set[str] = frozenset(), prose: bool = True) -> str | None:
    """The path a line introduces: a path alone (maybe as a heading, bold, quoted or after a label
    like "File to write:"), or, with `prose`, a path inside a sentence that ends with a colon."""
    known = {k.lower() for k in known}
    text = re.sub(r"^(?:#+\s*|[-*+]\s+|\d+[.)]\s+)+", "", re.sub(r"\*\*|__", "", line.strip())).strip()
    bare = _clean(text.strip("*_`'\" :"))
    if _pathlike(bare, known) or (PATH.match(bare) and bare.lower() in known):
        return bare
    label = LABEL.match(text.strip("*_ "))
    if label and _pathlike(_clean(label.group(1)), known):
        return _clean(label.group(1))
    if not prose or not text.rstrip("*_ ").endswith(":"):
        return None
    quoted = [_clean(q) for q in re.findall(r"`([^`\s]+)`", text)]
    for token in quoted:
        if _pathlike(token, known):
            return token
    words = [_clean(w) for w in text.split()]
    candidates = [w for w in words if _pathlike(w, known)]
    existing = [w for w in candidates if w.lower() in known]
    return (existing or candidates or [None])[0]


def _comment_path(line: str, known: set[str]) -> str | None:
    """A path named by a comment on a block's first line (`# shapes.py`, `// New file: a.js`)."""
    m = COMMENT.match(line)
    return path_in_line(m.group(1), known, prose=False) if m else None


def _guess_path(body: list[str], blocks: list[tuple[str, str]], shown: dict[str, str]) -> str | None:
    """The file a block that names none is for, when the files the model was shown leave one
    choice: the one holding the first SEARCH text, or the one whose every definition the whole
    block repeats (a rewrite of it, not a usage example)."""
    if blocks:
        first = blocks[0][0].strip()
        hits = [p for p, text in shown.items() if first and first in text] if first else []
        return hits[0] if len(hits) == 1 else (next(iter(shown)) if len(shown) == 1 else None)
    text = "\n".join(body)
    hits = [p for p, old in shown.items() if (names := set(DEFINITION.findall(old)))
            and names <= set(DEFINITION.findall(text))]
    return hits[0] if len(hits) == 1 else None


def _path_above(lines: list[str], i: int, known: set[str], skip_fence: bool = False) -> str | None:
    """The path on the nearest non-blank line above line i (two lines at most)."""
    seen = 0
    for j in range(i - 1, -1, -1):
        line = lines[j].strip()
        if not line or (skip_fence and FENCE.match(lines[j])):
            continue
        seen += 1
        if found := path_in_line(line, known):
            return found
        if seen >= 2:
            return None
    return None


def _blocks(body: list[str]) -> tuple[list[tuple[str, str]], str | None]:
    """SEARCH/REPLACE pairs in some lines, or why they are broken."""
    pairs, i = [], 0
    while i < len(body):
        if not SEARCH.match(body[i]):
            i += 1
            continue
        div = next((j for j in range(i + 1, len(body)) if DIVIDER.match(body[j])), None)
        end = next((j for j in range(div + 1, len(body)) if REPLACE.match(body[j])), None) if div else None
        if end is None:
            return pairs, "a SEARCH/REPLACE block is not closed with >>>>>>> REPLACE"
        pairs.append(("\n".join(body[i + 1:div]), "\n".join(body[div + 1:end])))
        i = end + 1
    return pairs, None


def _fence_end(lines: list[str], i: int, fence: str) -> int | None:
    return next((j for j in range(i + 1, len(lines)) if lines[j].strip() and set(lines[j].strip()) == {fence[0]}
                 and len(lines[j].strip()) >= len(fence)), None)


def parse_reply(reply: str, known: set[str] = frozenset(), shown: dict[str, str] | None = None,
                new: list[str] = ()) -> Reply:
    """The edits in a model's reply, the blocks it left open, and the prose around them. To place
    a block that names no file: `shown` (path -> content) are the files the model saw, `new` the
    files the task asks to create; the one block of a reply for a task that names one new file is
    that file."""
    shown = shown or {}
    loose: list[str] = []
    lines = reply.split("\n")
    edits: list[Edit] = []
    broken: list[dict] = []
    prose: list[str] = []
    last_path = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if SEARCH.match(line):  # a SEARCH/REPLACE block outside any fence
            end = next((j for j in range(i + 1, len(lines)) if REPLACE.match(lines[j])), None)
            pairs, why = _blocks(lines[i:(end + 1 if end is not None else len(lines))])
            path = _path_above(lines, i, known) or last_path or _guess_path([], pairs, shown)
            if why or not path:
                broken.append({"path": path or "?", "reason": why or "a SEARCH/REPLACE block names no file"})
                if end is None:
                    break
            else:
                edits.append(Edit(path, blocks=pairs))
                last_path = path
            _drop_path_line(prose, path)
            i = (end if end is not None else len(lines)) + 1
            continue
        m = FENCE.match(line)
        if not m or (m.group(1)[0] == "`" and "`" in m.group(2)):
            prose.append(line)
            i += 1
            continue
        fence, info = m.group(1), m.group(2).split()
        end = _fence_end(lines, i, fence)
        body = lines[i + 1:end if end is not None else len(lines)]
        path = _info_path(info, known) or _path_above(lines, i, known)
        has_blocks = any(SEARCH.match(b) for b in body)
        first = next((k for k, b in enumerate(body) if b.strip()), None)
        if first is not None and (named := _comment_path(body[first], known)):
            path, body = path or named, body[first + 1:]
        if has_blocks and not path:
            path = last_path or _guess_path(body, _blocks(body)[0], shown)
        elif not path and end is not None:
            path = _guess_path(body, [], shown)
            if not path and body:
                loose.append("\n".join(body) + "\n")
        _drop_path_line(prose, path)
        if end is None:
            if path:
                broken.append({"path": path, "reason": "its code block never closes (the reply was cut off?)"})
            break
        if path and has_blocks:
            pairs, why = _blocks(body)
            if why:
                broken.append({"path": path, "reason": why})
            else:
                edits.append(Edit(path, blocks=pairs))
        elif path:
            edits.append(Edit(path, content="\n".join(body) + "\n" if body else ""))
        if path:
            last_path = path
        i = end + 1
    if len(new) == 1 and len(loose) == 1 and not edits and not broken:
        edits.append(Edit(new[0], content=loose[0]))
    return Reply(edits, broken, "\n".join(prose).strip())


def _info_path(info: list[str], known: set[str]) -> str | None:
    for token in info:
        if m := INFO_PATH.match(token):
            return m.group(1)
        candidate = token.split(":", 1)[1] if ":" in token else token
        if ("/" in candidate or "." in candidate) and _pathlike(_clean(candidate), {k.lower() for k in known}):
            return _clean(candidate)
    return None


def _drop_path_line(prose: list[str], path: str | None) -> None:
    while prose and not prose[-1].strip():
        prose.pop()
    if path and prose and path in prose[-1] and len(prose[-1].strip()) <= len(path) + 40:
        prose.pop()


def resolve(rel: str, known: list[str], root: Path) -> str:
    """The tracked file a model meant: exact, else the one differing only in case, else (for a bare
    file name) the one tracked file of that name; otherwise the path as written (a new file)."""
    rel = rel[2:] if rel.startswith("./") else rel
    if rel in known or (root / rel).exists():
        return rel
    same = [k for k in known if k.lower() == rel.lower()]
    if len(same) == 1:
        return same[0]
    if "/" not in rel:
        named = [k for k in known if PurePosixPath(k).name.lower() == rel.lower()]
        if len(named) == 1:
            return named[0]
    return rel


def replace_once(text: str, search: str, replace: str) -> str | None:
    """`text` with the one occurrence of `search` replaced: exactly, else line by line ignoring
    trailing whitespace, else ignoring a uniform indentation difference. None when it is not there
    exactly once."""
    if text.count(search) == 1:
        return text.replace(search, replace, 1)
    lines, want = text.split("\n"), [s.rstrip() for s in search.strip("\n").split("\n")]
    if not any(want):
        return None
    hits = [i for i in range(len(lines) - len(want) + 1)
            if [x.rstrip() for x in lines[i:i + len(want)]] == want]
    indent = ""
    if not hits:  # the model dropped or added the same indentation on every line
        stripped = [w.strip() for w in want]
        hits = [i for i in range(len(lines) - len(want) + 1)
                if [x.strip() for x in lines[i:i + len(want)]] == stripped]
        if len(hits) == 1:
            first = lines[hits[0]]
            indent = first[:len(first) - len(first.lstrip())]
            base = want[0][:len(want[0]) - len(want[0].lstrip())]
            new = [indent + r[len(base):] if r.startswith(base) else indent + r.lstrip()
                   for r in replace.strip("\n").split("\n")] if replace.strip("\n") else []
            return "\n".join(lines[:hits[0]] + new + lines[hits[0] + len(want):])
    if len(hits) != 1:
        return None
    new = replace.strip("\n").split("\n") if replace.strip("\n") else []
    return "\n".join(lines[:hits[0]] + new + lines[hits[0] + len(want):])


def names(text: str) -> set[str]:
    return {a or b for a, b in DEFINITION.findall(text)}


DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _unit(n: ast.stmt, first: bool) -> tuple | None:
    """What a top-level statement defines, for merging; None for any other statement."""
    if isinstance(n, DEFS):
        return ("def", n.name)
    if isinstance(n, (ast.Import, ast.ImportFrom)):
        return ("import", ast.unparse(n))
    if isinstance(n, ast.Assign) and all(isinstance(t, ast.Name) for t in n.targets):
        return ("assign", tuple(t.id for t in n.targets))
    if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name):
        return ("assign", (n.target.id,))
    if isinstance(n, ast.If) and MAIN_GUARD.search(ast.unparse(n.test)):
        return ("main",)
    if first and isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str):
        return ("doc",)
    return None


def merge_definitions(old: str, snippet: str) -> str | None:
    """A Python file with what `snippet` defines put in: each function, class, constant, the
    docstring and the `__main__` block replace their namesakes (methods one by one in a class the
    snippet shows only in part), new ones go where they belong, new imports with the imports.
    None unless both parse and the snippet holds nothing else. Small models asked for a whole file
    often answer with just what they changed, or a whole file minus a function; this keeps the rest."""
    try:
        before, after = ast.parse(old), ast.parse(snippet)
    except (SyntaxError, ValueError):
        return None
    units = [(_unit(n, i == 0), n) for i, n in enumerate(after.body)]
    if not units or any(k is None for k, _ in units) or all(k[0] == "import" for k, _ in units):
        return None
    lines, piece = old.splitlines(keepends=True), snippet.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"

    def span(n) -> tuple[int, int]:
        return min([n.lineno, *(d.lineno for d in getattr(n, "decorator_list", []))]) - 1, n.end_lineno

    def text(n) -> str:
        start, end = span(n)
        return "".join(piece[start:end]).rstrip("\n") + "\n"

    olds = {}
    for i, n in enumerate(before.body):
        olds.setdefault(_unit(n, i == 0), n)
    code = next((span(n)[0] for n in before.body if _unit(n, False) and _unit(n, False)[0] in ("def", "main")),
                len(lines))
    main = span(olds[("main",)])[0] if ("main",) in olds else len(lines)
    first_import = next((span(n)[0] for n in before.body if isinstance(n, (ast.Import, ast.ImportFrom))),
                        span(olds[("doc",)])[1] if ("doc",) in olds else 0)
    replace: list[tuple[tuple[int, int], str]] = []
    insert: dict[int, list[str]] = {}
    for key, n in units:
        old_node = olds.get(key)
        if key[0] == "import":
            if old_node is None:
                insert.setdefault(first_import, []).append(text(n))
        elif old_node is None:
            at, gap = {"def": (main, "\n\n"), "assign": (code, "\n"), "main": (len(lines), "\n\n"),
                       "doc": (0, "\n")}[key[0]]
            before_gap, after_gap = ("\n\n", "") if at == len(lines) else ("", gap)
            insert.setdefault(at, []).append(before_gap + text(n) + after_gap)
        elif isinstance(n, ast.ClassDef) and isinstance(old_node, ast.ClassDef) and (
                {m.name for m in old_node.body if isinstance(m, DEFS)} - {m.name for m in n.body if isinstance(m, DEFS)}):
            # a class with only the methods that changed or are new: merge them into the class
            methods = {m.name: span(m) for m in old_node.body if isinstance(m, DEFS)}
            for m in (m for m in n.body if isinstance(m, DEFS)):
                if m.name in methods:
                    replace.append((methods[m.name], text(m)))
                else:
                    insert.setdefault(old_node.end_lineno, []).append("\n" + text(m))
        else:
            replace.append((span(old_node), text(n)))
    edits = [((start, 1), end, new) for (start, end), new in replace]
    edits += [((at, 0), at, "".join(texts)) for at, texts in insert.items()]
    for (start, _), end, new in sorted(edits, key=lambda e: e[0], reverse=True):
        lines[start:end] = [new]
    return "".join(lines)


def dropped_code(old: str, new: str, prompt: str) -> str | None:
    """Why a whole-file rewrite loses code the task did not ask to remove, or None."""
    asked = {w.lower() for w in re.findall(r"\w+", prompt)} if REMOVAL.search(prompt) else set()
    lost = sorted({n for n in names(old) if n.lower() not in asked} - names(new),
                  key=old.find)
    if lost:
        return f"drops {', '.join(lost[:8])}"
    if MAIN_GUARD.search(old) and not MAIN_GUARD.search(new) and "main" not in asked:
        return "drops the `if __name__ == \"__main__\"` block"
    placeholder = next((m.group(0).strip() for m in ELIDED.finditer(new) if m.group(0).strip() not in old), None)
    if placeholder:
        return f"leaves a placeholder instead of code ({placeholder[:60]!r})"
    before, after = (sum(1 for x in t.splitlines() if x.strip()) for t in (old, new))
    if before >= 8 and after < before / 2 and not SHRINK_OK.search(prompt):
        return f"shrinks it from {before} to {after} lines"
    return None


def new_files(prompt: str, known: list[str]) -> list[str]:
    """The files a task names that do not exist yet."""
    have = {k.lower() for k in known} | {PurePosixPath(k).name.lower() for k in known}
    found = [_clean(w) for w in prompt.split()]
    return list(dict.fromkeys(w for w in found if _pathlike(w, set()) and EXTENSION.search(w)
                              and w.lower() not in have and not w.startswith(("/", "~"))))


def named_in(prompt: str, rel: str) -> bool:
    """Whether the task names a file: its path or its file name, as a word of the prompt."""
    low = prompt.lower()
    for name in {rel.lower(), PurePosixPath(rel).name.lower()}:
        if re.search(rf"(?<![\w./-]){re.escape(name)}(?![\w/-])", low):
            return True
    return False


@dataclass
class Plan:
    """What to write (path -> content), files dropped with a reason, and fatal problems: when
    there is any, nothing is written and the attempt fails."""

    writes: dict[str, str] = field(default_factory=dict)
    dropped: list[dict] = field(default_factory=list)
    fatal: list[dict] = field(default_factory=list)


def plan(root: Path, edits: list[Edit], prompt: str, known: list[str], placeholder, safe_target) -> Plan:
    """Check every edit against the worktree as it is. `placeholder(text)` says whether a text is
    an instruction's placeholder; `safe_target(root, rel)` -> (Path | None, why not)."""
    out = Plan()
    originals: dict[str, str | None] = {}
    for edit in edits:
        rel = resolve(edit.path, known, root)
        target, why = safe_target(root, rel)
        if target is None:
            out.dropped.append({"path": edit.path, "reason": why})
            continue
        if rel not in originals:
            try:
                originals[rel] = target.read_text(encoding="utf-8") if target.is_file() else None
            except (OSError, UnicodeDecodeError) as e:
                out.fatal.append({"path": rel, "reason": f"cannot read it: {e}"})
                continue
        original = originals[rel]
        current = out.writes.get(rel, original)
        texts = [edit.content] if edit.content is not None else [t for pair in edit.blocks for t in pair]
        if any(placeholder(t) for t in texts):
            out.dropped.append({"path": edit.path, "reason": "its content is the instructions' placeholder"})
            continue
        if original is None and not named_in(prompt, rel):
            out.dropped.append({"path": rel, "reason": "a new file the task does not name"})
            continue
        if edit.content is not None:
            text = edit.content
            if current is not None and rel.endswith(".py") and not REMOVAL.search(prompt):
                text = merge_definitions(current, text) or text
        else:
            text, why = apply_blocks(current, edit.blocks)
            if text is None:
                out.fatal.append({"path": rel, "reason": why})
                continue
        if original is not None and (why := dropped_code(original, text, prompt)):
            out.fatal.append({"path": rel, "reason": f"the edit {why}"})
            continue
        out.writes[rel] = text
    return out


def apply_blocks(text: str | None, blocks: list[tuple[str, str]]) -> tuple[str | None, str]:
    """A file's text with SEARCH/REPLACE blocks applied in order (an empty SEARCH creates a new
    file), or None and why not."""
    for search, replace in blocks:
        if not search.strip():
            if text is not None:
                return None, "an empty SEARCH for a file that exists"
            text = replace + ("\n" if replace and not replace.endswith("\n") else "")
            continue
        if text is None:
            return None, "a SEARCH/REPLACE for a file that does not exist"
        new = replace_once(text, search, replace)
        if new is None:
            found = "more than once" if text.count(search) > 1 else "not found"
            return None, f"SEARCH text {found}: {search.strip()[:80]!r}"
        text = new
    return text, ""
