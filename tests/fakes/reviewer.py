#!/usr/bin/env python3
"""A fake council member that writes like an author and answers like a reviewer (a `command` agent).

    reviewer.py [--write PATH=TEXT]... [--say TEXT] [--when SUBSTRING=TEXT]... [--junk BYTES]
                [--sleep S] [--record DIR] [--exec JSON_ARGV] [PROMPT]

A review prompt (it starts "You review one candidate") gets an answer: the TEXT of the first
--when whose SUBSTRING is in the prompt, else --say, after --junk bytes of noise. Any other prompt
is a task: the --write files are written. --record saves every prompt it gets in DIR (one JSON
file each: argv, cwd, prompt), so tests can read what a reviewer was shown. --exec runs a command
before a review answers (a reviewer that tries to change what it reviews).
"""

import argparse
import json
import os
import subprocess
import sys
import time
import uuid

p = argparse.ArgumentParser()
p.add_argument("--write", action="append", default=[])
p.add_argument("--say", default="")
p.add_argument("--when", action="append", default=[])
p.add_argument("--junk", type=int, default=0)
p.add_argument("--sleep", type=float, default=0)
p.add_argument("--record")
p.add_argument("--exec", dest="exec_", help="a JSON argv")
p.add_argument("prompt", nargs="?", default="")
a = p.parse_args()

if a.record:
    os.makedirs(a.record, exist_ok=True)
    with open(os.path.join(a.record, f"{uuid.uuid4().hex}.json"), "w") as f:
        json.dump({"argv": sys.argv, "cwd": os.getcwd(), "prompt": a.prompt}, f)
if a.prompt.startswith("You review one candidate"):
    time.sleep(a.sleep)
    if a.exec_:
        subprocess.run(json.loads(a.exec_), check=False)
    answer = next((text for sub, _, text in (w.partition("=") for w in a.when) if sub in a.prompt), a.say)
    for _ in range(a.junk // 1000):
        print("x" * 999, flush=False)
    print(answer, flush=True)
    sys.exit(0)
for spec in a.write:
    path, _, text = spec.partition("=")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(text + "\n")
print("done", flush=True)
