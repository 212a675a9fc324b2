"""Jobs on the local CI Slurm cluster (``bash .ci/slurm/up.sh``): plumbing, then tiny DDP trainings.

Every test is marked ``slurm`` and skips itself when ``sinfo`` is missing or the cluster does not
answer. Jobs are submitted with ``sbatch`` and followed with ``scontrol show job`` (there is no
accounting daemon, so no ``sacct``); everything they write goes under ``tmp_path``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                   "PREEMPTED", "BOOT_FAIL", "DEADLINE"}
JOB_TIMEOUT_S = 150
# Lightning logs this line once per rank when the process group forms.
MEMBER_RE = re.compile(r"GLOBAL_RANK: (\d+), MEMBER: (\d+)/(\d+)")
# Tiny training: a few steps of the quickstart model on a small synthetic set.
TINY_TRAIN = [
    "experiment=quickstart",
    "data.synthetic.num_train=64",
    "data.synthetic.num_val=8",
    "data.synthetic.num_test=8",
    "data.batch_size=8",
    "data.num_workers=0",
    "data.persistent_workers=false",
    "data.pin_memory=false",
    "trainer.max_epochs=1",
    "++trainer.limit_train_batches=2",
    "++trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "trainer.accelerator=cpu",
    "trainer.precision=32-true",
    "trainer.benchmark=false",
    "test_after_fit=false",
    "logger=csv",
]


# ---------------------------------------------------------------------- helpers
def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kwargs)


@pytest.fixture(scope="module")
def cluster() -> list[str]:
    """The names of the responding nodes of partition ``debug``; skips when there is no cluster."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        pytest.skip("sinfo/sbatch not found: install the cluster with `bash .ci/slurm/up.sh` (as root)")
    conf = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf"))
    if not conf.is_file():
        # sinfo would retry a missing config for a minute.
        pytest.skip(f"no Slurm config at {conf}: start the cluster with `bash .ci/slurm/up.sh`")
    try:
        out = _run(["sinfo", "-h", "-N", "-p", "debug", "-o", "%N %t"])
    except subprocess.TimeoutExpired:
        pytest.skip("sinfo timed out: the Slurm controller is not answering; run `bash .ci/slurm/up.sh`")
    if out.returncode != 0:
        pytest.skip(f"Slurm cluster not up (sinfo: {out.stderr.strip()}); run `bash .ci/slurm/up.sh`")
    nodes = sorted({line.split()[0] for line in out.stdout.splitlines()
                    if line.split()[1].rstrip("*~#") in {"idle", "mix", "alloc", "comp"}})
    if len(nodes) < 2:
        pytest.skip(f"the CI cluster needs 2 responding nodes in partition debug, sinfo says: "
                    f"{out.stdout.strip()!r}; run `bash .ci/slurm/down.sh && bash .ci/slurm/up.sh`")
    return nodes


