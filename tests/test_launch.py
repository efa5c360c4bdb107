"""The launchers (launch/tpu_pod.sh, launch/gpu_multinode.sh, launch/pack.sh): their dry runs print the
commands they would run, those commands quote what the user gave, and bad arguments are refused in one
line with exit 2 before anything runs."""
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _launch(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`launch/<script> --dry-run args` with `env` over this environment (SLURM's variables removed)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    full_env.update(env or {})
    return subprocess.run(["bash", str(REPO / "launch" / script), "--dry-run", *args], env=full_env,
                          capture_output=True, text=True, timeout=30)


def _dry(script: str, *args: str, env: dict | None = None) -> list[str]:
    out = _launch(script, *args, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()


def _refused(script: str, *args: str, env: dict | None = None) -> str:
    """A launcher refusing its arguments: exit 2, nothing printed to run, one line on stderr (returned)."""
    out = _launch(script, *args, env=env)
    assert out.returncode == 2 and out.stdout == "" and len(out.stderr.splitlines()) == 1, (out.stdout, out.stderr)
    return out.stderr.strip()


def _stand_in_python(tmp_path: Path) -> tuple[Path, Path]:
    """(a home holding `my dir`, a python at a path with a space that prints its folder and arguments)."""
    home = tmp_path / "home"
    (home / "my dir").mkdir(parents=True)
    python = tmp_path / "my env" / "python"
    python.parent.mkdir()
    python.write_text('#!/bin/sh\necho "$PWD"; printf "<%s>" "$@"\n')
    python.chmod(0o755)
    return home, python


def test_tpu_pod_dry_run():
    lines = _dry("tpu_pod.sh", "--tpu", "my-pod", "--zone", "us-east5-b", "--project", "proj", "--sync",
                 "--", "--config", "configs/align_10b.yaml", "train.steps=10")
    assert lines[0] == f"bash {REPO}/launch/pack.sh /tmp/bmgpt_jax_sync.tar.gz"
    assert lines[1] == ("gcloud compute tpus tpu-vm scp /tmp/bmgpt_jax_sync.tar.gz my-pod:/tmp/bmgpt_jax_sync.tar.gz "
                        "--zone=us-east5-b --project=proj --worker=all")
    assert "'--command=mkdir -p ~/bmgpt_jax && tar -xzf /tmp/bmgpt_jax_sync.tar.gz -C ~/bmgpt_jax" in lines[2]
    assert lines[-1].startswith("gcloud compute tpus tpu-vm ssh my-pod --zone=us-east5-b --project=proj --worker=all")
    assert "BMGPT_DISTRIBUTED=auto python -m bmgpt_jax.train --config configs/align_10b.yaml train.steps=10" in lines[-1]


def test_tpu_pod_quotes_the_folder_and_python_on_the_workers(tmp_path):
    """--dir and --python are one word each in the workers' commands (a space split them), a leading ~/
    still the worker's home: each printed --command run here (HOME a stand-in) reaches the stand-in python."""
    home, python = _stand_in_python(tmp_path)
    lines = _dry("tpu_pod.sh", "--tpu", "t", "--zone", "z", "--dir", "~/my dir", "--python", str(python), "--sync",
                 "--setup", "--", "--config", "a b.yaml")
    commands = [word.removeprefix("--command=") for line in lines for word in shlex.split(line)
                if word.startswith("--command=")]
    assert commands[0].startswith("mkdir -p ~/'my dir' && tar -xzf /tmp/bmgpt_jax_sync.tar.gz -C ~/'my dir' && ")
    ran = [subprocess.run(["bash", "-c", command], env={"HOME": str(home), "PATH": os.environ["PATH"]},
                          capture_output=True, text=True, timeout=30) for command in commands[1:]]
    assert [(r.returncode, r.stdout) for r in ran] == [
        (0, f"{home}/my dir\n<-m><pip><install><-e><.[tpu]>"),
        (0, f"{home}/my dir\n<-m><bmgpt_jax.train><--config><a b.yaml>")], [r.stderr for r in ran]


def test_pack_carries_what_git_carries(tmp_path):
    """`launch/pack.sh` (what `tpu_pod.sh --sync` sends): tracked files and untracked ones git does not
    ignore, never the ignored (.venv/, runs/) nor a tracked file deleted in the work tree; outside git,
    everything but .git/, .venv/, runs/, caches."""
    import tarfile

    def tree(root: Path, git: bool) -> Path:
        (root / "launch").mkdir(parents=True)
        shutil.copy(REPO / "launch" / "pack.sh", root / "launch" / "pack.sh")
        for name in ("pkg/a.py", "pkg/gone.py", "new.py", ".venv/lib/big.so", "runs/x/ckpt", "pkg/__pycache__/a.pyc"):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(name)
        (root / ".gitignore").write_text(".venv/\n/runs/\n__pycache__/\n")
        if git:
            subprocess.run(["git", "init", "-q"], cwd=root, check=True)
            subprocess.run(["git", "add", ".gitignore", "launch", "pkg"], cwd=root, check=True)
            (root / "pkg" / "gone.py").unlink()
        return root

    def packed(root: Path) -> list[str]:
        """The files in the tarball, which `--dry-run` lists beforehand without writing anything."""
        out = tmp_path / f"{root.name}.tar.gz"
        dry = subprocess.run(["bash", str(root / "launch" / "pack.sh"), "--dry-run", str(out)], capture_output=True,
                             text=True, timeout=60)
        assert dry.returncode == 0 and not out.exists(), dry.stderr
        run = subprocess.run(["bash", str(root / "launch" / "pack.sh"), str(out)], capture_output=True, text=True,
                             timeout=60)
        assert run.returncode == 0, run.stderr
        with tarfile.open(out) as t:
            files = sorted(n.removeprefix("./") for n in t.getnames() if t.getmember(n).isfile())
        assert sorted(dry.stdout.splitlines()) == files
        assert dry.stderr == f"pack.sh: dry run: {len(files)} files would go in {out} (nothing written)\n"
        return files

    assert packed(tree(tmp_path / "git", True)) == [".gitignore", "launch/pack.sh", "new.py", "pkg/a.py"]
    assert packed(tree(tmp_path / "plain", False)) == [".gitignore", "launch/pack.sh", "new.py", "pkg/a.py",
                                                       "pkg/gone.py"]
    usage = subprocess.run(["bash", str(REPO / "launch" / "pack.sh")], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 2 and "launch/pack.sh OUT.tar.gz" in usage.stdout


@pytest.mark.parametrize("git", [True, False])
def test_pack_into_the_tree_leaves_the_tarball_out(tmp_path, git):
    """`launch/pack.sh OUT` with OUT inside the tree, twice: outside git tar read the archive it was writing
    (exit 1), in git the second pack carried the first's tarball; now neither pack holds OUT."""
    import tarfile
    root = tmp_path / "tree"
    (root / "launch").mkdir(parents=True)
    shutil.copy(REPO / "launch" / "pack.sh", root / "launch" / "pack.sh")
    (root / "a.py").write_text("a")
    if git:
        subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    scratch = tmp_path / "scratch"       # where the tarball is written before it is moved to OUT
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    for _ in range(2):
        run = subprocess.run(["bash", "launch/pack.sh", "sync.tar.gz"], cwd=root, capture_output=True, text=True,
                             env=env, timeout=60)
        assert run.returncode == 0 and run.stderr == f"pack.sh: 2 files in {root}/sync.tar.gz\n", run.stderr
        with tarfile.open(root / "sync.tar.gz") as t:
            assert sorted(n.removeprefix("./") for n in t.getnames() if t.getmember(n).isfile()) == [
                "a.py", "launch/pack.sh"]
    dry = subprocess.run(["bash", "launch/pack.sh", "--dry-run", "sync.tar.gz"], cwd=root, capture_output=True,
                         text=True, timeout=60)
    assert dry.stdout.splitlines() == ["a.py", "launch/pack.sh"], dry.stderr
    assert list(scratch.iterdir()) == []

def test_gpu_multinode_dry_run():
    lines = _dry("gpu_multinode.sh", "--hosts", "node0,node1", "--gpus-per-node", "2", "--per-gpu",
                 "--port", "4321", "--", "--config", "configs/finetune_10b.yaml")
    assert len(lines) == 4  # 2 nodes x 2 GPUs, one process each
    for rank, line in enumerate(lines):
        host = f"node{rank // 2}"
        assert line.startswith(f"ssh {host} ")
        for part in ("JAX_COORDINATOR_ADDRESS=node0:4321", "JAX_NUM_PROCESSES=4", f"JAX_PROCESS_ID={rank}",
                     f"CUDA_VISIBLE_DEVICES={rank % 2}", "python -m bmgpt_jax.train --config configs/finetune_10b.yaml"):
            assert part in line, (part, line)
    lines = _dry("gpu_multinode.sh", "--slurm", "--nodes", "4", "--", "--config", "c.yaml")
    assert lines == [f"srun --nodes=4 --ntasks-per-node=1 bash -c 'cd {REPO} && export JAX_COORDINATOR_ADDRESS=$("
                     "scontrol show hostnames \"${SLURM_STEP_NODELIST:-$SLURM_JOB_NODELIST}\" | head -n1):12355 && exec "
                     "python -m bmgpt_jax.train --config c.yaml'"]


def test_launchers_refuse_an_option_without_its_value():
    """An option's value missing (at the end, or the next option taken for it) is named, not a bash error."""
    for script, args, message in [
            ("tpu_pod.sh", ["--tpu", "--sync", "--zone", "z"], "--tpu needs a value, not --sync"),
            ("tpu_pod.sh", ["--tpu", "t", "--zone"], "--zone needs a value"),
            ("tpu_pod.sh", ["--tpu", "t", "--zone", "z", "--dir", ""], "--dir needs a value"),
            ("gpu_multinode.sh", ["--hosts"], "--hosts needs a value"),
            ("gpu_multinode.sh", ["--hosts", "a", "--port", "--", "x"], "--port needs a value, not --")]:
        assert _refused(script, *args) == f"{script}: {message}"


def test_gpu_multinode_refuses_bad_numbers_and_empty_hosts():
    """Counts and the port are positive whole numbers (0 GPUs launched nothing and exited 0, `abc` stopped
    bash); a host list with an empty entry (it ran `ssh ''`) or a space is refused."""
    for args, message in [
            (["--hosts", "a", "--gpus-per-node", "0", "--per-gpu"],
             "--gpus-per-node takes a positive whole number, not 0"),
            (["--hosts", "a", "--gpus-per-node", "abc"], "--gpus-per-node takes a positive whole number, not abc"),
            (["--hosts", "a", "--port", "abc"], "--port takes a positive whole number, not abc"),
            (["--hosts", "a", "--port", "70000"], "--port 70000 is not a port (1-65535)"),
            (["--slurm", "--nodes", "-1"], "--nodes takes a positive whole number, not -1"),
            (["--hosts", "node0,,node1"], "--hosts node0,,node1 has an empty entry"),
            (["--hosts", "node0,"], "--hosts node0, has an empty entry"),
            (["--hosts", "node0, node1"], "--hosts 'node0, node1' has a space: give h0,h1,... as one word")]:
        assert _refused("gpu_multinode.sh", *args) == f"gpu_multinode.sh: {message}"


def test_gpu_multinode_hosts_and_slurm_exclude_each_other():
    """--hosts under --slurm was silently ignored, and so was --nodes with --hosts: both are refused. Inside
    a SLURM job the job's node count still serves --slurm and does not trouble --hosts."""
    assert _refused("gpu_multinode.sh", "--slurm", "--nodes", "2", "--hosts", "a,b") == (
        "gpu_multinode.sh: --hosts and --slurm exclude each other (under --slurm, srun runs on the job's nodes)")
    assert _refused("gpu_multinode.sh", "--hosts", "a,b", "--nodes", "2") == (
        "gpu_multinode.sh: --nodes goes with --slurm (with --hosts, each host is a node)")
    job = {"SLURM_JOB_NUM_NODES": "3"}
    assert _dry("gpu_multinode.sh", "--slurm", env=job)[0].startswith("srun --nodes=3 ")
    assert len(_dry("gpu_multinode.sh", "--hosts", "a,b", env=job)) == 2


def test_gpu_multinode_coordinator_is_the_first_host_as_the_others_reach_it(tmp_path):
    """ssh's user@ is no part of the coordinator's address; a first host that is this machine (localhost)
    while another host is remote becomes `hostname -f` (a stand-in here), as localhost would have sent the
    remote processes to themselves; no name for this machine but localhost is refused."""
    def hostname(name: str) -> dict:  # an environment whose `hostname -f` says name
        (tmp_path / "hostname").write_text(f"#!/bin/sh\necho {name}\n")
        (tmp_path / "hostname").chmod(0o755)
        return {"PATH": f"{tmp_path}:{os.environ['PATH']}"}

    def coordinators(hosts: str) -> list[str]:
        lines = _dry("gpu_multinode.sh", "--hosts", hosts, "--port", "4321", env=hostname("head.example"))
        return [re.search(r"JAX_COORDINATOR_ADDRESS=(\S+)", line)[1] for line in lines]

    assert coordinators("alice@node0,alice@node1") == ["node0:4321"] * 2
    assert coordinators("localhost,node1") == ["head.example:4321"] * 2
    assert coordinators("alice@localhost,node1") == ["head.example:4321"] * 2
    assert coordinators("localhost,127.0.0.1") == ["localhost:4321"] * 2   # every process here
    assert coordinators("node0,localhost") == ["node0:4321"] * 2
    refused = _refused("gpu_multinode.sh", "--hosts", "localhost,node1", env=hostname("localhost.localdomain"))
    assert refused == ("gpu_multinode.sh: the first host (localhost) is the coordinator node1 connects to, and "
                       "hostname -f gives this machine no other name: put first a host named as the others reach it")


def test_gpu_multinode_quotes_the_folder_and_python_on_the_nodes(tmp_path):
    """As tpu_pod.sh: --dir (quoted, but ~/my dir was taken literally) and --python (a space split it) are
    one word each, a leading ~/ the node's home; the printed command run here reaches the stand-in python."""
    home, python = _stand_in_python(tmp_path)
    [line] = _dry("gpu_multinode.sh", "--hosts", "localhost", "--dir", "~/my dir", "--python", str(python), "--",
                  "--config", "a b.yaml")
    assert shlex.split(line)[:2] == ["bash", "-c"]
    ran = subprocess.run(["bash", "-c", shlex.split(line)[2]], env={"HOME": str(home), "PATH": os.environ["PATH"]},
                         capture_output=True, text=True, timeout=30)
    assert ran.stdout == f"{home}/my dir\n<-m><bmgpt_jax.train><--config><a b.yaml>", ran.stderr
    [line] = _dry("gpu_multinode.sh", "--slurm", "--nodes", "1", "--python", str(python))
    assert f"exec {shlex.quote(str(python))} -m bmgpt_jax.train" in shlex.split(line)[-1]


def test_gpu_multinode_slurm_coordinator_is_the_first_node_of_the_step(tmp_path):
    """Run for real under stand-ins for `srun` (each task with SLURM_PROCID, SLURM_NTASKS and the step's
    node list) and `scontrol show hostnames`: every task exports the step's first node as coordinator.
    A step on part of the job's nodes (a second `srun` in an allocation of 8) must not name the job's
    first node, where no task of this step runs."""
    home, python = _stand_in_python(tmp_path)
    bin_dir = _stand_in_slurm(tmp_path)
    (python.parent / "show_env").write_text('#!/usr/bin/env bash\necho "$SLURM_PROCID $JAX_COORDINATOR_ADDRESS"\n')
    env = {**_slurm_env(home, bin_dir), "SLURM_JOB_NODELIST": "gpu[01-08]", "SLURM_STEP_NODELIST": "gpu[07-08]",
           "SLURM_JOB_NUM_NODES": "8"}
    show = python.parent / "show_env"
    show.chmod(0o755)
    run = subprocess.run(["bash", str(REPO / "launch" / "gpu_multinode.sh"), "--slurm", "--nodes", "2",
                          "--python", str(show)], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert [line for line in run.stdout.splitlines()[1:] if line.strip()] == ["0 gpu07:12355", "1 gpu07:12355"]


def test_gpu_multinode_slurm_tasks_run_in_the_folder(tmp_path):
    """As ssh mode, every SLURM task runs in --dir (quoted, a leading ~/ the node's home), by default this
    checkout; --dir was accepted and ignored, so the tasks ran wherever the launcher was started."""
    home, python = _stand_in_python(tmp_path)
    env = {**_slurm_env(home, _stand_in_slurm(tmp_path)), "SLURM_JOB_NODELIST": "gpu[01-02]"}
    for extra, where in ((["--dir", "~/my dir"], f"{home}/my dir"), ([], str(REPO))):
        run = subprocess.run(["bash", str(REPO / "launch" / "gpu_multinode.sh"), "--slurm", "--nodes", "2", *extra,
                              "--python", str(python), "--", "--config", "a b.yaml"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        assert run.stdout.splitlines()[1:] == [where, "<-m><bmgpt_jax.train><--config><a b.yaml>"] * 2


def _slurm_env(home: Path, bin_dir: Path) -> dict:
    """This environment without SLURM's variables, HOME a stand-in and `bin_dir`'s stand-ins first on PATH."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, "HOME": str(home),
            "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def _stand_in_slurm(tmp_path: Path) -> Path:
    """A folder of stand-ins for `scontrol show hostnames` and `srun` (each task run here in turn, with
    SLURM_PROCID and SLURM_NTASKS, and a blank line after it)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(
        '#!/usr/bin/env bash\n[[ "$1 $2" == "show hostnames" ]] || exit 1\n'
        'prefix="${3%%[*}"; range="${3#*[}"; range="${range%]}"\n'
        'for i in $(seq -w "${range%-*}" "${range#*-}"); do echo "$prefix$i"; done\n')
    (bin_dir / "srun").write_text(
        '#!/usr/bin/env bash\nnodes=1; per=1\n'
        'while [[ "$1" == --* ]]; do case "$1" in --nodes=*) nodes="${1#*=}";; --ntasks-per-node=*) per="${1#*=}";; esac; shift; done\n'
        'n=$((nodes * per)); for ((i = 0; i < n; i++)); do SLURM_PROCID=$i SLURM_NTASKS=$n "$@"; echo; done\n')
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    return bin_dir


@pytest.mark.parametrize("script", ["tpu_pod.sh", "gpu_multinode.sh"])
def test_launcher_help_is_the_header_and_names_every_flag(script):
    path = REPO / "launch" / script
    run = subprocess.run(["bash", str(path), "--help"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "set -euo" not in run.stdout and "#!" not in run.stdout
    flags = set(re.findall(r"^\s+(--[a-z-]+)(?:\|[^)]*)?\)", path.read_text(), re.M)) - {"--help"}
    assert len(flags) >= 6 and all(flag in run.stdout for flag in flags), sorted(f for f in flags if f not in run.stdout)
