#!/usr/bin/env python3
"""A fake agent that records what it finds in its worktree: every file (but .git) with its mtime
and content (when short), and the port variables, in seen.json (committed on its branch)."""

import json
import os
import sys
import time

seen = {"cwd": os.getcwd(), "files": {}, "env": {k: v for k, v in os.environ.items() if "PORT" in k}}
for top, dirs, files in os.walk("."):
    dirs[:] = [d for d in dirs if d != ".git"]
    for name in files:
        path = os.path.relpath(os.path.join(top, name))
        st = os.lstat(path)
        with open(path, "rb") as f:
            head = f.read(200)
        seen["files"][path] = {"mtime_ns": st.st_mtime_ns, "text": head.decode(errors="replace")}
time.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else 0)
with open("seen.json", "w") as f:
    json.dump(seen, f)
print("observed", len(seen["files"]), "files", flush=True)
