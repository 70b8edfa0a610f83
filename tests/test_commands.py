"""Every command a learner types answers bad input with one clear line naming the fix and a non-zero exit, never a
traceback. The commands run as a learner runs them (a fresh interpreter each); they run concurrently."""

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

CASES = {  # argv after "python -m" -> words the one line must contain
    "train: a corpus that does not exist": (["labs_lib.train", "--profile", "ci", "--out", "{tmp}/a", "--data",
                                             "/no/such/folder"], "--data: corpus /no/such/folder does not exist"),
    "train: a context longer than the data": (["labs_lib.train", "--profile", "ci", "--out", "{tmp}/b", "--data",
                                               "{tmp}/tiny.txt", "--max-steps", "6", "--no-progress"],
                                              "lower batch_size or seq_len (block_size), or use more data"),
    "train: an unknown profile": (["labs_lib.train", "--profile", "nosuch", "--out", "{tmp}/c"],
                                  "unknown profile 'nosuch'"),
    "train: --init-from a run that does not exist": (["labs_lib.train", "--profile", "ci", "--out", "{tmp}/d",
                                                      "--init-from", "/no/run"], "--init-from: /no/run does not exist"),
    "generate: no such run": (["labs_lib.generate", "--checkpoint", "/no/run"], "pass a run folder"),
    "export: no such run": (["labs_lib.export", "--checkpoint", "/no/run", "--format", "hf", "--out", "{tmp}/e"],
                            "pass a run folder"),
    "deploy: no such run": (["labs_lib.deploy", "serve", "--checkpoint", "/no/run"], "pass a run folder"),
    "planner: an unknown model": (["labs_lib.planner", "--model", "nosuch"], "unknown model preset 'nosuch'"),
    "grading: no submissions": (["labs_lib.grading", "collect", "/no/zip"], "no submissions at /no/zip"),
    "survey summary: no folder": (["labs_lib.labs.lab12", "/no/dir"], "no survey folder /no/dir"),
    "tensorboard: no runs folder": (["labs_lib.measure.tensorboard", "/no/runs"], "no folder /no/runs"),
}


def test_bad_input_gets_one_clear_line(tmp_path):
    (tmp_path / "tiny.txt").write_text("hi there\n")

    def run(argv):
        argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
        return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=300)

    with ThreadPoolExecutor(4) as pool:
        results = dict(zip(CASES, pool.map(run, [argv for argv, _ in CASES.values()])))
    problems = []
    for name, (_, words) in CASES.items():
        result = results[name]
        said = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
        if result.returncode == 0 or len(said) != 1 or words not in said[0]:
            problems.append(f"{name}: exit {result.returncode}, said {len(said)} line(s): {said[-3:]}")
    assert not problems, "\n".join(problems)
