"""Fake runners/spec_runner.py: as the real one, no __EXEC_PHASE__ lines and exit 0 or 1.

Without `--spec-dir` it creates NNN-pending, renames it to NNN-<slug> after the requirements phase
and keeps writing into NNN-pending (the real orchestrator never updates its spec_dir after
rename_spec_dir_from_requirements). Without a `.auto-claude/` in the project it climbs the parent
directories for one and works there.
"""

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))

from fake_common import (NOT_LOGGED_IN, box, get_auth_token, init_auto_claude_dir, load_dotenv, record,
                         write_bookkeeping)

SKIP = {"a", "an", "the", "to", "for", "of", "in", "on", "at", "by", "with", "and", "or", "is", "are", "you", "add",
        "create", "make", "this", "that", "it", "do", "not", "new"}


def slug(task: str) -> str:
    words = re.sub(r"[^a-z0-9 ]", " ", task.lower()).split()
    return "-".join([w for w in words if w not in SKIP and len(w) > 2][:4]) or "spec"


def main() -> int:
    load_dotenv()
    ap = argparse.ArgumentParser()
    for flag in ("--task", "--task-file", "--continue", "--model", "--thinking-level", "--spec-dir", "--base-branch"):
        ap.add_argument(flag)
    ap.add_argument("--complexity", choices=["simple", "standard", "complex"])
    ap.add_argument("--project-dir", type=Path, default=Path.cwd())
    for flag in ("--interactive", "--no-ai-assessment", "--no-build", "--auto-approve", "--direct"):
        ap.add_argument(flag, action="store_true")
    a = ap.parse_args()
    record("spec_runner")
    task = a.task or ""
    project_dir = a.project_dir
    if not (project_dir / ".auto-claude").exists():
        for parent in project_dir.parents:
            if (parent / ".auto-claude").exists():
                project_dir = parent
                break
    specs = init_auto_claude_dir(project_dir) / "specs"
    specs.mkdir(exist_ok=True)
    if a.spec_dir:
        spec_dir = Path(a.spec_dir)
    else:
        numbers = [int(p.name[:3]) for p in specs.iterdir() if p.name[:3].isdigit()]
        spec_dir = specs / f"{max(numbers, default=0) + 1:03d}-pending"
    spec_dir.mkdir(parents=True, exist_ok=True)
    print(box([f"Spec Directory: {spec_dir}", f"Project: {project_dir}"], "SPEC CREATION ORCHESTRATOR"))
    if not get_auth_token():
        print("Error: No OAuth token found.\n\nAuto Claude requires Claude Code OAuth authentication.")
        print("Direct API keys (ANTHROPIC_API_KEY) are not supported.")
        return 1
    write_bookkeeping(project_dir, ".claude_settings.json", ".auto-claude-security.json")
    print("\n  PHASE 1: PROJECT DISCOVERY")
    if "SPEC-401" in task:
        for attempt in range(3):  # each phase retries its agent, then the spec fails
            record("session", step="spec")
            print(NOT_LOGGED_IN, flush=True)
            time.sleep(0.3)
        print("Discovery failed")
        return 1
    if "SPEC-FAIL" in task:
        print("Phase 'quick_spec' failed after 3 retries\n  Errors:\n    → spec.md was not created")
        return 1
    (spec_dir / "requirements.json").write_text(json.dumps({"task_description": task}))
    if "pending" in spec_dir.name:
        renamed = spec_dir.parent / f"{spec_dir.name[:4]}{slug(task)}"
        if not renamed.exists():
            shutil.move(str(spec_dir), str(renamed))
            print(f"Spec folder: {renamed.name}")
    spec_dir.mkdir(parents=True, exist_ok=True)  # the phases after the rename still write here
    (spec_dir / "spec.md").write_text(task)
    subtasks = [{"id": "subtask-1-1", "description": "write hello()", "status": "pending"},
                {"id": "subtask-1-2", "description": "print it", "status": "pending"}]
    plan = {"feature": slug(task), "workflow_type": "feature",
            "phases": [{"id": "phase-1", "name": "Build", "subtasks": subtasks}]}
    (spec_dir / "implementation_plan.json").write_text(json.dumps(plan, indent=2))
    if a.auto_approve:
        (spec_dir / "review_state.json").write_text(json.dumps({"approved": True, "approved_by": "auto"}))
    print(box(["Complexity: SIMPLE", "Phases run: 4", f"Spec saved to: {spec_dir}", "", "Files created:",
               "  ✓ spec.md", "  ✓ implementation_plan.json"], "✓ SPEC CREATION COMPLETE"))
    if not a.no_build:
        run_cmd = [sys.executable, str(Path(__file__).parent.parent / "run.py"), "--spec", spec_dir.name,
                   "--project-dir", str(project_dir), "--auto-continue", *(["--direct"] if a.direct else [])]
        sys.stdout.flush()
        os.execv(sys.executable, run_cmd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