def job_env(**extra: str) -> dict[str, str]:
    """The environment sbatch exports into the job (``--export=ALL`` is Slurm's default)."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                # srun prefixes every output line with its task id ("0: ...").
                "SLURM_LABELIO": "1"})
    env.update(extra)
    return env


def sbatch(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> int:
    """Submit a job and return its id.

    Args:
        args: sbatch options followed by the script (or ``--wrap=...``) and its arguments.
        cwd: the submit directory (``SLURM_SUBMIT_DIR``).
        env: environment exported to the job; ``job_env()`` when None.
    """
    out = _run(["sbatch", "--parsable", *args], cwd=cwd, env=env or job_env())
    assert out.returncode == 0, f"sbatch {' '.join(args)} failed: {out.stderr}"
    return int(out.stdout.strip().split(";")[0])


def job_info(job_id: int) -> dict[str, str]:
    """``scontrol show job -o`` as a dict of its ``Key=Value`` fields."""
    out = _run(["scontrol", "show", "job", "-o", str(job_id)])
    assert out.returncode == 0, f"scontrol show job {job_id}: {out.stderr}"
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def wait_job(job_id: int, log: Path, timeout: float = JOB_TIMEOUT_S) -> dict[str, str]:
    """Poll until the job ends; cancel it and fail with the tail of ``log`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        info = job_info(job_id)
        if info.get("JobState") in TERMINAL_STATES:
            return info
        if time.monotonic() > deadline:
            _run(["scancel", str(job_id)])
            pytest.fail(f"job {job_id} still {info.get('JobState')} after {timeout:.0f} s "
                        f"({info.get('Reason')}); log {log}:\n{tail(log)}")
        time.sleep(0.5)


def tail(path: Path, lines: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no file)"


def assert_completed(info: dict[str, str], log: Path) -> None:
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (
        f"job {info['JobId']} ended {info['JobState']} exit {info['ExitCode']}; log {log}:\n{tail(log)}")


def labelled(text: str) -> dict[int, list[str]]:
    """Split srun ``--label`` output into lines per task id."""
    per_task: dict[int, list[str]] = {}
    for line in text.splitlines():
        match = re.match(r"\s*(\d+): (.*)", line)
        if match:
            per_task.setdefault(int(match.group(1)), []).append(match.group(2))
    return per_task


def members(lines: list[str]) -> set[tuple[int, int, int]]:
    """(global rank, member, world size) from Lightning's 'Initializing distributed' lines."""
    return {tuple(int(g) for g in m.groups()) for line in lines if (m := MEMBER_RE.search(line))}


# ---------------------------------------------------------------------- launcher config
def test_launcher_config_takes_tasks_and_nodes_from_trainer():
    """conf/hydra/launcher/submitit_slurm.yaml: every plugin field, tasks/nodes from the trainer."""
    from hydra import compose, initialize_config_dir
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", return_hydra_config=True,
                      overrides=["hydra/launcher=submitit_slurm", "trainer=ddp",
                                 "trainer.devices=3", "trainer.num_nodes=2"])
    launcher = cfg.hydra.launcher
    # The file itself lists every field (it cannot extend the schema it shadows; see its header).
    own = OmegaConf.load(REPO / "conf/hydra/launcher/submitit_slurm.yaml")
    assert set(own.keys()) == set(OmegaConf.structured(SlurmQueueConf).keys())
    assert launcher._target_ == SlurmQueueConf._target_
    assert (launcher.tasks_per_node, launcher.nodes) == (3, 2)


# ---------------------------------------------------------------------- plumbing
def test_two_tasks_see_their_rank_and_task_count(cluster, tmp_path):
    log = tmp_path / "job.out"
    job = sbatch(["--ntasks=2", "--nodes=1", f"--output={log}",
                  "--wrap=srun bash -c 'echo rank=$SLURM_PROCID ntasks=$SLURM_NTASKS node=$SLURMD_NODENAME'"],
                 cwd=tmp_path)
    assert_completed(wait_job(job, log), log)
    per_task = labelled(log.read_text())
    assert sorted(per_task) == [0, 1], log.read_text()
    nodes = set()
    for task, lines in per_task.items():
        fields = dict(kv.split("=") for kv in lines[0].split())
        assert fields["rank"] == str(task) and fields["ntasks"] == "2"
        nodes.add(fields["node"])
    assert len(nodes) == 1 and nodes <= set(cluster)


def test_two_nodes_one_task_each(cluster, tmp_path):
    log = tmp_path / "job.out"
    job = sbatch(["--nodes=2", "--ntasks-per-node=1", f"--output={log}",
                  "--wrap=srun bash -c 'echo $SLURM_PROCID $SLURM_NODEID $SLURMD_NODENAME $SLURM_JOB_NODELIST'"],
                 cwd=tmp_path)
    info = wait_job(job, log)
    assert_completed(info, log)
    rows = sorted(lines[0].split() for lines in labelled(log.read_text()).values())
    assert [r[:2] for r in rows] == [["0", "0"], ["1", "1"]], rows
    assert sorted(r[2] for r in rows) == cluster[:2]
    # Lightning takes the first node of the list as MASTER_ADDR: it must resolve to this host.
    first = _run(["scontrol", "show", "hostnames", rows[0][3]]).stdout.split()[0]
    assert socket.gethostbyname(first) == "127.0.0.1"


# ---------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def train_env(tmp_path_factory, cluster) -> dict[str, str]:
    """Job environment with a data folder shared by this module's trainings (generated once)."""
    if not (REPO / "train.py").is_file():
        pytest.skip(f"{REPO / 'train.py'} does not exist yet")
    data_dir = tmp_path_factory.mktemp("slurm_data")
    return job_env(CAPTIONER_DATA=str(data_dir), CAPTIONER_ROOT=str(REPO))


def run_folders(output_root: Path) -> list[Path]:
    return sorted(p for p in (output_root / "train").glob("*") if p.is_dir() and not p.is_symlink())


def check_one_run(output_root: Path, log_text: str) -> Path:
    """Exactly one run folder, with one checkpoint folder and one metrics file; returns it."""
    runs = run_folders(output_root)
    assert len(runs) == 1, f"expected one run folder under {output_root / 'train'}: {runs}\n{log_text[-3000:]}"
    assert [p.parent for p in output_root.rglob("checkpoints") if p.is_dir()] == runs
    assert [p.parent for p in output_root.rglob("metrics.json")] == runs
    # CSVLogger writes on global rank 0 only.
    assert [p.parents[2] for p in output_root.rglob("metrics.csv")] == runs  # csv/version_0
    assert (runs[0] / "checkpoints" / "last.ckpt").is_file()
    metrics = json.loads((runs[0] / "metrics.json").read_text())["metrics"]
    assert "fit_seconds" in metrics
    return runs[0]


def sbatch_two_rank_training(train_env, tmp_path, nodes: int, tasks_per_node: int):
    """Submit docs/slurm/train.sbatch (tiny training), wait, check both ranks joined a world of 2.

    Returns:
        (job id, ``scontrol show job`` fields, the run folder).
    """
    outputs = tmp_path / "outputs"
    log = tmp_path / "job.out"
    env = {**train_env, "CAPTIONER_OUTPUTS": str(outputs)}
    job = sbatch([f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}", "--gpus-per-node=0",
                  "--cpus-per-task=1", "--time=10", f"--output={log}",
                  str(REPO / "docs/slurm/train.sbatch"), *TINY_TRAIN], cwd=tmp_path, env=env)
    info = wait_job(job, log)
    assert_completed(info, log)
    per_task = labelled(log.read_text())
    assert members(per_task.get(0, [])) == {(0, 1, 2)}, tail(log)
    assert members(per_task.get(1, [])) == {(1, 2, 2)}, tail(log)
    return job, info, check_one_run(outputs, log.read_text())


def test_sbatch_ddp_two_cpu_tasks_one_node(train_env, tmp_path):
    """docs/slurm/train.sbatch with 2 tasks on one node: DDP over 2 CPU processes, world size 2."""
    job, _, run = sbatch_two_rank_training(train_env, tmp_path, nodes=1, tasks_per_node=2)
    assert run.name == f"slurm-{job}"


def test_submitit_launcher_ddp_two_cpu_tasks(train_env, tmp_path):
    """``train.py -m hydra/launcher=submitit_slurm``: one sbatch job of trainer.devices tasks."""
    outputs = tmp_path / "outputs"
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, str(REPO / "train.py"), "-m", "hydra/launcher=submitit_slurm", "trainer=ddp_cpu",
           *TINY_TRAIN, f"paths.output_root={outputs}", f"hydra.sweep.dir={sweep}",
           "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10"]
    # submitit gives every task its own log file; no srun labels wanted there.
    env = {k: v for k, v in train_env.items() if k != "SLURM_LABELIO"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=JOB_TIMEOUT_S, cwd=tmp_path, env=env)
    job_dirs = sorted((sweep / ".submitit").glob("[0-9]*"))
    assert out.returncode == 0, f"{out.stderr[-4000:]}\n" + "\n".join(
        tail(p) for d in job_dirs for p in sorted(d.glob("*_log.err")))
    assert len(job_dirs) == 1, job_dirs
    job_dir = job_dirs[0]
    script = (job_dir / f"{job_dir.name}_submission.sh").read_text()
    assert "--ntasks-per-node=2" in script and "--nodes=1" in script, script
    for rank in (0, 1):
        err = job_dir / f"{job_dir.name}_{rank}_log.err"
        text = err.read_text() + (job_dir / f"{job_dir.name}_{rank}_log.out").read_text()
        assert members(text.splitlines()) == {(rank, rank + 1, 2)}, tail(err)
    # Hydra's multirun: the one job of the sweep runs in subfolder 0 of the sweep folder.
    assert (sweep / "0" / "checkpoints" / "last.ckpt").is_file()
    assert [p.parent for p in tmp_path.rglob("metrics.json")] == [sweep / "0"]
    assert [p.parent for p in tmp_path.rglob("checkpoints") if p.is_dir()] == [sweep / "0"]
    assert [p.parents[2] for p in tmp_path.rglob("metrics.csv")] == [sweep / "0"]


def test_sbatch_ddp_two_nodes_one_task_each(cluster, train_env, tmp_path):
    """2 emulated nodes x 1 task: num_nodes=2, devices=1, ranks on different slurmd's."""
    _, info, _ = sbatch_two_rank_training(train_env, tmp_path, nodes=2, tasks_per_node=1)
    assert _run(["scontrol", "show", "hostnames", info["NodeList"]]).stdout.split() == cluster[:2]
