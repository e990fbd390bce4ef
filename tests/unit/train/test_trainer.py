import subprocess
import sys
import textwrap

from tests.conftest import REPO, child_env

# A real gloo group (one rank, a file store), in a process of its own, ended by end_process.
SCRIPT = textwrap.dedent("""
    import atexit, sys, tempfile, threading
    import torch.distributed as dist
    from stepdpo.train.trainer import end_process, finished_on_every_rank

    print("outside a group:", finished_on_every_rank())
    if sys.argv[1] == "group":
        store = tempfile.NamedTemporaryFile(delete=False).name
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        print("in a group:", finished_on_every_rank())
        # a thread the interpreter's teardown would wait for, ten minutes: end_process must not get there
        threading.Thread(target=threading.Event().wait, args=(600,)).start()
    atexit.register(lambda: print("atexit ran, group left:", dist.is_initialized(), flush=True))
    end_process(3)
""")


def run(mode):
    return subprocess.run([sys.executable, "-c", SCRIPT, mode], env=child_env(), capture_output=True, text=True,
                          timeout=120, cwd=REPO)


def test_end_process_after_a_group_runs_the_exit_handlers_and_skips_the_teardown():
    res = run("group")
    assert res.returncode == 3, res.stderr[-3000:]
    assert res.stdout.splitlines() == ["outside a group: False", "in a group: True",
                                       "atexit ran, group left: False"]  # destroyed before the handlers ran


def test_end_process_without_a_group_is_a_plain_exit():
    res = run("alone")
    assert res.returncode == 3, res.stderr[-3000:]
    assert res.stdout.splitlines() == ["outside a group: False", "atexit ran, group left: False"]
